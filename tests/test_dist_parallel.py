"""Parallel dims validation, unit selection, reshard policy, activation checkpointing keys and
gradients (in process, on a small residual MLP), and FSDP / HSDP / AC / bf16 runs of the real
Trainer with the toy model spec on 2 gloo ranks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.config.job_config import ActivationCheckpoint
from bagel_titan.distributed.activation_checkpoint import (
    apply_activation_checkpointing,
    checkpointed_unit_indices,
)
from bagel_titan.distributed.compile import apply_compile
from bagel_titan.distributed.fsdp import reshard_after_forward_for
from bagel_titan.distributed.parallel_dims import ParallelDims, ParallelismConfigError
from bagel_titan.distributed.units import resolve_units
from conftest import run_bagel_titan, toy_cli_args, toy_trace


class Block(nn.Module):
    """Residual MLP block: the sharding / checkpointing / compile unit."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)  # AC must replay the RNG state in the recompute

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD + self.down(self.drop(torch.relu(self.up(x_BD))))


class ToyModel(nn.Module):
    """Blocks + head, plus a frozen `encoder` (like BAGEL's VAE)."""

    def __init__(self, dim: int = 16, depth: int = 3):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.encoder.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.encoder(x_BD)
        for block in self.blocks:
            h = block(h)
        return self.head(h).sum(-1)


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
    with pytest.raises(ConfigError, match="reshard_after_forward"):  # checked once, by the config
        load_job_config(["--parallelism.reshard_after_forward", "sometimes"])


def test_selective_every_nth() -> None:
    def pick(mode: str, every: int = 2) -> list[int]:
        return checkpointed_unit_indices(6, ActivationCheckpoint(mode, every))

    assert pick("none") == [] and pick("full") == list(range(6))
    assert pick("selective", 2) == [1, 3, 5] and pick("selective", 3) == [2, 5]
    assert checkpointed_unit_indices(3, ActivationCheckpoint("selective", 2), "op") == [0, 1, 2]
    # Values are checked once, by the config.
    with pytest.raises(ConfigError, match="mode"):
        load_job_config(["--activation_checkpoint.mode", "some"])
    with pytest.raises(ConfigError, match="granularity"):
        load_job_config(["--activation_checkpoint.selective_granularity", "block"])
    with pytest.raises(ConfigError, match="selective_every"):
        load_job_config(["--activation_checkpoint.selective_every", "0"])


@pytest.mark.parametrize(
    ("mode", "granularity", "backend", "indices"),
    [
        ("full", "layer", "", [0, 1, 2]),
        ("selective", "layer", "", [1]),
        ("selective", "op", "", [0, 1, 2]),
        ("selective", "op", "aot_eager", [0, 1, 2]),
    ],
)
def test_activation_checkpointing_keeps_keys_and_gradients(mode, granularity, backend, indices) -> None:
    torch.manual_seed(0)
    plain = ToyModel()
    checkpointed = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    assert (
        apply_activation_checkpointing(
            checkpointed, list(checkpointed.blocks), ActivationCheckpoint(mode), granularity
        )
        == indices
    )
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


# -- the Trainer on 2 gloo ranks -----------------------------------------------------------------

TOY = ["--training.steps", "3", "--training.grad_accum_steps", "2", "--training.deterministic", "true"]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def eager_losses(tmp_path_factory) -> list[float]:
    """Plain fp32 FSDP over 2 ranks: the reference."""
    root = tmp_path_factory.mktemp("eager")
    run_bagel_titan([*toy_cli_args(root), *TOY], nproc=2)
    return _losses(root / "toy")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "rtol"),
    [
        (("--activation_checkpoint.mode", "full", "--parallelism.reshard_after_forward", "always"), 1e-5),
        (
            (
                "--activation_checkpoint.mode",
                "selective",
                "--activation_checkpoint.selective_every",
                "1",
                "--parallelism.reshard_after_forward",
                "never",
            ),
            1e-5,
        ),
        (("--training.dtype", "bfloat16"), 2e-2),
    ],
    ids=["fsdp-ac-full", "fsdp-ac-selective", "bf16-mixed-precision"],
)
def test_toy_training_matches_eager_fsdp(extra, rtol, eager_losses, tmp_path: Path) -> None:
    """AC and bf16 compute train the same model: the same losses as plain fp32 FSDP (bf16
    within its precision, and not bitwise: it is really used)."""
    run_bagel_titan([*toy_cli_args(tmp_path), *TOY, *extra], nproc=2)
    losses = _losses(tmp_path / "toy")
    torch.testing.assert_close(losses, eager_losses, rtol=rtol, atol=1e-6)
    if "bfloat16" in extra:
        assert losses != eager_losses


@pytest.mark.dist
@pytest.mark.slow
def test_hsdp_trains_and_resumes(eager_losses, tmp_path: Path) -> None:
    """HSDP (2 replicas x 1 shard) with a checkpoint at step 2 and a resumed step 3: the same
    losses as plain FSDP (the gradient reduction differs, so not bitwise)."""
    args = [
        *toy_cli_args(tmp_path),
        *TOY,
        "--parallelism.dp_replicate",
        "2",
        "--checkpoint.enable",
        "true",
        "--checkpoint.interval",
        "2",
        "--checkpoint.export_at_end",
        "false",
        "--toy.trace",
        "true",
    ]
    run_bagel_titan([*args, "--training.steps", "2"], nproc=2)
    run_bagel_titan(args, nproc=2)
    assert [r["step"] for r in toy_trace(tmp_path / "toy", "start")] == [0, 2]
    torch.testing.assert_close(_losses(tmp_path / "toy"), eager_losses, rtol=1e-5, atol=1e-6)
