"""Exact resume, async saves, retention, load_step, model-only loading, resume on a different
world size and the EMA export: the real Trainer on 2 gloo ranks with the toy model spec (its
`[toy] trace` records every step's weights checksum and data position)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_bagel_titan, toy_cli_args, toy_step_values, toy_trace

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test here launches torchrun

# Deterministic fp32, 2 microbatches per step, a checkpoint every 2 steps, an EMA that starts
# averaging after step 2 (decay 0.9, so the average visibly differs from the weights).
COMMON = [
    "--training.steps",
    "8",
    "--training.grad_accum_steps",
    "2",
    "--training.deterministic",
    "true",
    "--checkpoint.enable",
    "true",
    "--checkpoint.interval",
    "2",
    "--ema.enable",
    "true",
    "--ema.decay",
    "0.9",
    "--ema.start_step",
    "2",
    "--toy.trace",
    "true",
]


def metrics_jsonl(run: Path) -> dict[int, dict]:
    """The last logged record of each step in `metrics.jsonl`."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """8 steps straight through, keeping the 2 newest checkpoints, exporting the EMA at the end."""
    root = tmp_path_factory.mktemp("straight")
    run_bagel_titan([*toy_cli_args(root), *COMMON, "--checkpoint.keep_latest_k", "2"], nproc=2)
    return root / "toy"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """4 steps, stop, resume for 4 more; asynchronous saves, no retention, no export."""
    root = tmp_path_factory.mktemp("split")
    args = [
        *toy_cli_args(root),
        *COMMON,
        "--checkpoint.async_mode",
        "async",
        "--checkpoint.export_at_end",
        "false",
    ]
    run_bagel_titan([*args, "--training.steps", "4"], nproc=2)
    run_bagel_titan(args, nproc=2)
    return root / "toy"


def test_split_run_is_bitwise_identical_to_straight_run(straight: Path, split: Path) -> None:
    ref = [toy_step_values(r) for r in toy_trace(straight, "step")]
    got = [toy_step_values(r) for r in toy_trace(split, "step")]
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        assert a == b, f"step {a['step']} differs: straight {a} vs resumed {b}"
    starts = toy_trace(split, "start")
    assert [s["step"] for s in starts] == [0, 4]
    # The resumed job continued the data where it stopped (the packs count goes on).
    assert got[4]["positions"] == ref[4]["positions"] and got[4]["positions"][0]["packs"] == 10
    # metrics.jsonl holds the same numbers as the trace, for every step.
    logged = metrics_jsonl(split)
    assert sorted(logged) == list(range(1, 9))
    assert [logged[s]["loss"] for s in range(1, 9)] == [r["loss"] for r in ref]
    assert ref[0]["ema"] != ref[-1]["ema"] and ref[-1]["model"] != ref[-1]["ema"]


def test_async_saves_are_all_marked_complete(split: Path) -> None:
    ckpt = split / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-4", "step-6", "step-8"]
    assert all((p / "COMPLETE").exists() for p in ckpt.iterdir())


def test_retention_keeps_the_newest_complete_checkpoints(straight: Path) -> None:
    ckpt = straight / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-6", "step-8"]
    assert all((p / "COMPLETE").exists() for p in ckpt.iterdir())


def test_ema_export_is_the_checkpointed_ema_in_bf16(straight: Path, tmp_path: Path) -> None:
    """The final export holds the EMA of step 8 (as saved in its checkpoint) in bf16, in the
    model's own layout; not the raw weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    export = straight / "exports" / "final"
    weights = load_file(str(export / "model.safetensors"))
    assert [p.name for p in export.parent.iterdir()] == ["final"], "temporary export folder left behind"
    dcp_to_torch_save(straight / "checkpoint" / "step-8", tmp_path / "step-8.pt")
    saved = torch.load(tmp_path / "step-8.pt", weights_only=False)
    assert set(weights) == set(saved["model"]) == set(saved["ema"]) and len(weights) > 10
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    for name, value in weights.items():
        torch.testing.assert_close(value, saved["ema"][name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    moved = [n for n in weights if not torch.equal(saved["model"][n].to(torch.bfloat16), weights[n])]
    assert len(moved) > len(weights) // 2, "export holds the raw weights, not the EMA"
    # The trace's EMA checksum is the checkpoint's EMA.
    ema_sum = sum(t.double().sum().item() for t in saved["ema"].values())
    assert math.isclose(ema_sum, toy_trace(straight, "step")[-1]["ema"], rel_tol=1e-9)


def test_load_step_on_a_different_world_size(straight: Path, split: Path, tmp_path: Path) -> None:
    """Step 2 of the 2-rank run resumed on 1 rank: weights, optimizer, EMA resharded exactly;
    the data positions do not map onto 1 rank, so the data restarts with a derived seed."""
    run = tmp_path / "toy"
    for step in (2, 4):  # load_step picks step 2 although step 4 is newer
        shutil.copytree(split / "checkpoint" / f"step-{step}", run / "checkpoint" / f"step-{step}")
    proc = run_bagel_titan(
        [
            *toy_cli_args(tmp_path),
            *COMMON,
            "--checkpoint.load_step",
            "2",
            "--training.steps",
            "3",
            "--checkpoint.export_at_end",
            "false",
        ]
    )
    start = toy_trace(run, "start")[0]
    ref2 = toy_trace(straight, "step")[1]
    assert (start["step"], start["world_size"]) == (2, 1)
    assert math.isclose(start["model"], ref2["model"], rel_tol=1e-12)
    assert math.isclose(start["ema"], ref2["ema"], rel_tol=1e-12)
    assert "data restarts at step 2" in proc.stdout + proc.stderr
    steps = toy_trace(run, "step")
    assert [r["step"] for r in steps] == [3]
    assert steps[0]["positions"][0]["packs"] == 2, "the data restarts from a fresh loader"
    assert math.isfinite(steps[0]["metrics"]["loss"])
    assert (run / "checkpoint" / "step-3" / "COMPLETE").exists()


def test_initial_load_is_model_only(straight: Path, split: Path, tmp_path: Path) -> None:
    """A new run fine-tunes from another run's step-4 weights: step, data, optimizer fresh; the
    EMA starts at the loaded weights."""
    source = split / "checkpoint" / "step-4"
    run_bagel_titan(
        [
            *toy_cli_args(tmp_path),
            *COMMON,
            "--checkpoint.initial_load_path",
            str(source),
            "--training.steps",
            "1",
            "--checkpoint.export_at_end",
            "false",
        ],
        nproc=2,
    )
    start = toy_trace(tmp_path / "toy", "start")[0]
    ref4 = toy_trace(straight, "step")[3]
    assert start["step"] == 0
    assert math.isclose(start["model"], ref4["model"], rel_tol=1e-12)
    assert math.isclose(start["ema"], ref4["model"], rel_tol=1e-12)
    first = toy_trace(tmp_path / "toy", "step")[0]
    assert [p["packs"] for p in first["positions"]] == [2, 2]
