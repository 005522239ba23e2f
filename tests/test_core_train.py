"""The core training loop on the toy model: single process and 2 gloo ranks, metrics sinks,
global loss normalisation, non-finite guard, signals."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    determinism_restored,
    kill_session,
    run_bagel_titan,
    run_torchrun,
    start_bagel_titan,
    train_in_process,
    wait_for,
)

pytestmark = pytest.mark.dist  # every test here but the validation one launches processes


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_single_process_run_writes_every_sink(tmp_path, toy_args):
    proc = run_bagel_titan([*toy_args, "--training.steps", "12"])
    run = tmp_path / "toy"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "loss/ce", "grad_norm", "lr", "tokens_per_s", "tokens_seen", "data/packs"):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"]
    # TensorBoard holds the same numbers as metrics.jsonl.
    scalars = read_tensorboard(run / "tb")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 13))
    assert [v for _, v in scalars["loss/ce"]] == pytest.approx([r["loss/ce"] for r in records], rel=1e-6)
    # The console line carries the same loss.
    assert f"loss {records[-1]['loss']:.4f}" in proc.stdout
    # The resolved config is in the run folder and reloads.
    assert 'name = "toy_lm"' in (run / "config.toml").read_text()


def test_two_ranks_train_with_gloo(tmp_path, toy_args):
    run_bagel_titan([*toy_args, "--training.steps", "4"], nproc=2)
    records = read_jsonl(tmp_path / "toy" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Finite (metrics.jsonl writes NaN/inf as null), logged once (rank 0 only).
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in records), records


def _gradients(tmp_path: Path, layout: str, nproc: int, toy_args: list[str]) -> dict[str, torch.Tensor]:
    """One step's gradients of the toy model on fixed documents (tests/scripts/toy_gradients.py):
    on one rank in this process, on more under torchrun."""
    args = [*toy_args, "--training.deterministic", "true"]
    if nproc == 1:
        return _gradients_in_this_process(layout, args)
    out = tmp_path / f"grads_{layout.replace('|', '_').replace(',', '-')}.pt"
    script = str(REPO / "tests" / "scripts" / "toy_gradients.py")
    run_torchrun(nproc, script, str(out), layout, *args, timeout=300)
    return torch.load(out)


def _gradients_in_this_process(layout: str, args: list[str]) -> dict[str, torch.Tensor]:
    """toy_gradients.py's `step_gradients` on one rank here (no process start-up to pay), with
    torch's deterministic-algorithms switch, which the Trainer sets, put back afterwards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toy_gradients", REPO / "tests" / "scripts" / "toy_gradients.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with determinism_restored():
        return module.step_gradients(layout, args)


def test_global_loss_normalisation_gives_the_same_gradients(tmp_path, toy_args):
    """1 microbatch of 4 documents == 4 microbatches of 1 == 2 ranks x 2 microbatches."""
    one = _gradients(tmp_path, "0123", 1, toy_args)
    four = _gradients(tmp_path, "0,1,2,3", 1, toy_args)
    two_ranks = _gradients(tmp_path, "0,1|2,3", 2, toy_args)
    assert one.keys() == four.keys() == two_ranks.keys()
    for name in one:
        torch.testing.assert_close(four[name], one[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(two_ranks[name], one[name], atol=1e-6, rtol=0, msg=name)
    assert sum(g.abs().sum() for g in one.values()) > 0


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, toy_args):
    # A huge lr makes the toy model diverge; the guard skips and then stops with a clear message.
    proc = run_bagel_titan(
        [
            *toy_args,
            "--optimizer.lr",
            "1e30",
            "--training.max_norm",
            "0",
            "--training.steps",
            "50",
            "--training.max_consecutive_nonfinite",
            "3",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in proc.stdout + proc.stderr
    assert "step skipped" in proc.stdout + proc.stderr
    # The skipped steps are logged with null (JSON's non-finite) and counted; the third one
    # stops the run before it is logged.
    records = read_jsonl(tmp_path / "toy" / "metrics.jsonl")
    skipped = [r for r in records if r["nonfinite_steps"] > 0]
    assert [r["nonfinite_steps"] for r in skipped] == [1.0, 2.0], records
    assert all(r["grad_norm"] is None for r in skipped), skipped
    assert all(isinstance(r["loss"], float) for r in records if r["nonfinite_steps"] == 0)


def test_sigterm_ends_the_run_cleanly_after_a_checkpoint(tmp_path, toy_args):
    log = tmp_path / "job.log"
    proc = start_bagel_titan(
        [
            *toy_args,
            "--training.steps",
            "100000",
            "--checkpoint.enable",
            "true",
            "--checkpoint.interval",
            "100000",
            "--checkpoint.export_at_end",
            "false",
        ],
        log,
    )
    metrics = tmp_path / "toy" / "metrics.jsonl"
    try:
        wait_for(
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
            120,
            "3 logged steps",
            proc,
            log,
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    output = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # a stop by signal is not a finished run
    assert "stopping at step" in output
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "toy" / "checkpoint").glob("step-*"))
    assert len(steps) == 1 and (tmp_path / "toy" / "checkpoint" / f"step-{steps[0]}" / "COMPLETE").exists()


def test_validation_logs_held_out_loss(tmp_path, toy_args):
    config = tmp_path / "val.toml"
    config.write_text(
        '[validation]\nenable = true\ninterval = 2\nsteps = 2\n[[validation.datasets]]\npath = "held_out"\n'
    )
    train_in_process(["--job.config_file", str(config), *toy_args, "--training.steps", "4"])  # one rank, here
    records = read_jsonl(tmp_path / "toy" / "metrics.jsonl")
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(r["val/loss"] == r["val/loss/ce"] > 0 for r in val)
