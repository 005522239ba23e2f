"""Weight I/O at 7B width on 2 gloo ranks: the sharded load reads only each rank's rows of every
sharded parameter (never a full tensor of the model), and the streaming export writes the
official single file that reloads to the same (bf16) values."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

from bagel_titan.distributed.utils import destroy_distributed
from bagel_titan_plugins.bagel import weights
from bagel_titan_plugins.bagel.config import FLAVORS, BagelConfig
from bagel_titan_plugins.bagel.spec import build_bagel
from conftest import fsdp_bagel_from_folder


def slice_7b(llm_layers: int = 1, vit_layers: int = 1, vocab: int = 1024, vae=None):
    """BAGEL-7B-MoT's widths (hidden 3584, MLP 18944, 28/4 heads, SigLIP 1152) with few layers."""
    arch = FLAVORS["7b-mot"]
    return dataclasses.replace(
        arch,
        llm=dataclasses.replace(arch.llm, num_layers=llm_layers, vocab_size=vocab),
        vit=dataclasses.replace(arch.vit, num_layers=vit_layers),
        vae=vae or arch.vae,
    )


class _ReadSpy:
    """`safe_open` that records how many elements each read returns (the reads are real)."""

    reads: list[tuple[str, str, int]] = []

    def __init__(self, path: str, framework: str):
        self._handle = _REAL_SAFE_OPEN(path, framework)

    def __enter__(self):
        self._file = self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._file.keys()

    def get_tensor(self, key):
        tensor = self._file.get_tensor(key)
        self.reads.append(("tensor", key, tensor.numel()))
        return tensor

    def get_slice(self, key):
        handle, reads = self._file.get_slice(key), self.reads

        class Slice:
            get_shape, get_dtype = handle.get_shape, handle.get_dtype

            def __getitem__(self, index):
                part = handle[index]
                reads.append(("slice", key, part.numel()))
                return part

        return Slice()


_REAL_SAFE_OPEN = weights.safe_open


def _load_and_export(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from bagel_titan.distributed.tensor_io import gather_full

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = fsdp_bagel_from_folder(folder, world)
        weights.safe_open = _ReadSpy
        try:
            weights.load_weights(model, folder)
        finally:
            weights.safe_open = _REAL_SAFE_OPEN
        params = dict(model.named_parameters())
        full_reads = [key for kind, key, _ in _ReadSpy.reads if kind == "tensor" and key in params]
        assert not full_reads, f"rank {rank} decoded whole model tensors: {full_reads[:5]}"
        for kind, key, numel in _ReadSpy.reads:
            if key in params:
                assert isinstance(params[key], DTensor), key
                assert numel == params[key].to_local().numel() < params[key].numel(), (key, numel)
        read_keys = {key for _, key, _ in _ReadSpy.reads}
        assert {k for k in params if not k.endswith("pos_embed")} <= read_keys

        # An EMA-like sharded override, then the streamed export of the whole model.
        norm = "language_model.model.norm.weight"
        override = {norm: torch.full_like(params[norm], 0.5)}
        export = os.path.join(os.path.dirname(out), "export")
        weights.export(model, export, torch.bfloat16, override, ema=True, write=rank == 0)
        mismatched = []
        with safe_open(os.path.join(folder, "ema.safetensors"), "pt") as source:
            stored = safe_open(os.path.join(export, "ema.safetensors"), "pt") if rank == 0 else None
            for key, value in model.state_dict().items():
                expected = gather_full(override.get(key, value), torch.bfloat16)
                if rank == 0:
                    written = stored.get_tensor(key)
                    if not torch.equal(written, expected):
                        mismatched.append(key)
                    loaded = (
                        key in params and key != norm and not key.endswith("pos_embed")
                    )  # tables: recomputed
                    if loaded and not torch.equal(written, source.get_tensor(key)):
                        mismatched.append(f"{key} (vs the loaded folder)")
        if rank == 0:
            torch.save({"mismatched": mismatched, "files": sorted(os.listdir(export))}, out)
    finally:
        destroy_distributed()


@pytest.mark.dist
@pytest.mark.slow
def test_7b_width_slice_loads_only_local_rows_and_exports_streamed(tmp_path):
    from conftest import free_port

    arch = slice_7b(vae=FLAVORS["debug"].vae)  # the VAE is replicated, not sharded: keep it small
    with torch.device("meta"):
        model = build_bagel(arch, BagelConfig())
    folder = str(tmp_path / "folder")
    weights.write_random_weights(model, folder, torch.bfloat16)
    out = str(tmp_path / "result.pt")
    mp.spawn(_load_and_export, args=(2, free_port(), folder, out), nprocs=2, join=True)
    result = torch.load(out)
    assert result["mismatched"] == []
    assert "ema.safetensors" in result["files"] and "model.safetensors" not in result["files"]


def test_a_mapping_can_share_and_reshape_stored_tensors(tmp_path):
    """The reader's mapping serves other source layouts: two of our names may read one stored
    tensor (an und weight copied into its gen twin), and a conv kernel may fill a linear weight."""
    from safetensors.torch import save_file

    conv, shared = torch.randn(4, 3, 2, 2), torch.randn(5, 6)
    save_file({"patch.weight": conv, "mlp.weight": shared}, str(tmp_path / "hf.safetensors"))
    path = str(tmp_path / "hf.safetensors")
    targets = {"linear": torch.zeros(4, 12), "und": torch.zeros(5, 6), "gen": torch.zeros(5, 6)}
    weights.load_tensors(
        targets,
        {
            "linear": weights.StoredTensor(path, "patch.weight", shape=(4, 12)),
            "und": weights.StoredTensor(path, "mlp.weight"),
            "gen": weights.StoredTensor(path, "mlp.weight"),
        },
        "hf folder",
    )
    assert torch.equal(targets["linear"], conv.reshape(4, 12))
    assert torch.equal(targets["und"], shared) and torch.equal(targets["gen"], shared)
    with pytest.raises(ValueError, match="row-keeping reshape"):
        weights.load_tensors(
            {"linear": torch.zeros(3, 16)},
            {"linear": weights.StoredTensor(path, "patch.weight", shape=(3, 16))},
            "hf folder",
        )


def _gather_uneven(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from bagel_titan.distributed import tensor_io

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        tensor_io.GATHER_PIECE_BYTES = 40  # many pieces per tensor
        for shape in [(7, 3), (1, 5), (2, 2, 2), (5,), (100, 4)]:  # uneven blocks, empty shards
            full = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            sharded = distribute_tensor(full, mesh, [Shard(0)])
            for dtype in (torch.float32, torch.bfloat16):
                assert torch.equal(tensor_io.gather_full(sharded, dtype), full.to(dtype)), (shape, dtype)
    finally:
        destroy_distributed()


@pytest.mark.dist
def test_gather_full_assembles_uneven_row_shards_piece_by_piece():
    from conftest import free_port

    mp.spawn(_gather_uneven, args=(3, free_port()), nprocs=3, join=True)
