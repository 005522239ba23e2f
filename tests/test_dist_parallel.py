"""Parallel dims validation, unit selection, reshard policy, activation checkpointing keys and
gradients (in process), and FSDP / HSDP / AC / compile runs of the toy job on 2 gloo ranks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bagel_titan.config.job_config import ActivationCheckpoint
from bagel_titan.distributed.activation_checkpoint import (
    apply_activation_checkpointing,
    checkpointed_unit_indices,
)
from bagel_titan.distributed.compile import apply_compile
from bagel_titan.distributed.fsdp import reshard_after_forward_for
from bagel_titan.distributed.parallel_dims import ParallelDims, ParallelismConfigError
from bagel_titan.distributed.units import resolve_units
from dist_toy_job import ToyModel, read_records, run_toy


def test_parallel_dims_resolves_auto_shard() -> None:
    assert ParallelDims(1, -1, 8).dp_shard == 8
    dims = ParallelDims(2, -1, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.hsdp, dims.dp_world_size) == (2, 4, True, 8)


@pytest.mark.parametrize(
    ("replicate", "shard", "world", "key"),
    [(3, -1, 8, "dp_replicate"), (2, 2, 8, "dp_shard"), (0, -1, 4, "dp_replicate"), (1, 0, 4, "dp_shard")],
)
def test_parallel_dims_rejects_degrees_that_do_not_fit(replicate, shard, world, key) -> None:
    with pytest.raises(ParallelismConfigError, match=key):
        ParallelDims(replicate, shard, world)


def test_units_by_class_name_and_unknown_class() -> None:
    model = ToyModel()
    assert resolve_units(model, [], ["Block"]) == list(model.blocks)
    assert resolve_units(model, list(model.blocks)[:1], []) == [model.blocks[0]]
    with pytest.raises(ValueError, match="Qwen2MoTDecoderLayer.*classes in the model: Block"):
        resolve_units(model, [], ["Qwen2MoTDecoderLayer"])
    with pytest.raises(ValueError, match="not a proper submodule"):
        resolve_units(model, [ToyModel().head], [])


def test_reshard_policy() -> None:
    assert [reshard_after_forward_for("default", i, 3) for i in range(3)] == [True, True, False]
    assert all(reshard_after_forward_for("always", i, 3) for i in range(3))
    assert not any(reshard_after_forward_for("never", i, 3) for i in range(3))
    with pytest.raises(ValueError, match="reshard_after_forward"):
        reshard_after_forward_for("sometimes", 0, 3)


def test_selective_every_nth() -> None:
    pick = lambda mode, every=2: checkpointed_unit_indices(6, ActivationCheckpoint(mode, every))
    assert pick("none") == [] and pick("full") == list(range(6))
    assert pick("selective", 2) == [1, 3, 5] and pick("selective", 3) == [2, 5]
    with pytest.raises(ValueError, match="mode"):
        pick("some")
    assert checkpointed_unit_indices(3, ActivationCheckpoint("selective", 2), "op") == [0, 1, 2]
    with pytest.raises(ValueError, match="granularity"):
        checkpointed_unit_indices(3, ActivationCheckpoint("selective", 2), "block")


@pytest.mark.parametrize(
    ("mode", "granularity", "backend", "indices"),
    [("full", "layer", "", [0, 1, 2]), ("selective", "layer", "", [1]),
     ("selective", "op", "", [0, 1, 2]), ("selective", "op", "aot_eager", [0, 1, 2])],
)
def test_activation_checkpointing_keeps_keys_and_gradients(mode, granularity, backend, indices) -> None:
    torch.manual_seed(0)
    plain = ToyModel()
    checkpointed = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    assert apply_activation_checkpointing(
        checkpointed, list(checkpointed.blocks), ActivationCheckpoint(mode), granularity
    ) == indices
    if backend:
        apply_compile(list(checkpointed.blocks), backend=backend)
    assert list(checkpointed.state_dict()) == keys
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    calls: list[int] = []
    checkpointed.blocks[indices[0]].up.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(5, 16)
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same dropout masks (AC replays the RNG state in the recompute)
        model(x).square().sum().backward()
    if not backend:  # eager: the unit runs again in backward (op-level replays cached matmuls)
        assert len(calls) == 2
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_cpu_offload_trains_like_no_offload_on_cpu() -> None:
    """FSDP2's CPU-offload path (host shards, optimizer on the host) runs on a CPU job and gives
    the same updates as no offload, so the gloo CI covers the few-GPU mode's code path."""
    from bagel_titan.config.job_config import Parallelism
    from bagel_titan.distributed.fsdp import apply_fsdp
    from bagel_titan.distributed.utils import destroy_distributed, init_distributed

    init_distributed(torch.device("cpu"))
    try:
        mesh = ParallelDims(1, -1, 1).build_mesh("cpu")
        results = []
        for offload in (False, True):
            torch.manual_seed(0)
            model = ToyModel()
            apply_fsdp(model, list(model.blocks), mesh, Parallelism(cpu_offload=offload))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for step in range(3):
                x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad()
            results.append({n: p.full_tensor() for n, p in model.named_parameters()})
        for name, value in results[0].items():
            torch.testing.assert_close(results[1][name], value, rtol=0, atol=0, msg=name)
    finally:
        destroy_distributed()


def _losses(log: Path) -> list[float]:
    return [float.fromhex(r["loss"]) for r in read_records(log, "step")]


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory) -> list[float]:
    root = tmp_path_factory.mktemp("eager")
    run_toy(2, "--run-folder", str(root), "--out", str(root / "log.jsonl"), "--no-checkpoint", "--steps", "3")
    return _losses(root / "log.jsonl")


@pytest.mark.parametrize(
    ("extra", "rtol"),
    [
        (("--ac", "full", "--reshard", "always"), 1e-5),
        (("--ac", "selective", "--compile-backend", "aot_eager", "--reshard", "never"), 1e-5),
        (("--dtype", "bfloat16"), 2e-2),
    ],
    ids=["fsdp-ac-full", "fsdp-ac-selective-compile", "bf16-mixed-precision"],
)
def test_toy_training_matches_eager_fsdp(extra, rtol, eager_losses, tmp_path: Path) -> None:
    """AC (with and without compile) and bf16 compute train the same model: the same
    losses as plain fp32 FSDP (bf16 within its precision, and not bitwise: it is really used)."""
    run_toy(2, "--run-folder", str(tmp_path), "--out", str(tmp_path / "log.jsonl"),
            "--no-checkpoint", "--steps", "3", *extra, timeout=300)
    losses = _losses(tmp_path / "log.jsonl")
    torch.testing.assert_close(losses, eager_losses, rtol=rtol, atol=1e-6)
    if "bfloat16" in extra:
        assert losses != eager_losses


def test_hsdp_trains_and_resumes(eager_losses, tmp_path: Path) -> None:
    """HSDP (2 replicas x 1 shard) with a checkpoint at step 2 and a resumed step 3: the same
    losses as plain FSDP (the gradient reduction differs, so not bitwise)."""
    args = ["--run-folder", str(tmp_path / "run"), "--out", str(tmp_path / "log.jsonl"),
            "--dp-replicate", "2", "--steps", "3", "--interval", "2"]
    run_toy(2, *args, "--stop-at", "2")
    run_toy(2, *args)
    assert [r["step"] for r in read_records(tmp_path / "log.jsonl", "start")] == [0, 2]
    torch.testing.assert_close(_losses(tmp_path / "log.jsonl"), eager_losses, rtol=1e-5, atol=1e-6)
