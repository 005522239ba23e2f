"""`kill -9` in the middle of a save and of one rank mid-run, on the real Trainer (2 gloo ranks,
the toy model spec): the restarted job resumes from the last complete checkpoint, nothing saved
before is lost, and the steps it redoes are bitwise identical to the ones the killed job ran."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import (
    kill_session,
    run_bagel_titan,
    start_bagel_titan,
    toy_cli_args,
    toy_step_values,
    toy_trace,
    wait_for,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test here launches torchrun

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
    "--checkpoint.export_at_end",
    "false",
    "--toy.trace",
    "true",
]


def _assert_redone_steps_identical(killed: list[dict], run: Path) -> None:
    """Every step the killed job ran is bitwise the same after the restart, and the restarted
    job ran to the end."""
    final = {r["step"]: toy_step_values(r) for r in toy_trace(run, "step")}  # the restarted job's wins
    assert sorted(final) == list(range(1, 9))
    checkpoint = toy_trace(run, "start")[-1]["step"]
    redone = [r for r in killed if r["step"] > checkpoint]
    assert redone, "the restarted job should have redone the steps after the last checkpoint"
    for record in killed:
        assert toy_step_values(record) == final[record["step"]], (
            f"step {record['step']} differs after the restart"
        )


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path: Path) -> None:
    run, ckpt, log = tmp_path / "toy", tmp_path / "toy" / "checkpoint", tmp_path / "job.log"
    args = [*toy_cli_args(tmp_path), *COMMON]
    job = start_bagel_titan([*args, "--toy.save_pause", "4,120"], log, nproc=2)
    try:
        # Both ranks wrote their data files for step 4; the metadata and marker are not there yet.
        wait_for(
            lambda: len(list((ckpt / "step-4").glob("*.distcp"))) == 2, 120, "the step-4 data files", job, log
        )
    finally:
        kill_session(job)
    assert (ckpt / "step-2" / "COMPLETE").exists()
    assert not (ckpt / "step-4" / "COMPLETE").exists()
    killed = toy_trace(run, "step")
    assert [r["step"] for r in killed] == [1, 2, 3, 4]

    run_bagel_titan(args, nproc=2)
    assert [s["step"] for s in toy_trace(run, "start")] == [0, 2]
    assert all((ckpt / f"step-{s}" / "COMPLETE").exists() for s in (2, 4, 6, 8))
    _assert_redone_steps_identical(killed, run)


def test_kill_one_rank_mid_run(tmp_path: Path) -> None:
    run, ckpt, log = tmp_path / "toy", tmp_path / "toy" / "checkpoint", tmp_path / "job.log"
    args = [*toy_cli_args(tmp_path), *COMMON]
    job = start_bagel_titan([*args, "--toy.step_delay_s", "0.5"], log, nproc=2)
    try:
        wait_for(lambda: any(r["step"] == 5 for r in toy_trace(run, "step")), 120, "step 5", job, log)
        os.kill(int((run / "toy_rank1.pid").read_text()), signal.SIGKILL)
        assert job.wait(timeout=120) != 0, "torchrun should fail when a rank dies"
    finally:
        if job.poll() is None:
            kill_session(job)
    complete_before = sorted(int(p.parent.name[5:]) for p in ckpt.glob("step-*/COMPLETE"))
    assert complete_before and complete_before[-1] >= 4
    killed = toy_trace(run, "step")

    run_bagel_titan(args, nproc=2)
    assert [s["step"] for s in toy_trace(run, "start")] == [0, complete_before[-1]]
    assert all((ckpt / f"step-{s}" / "COMPLETE").exists() for s in complete_before)
    _assert_redone_steps_identical(killed, run)
