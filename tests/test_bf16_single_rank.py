"""bf16 on one rank: no FSDP2 wrap, the forward and loss under bf16 autocast, fp32 master weights
and optimizer state, losses that differ from fp32 (bf16 is really used), and a bitwise resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from bagel_titan.config.manager import load_job_config
from bagel_titan.distributed.parallelize import compute_autocast, wraps_with_fsdp
from conftest import run_bagel_titan, toy_cli_args, toy_step_values, toy_trace, train_in_process

STEPS = ["--training.steps", "3", "--training.deterministic", "true"]
BF16 = ["--training.dtype", "bfloat16"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fsdp", ["true", "false"])
def test_one_rank_bf16_is_never_wrapped(fsdp: str, tmp_path: Path) -> None:
    cfg, _ = load_job_config([*toy_cli_args(tmp_path), *BF16, "--parallelism.fsdp", fsdp])
    assert not wraps_with_fsdp(cfg, world_size=1)
    assert isinstance(compute_autocast(cfg, 1, "cpu"), torch.autocast)
    assert wraps_with_fsdp(cfg, world_size=2) == (fsdp == "true")
    fp32, _ = load_job_config(toy_cli_args(tmp_path))
    assert not isinstance(compute_autocast(fp32, 1, "cpu"), torch.autocast)


def test_one_rank_bf16_computes_in_bf16_with_fp32_master_weights(tmp_path: Path) -> None:
    """The real Trainer in this process: every Linear's output is bf16, its weights and AdamW
    state stay fp32 plain tensors (no FSDP2 DTensors)."""
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    cfg, plugins = load_job_config([*toy_cli_args(tmp_path), *BF16, "--training.steps", "2"])
    trainer = Trainer(cfg, plugins)
    try:
        linears = [m for m in trainer.model.modules() if isinstance(m, nn.Linear)]
        assert linears
        seen: set[torch.dtype] = set()
        handles = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype)) for m in linears]
        trainer.train()
        for handle in handles:
            handle.remove()
        assert seen == {torch.bfloat16}
        params = list(trainer.model.parameters())
        assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in params)
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0]
        assert state and all(t.dtype == torch.float32 for t in state)
    finally:
        trainer.close()
        destroy_distributed()


@pytest.mark.dist
@pytest.mark.slow
def test_one_rank_bf16_trains_differently_and_resumes_bitwise(tmp_path: Path) -> None:
    """3 bf16 steps: close to fp32's losses but not equal; a new job resumed from their step-2
    checkpoint redoes step 3 bitwise (metrics, weights, EMA, data position). The fp32 reference
    runs in this process."""
    train_in_process([*toy_cli_args(tmp_path, "fp32"), *STEPS])
    checkpointed = [
        *STEPS,
        *BF16,
        "--toy.trace",
        "true",
        "--checkpoint.enable",
        "true",
        "--checkpoint.interval",
        "2",
        "--checkpoint.export_at_end",
        "false",
    ]
    run_bagel_titan([*toy_cli_args(tmp_path, "bf16"), *checkpointed])
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=1e-6)
    assert bf16 != fp32  # bf16 is really used

    step2 = Path("checkpoint") / "step-2"
    shutil.copytree(tmp_path / "bf16" / step2, tmp_path / "resumed" / step2)
    run_bagel_titan([*toy_cli_args(tmp_path, "resumed"), *checkpointed])
    assert [r["step"] for r in toy_trace(tmp_path / "resumed", "start")] == [2]
    want = [toy_step_values(r) for r in toy_trace(tmp_path / "bf16", "step")]
    got = [toy_step_values(r) for r in toy_trace(tmp_path / "resumed", "step")]
    assert [r["step"] for r in want] == [1, 2, 3]
    assert got == want[2:]
