"""`kill -9` in the middle of a save and of one rank mid-run: the restarted job resumes from
the last complete checkpoint, nothing saved before is lost, and the steps it redoes are
bitwise identical to the ones the killed job ran."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from dist_toy_job import kill_job, read_records, run_toy, start_toy, wait_for

STEPS = ["--steps", "8", "--interval", "2", "--accum", "2"]


def _assert_redone_steps_identical(log: Path) -> None:
    by_step: dict[int, list[dict]] = {}
    for record in read_records(log, "step"):
        by_step.setdefault(record["step"], []).append(record)
    assert sorted(by_step) == list(range(1, 9))
    redone = {step: rs for step, rs in by_step.items() if len(rs) > 1}
    assert redone, "the restarted job should have redone the steps after the last checkpoint"
    for step, records in redone.items():
        assert all(r == records[0] for r in records), f"step {step} differs after resume"


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoint"
    args = ["--run-folder", str(tmp_path / "run"), "--out", str(tmp_path / "log.jsonl"), *STEPS]
    job = start_toy(2, *args, log=tmp_path / "job.log", BAGEL_TITAN_TEST_SAVE_PAUSE="4:120")
    try:
        # Both ranks wrote their data files for step 4; the metadata and marker are not there yet.
        wait_for(lambda: len(list((ckpt / "step-4").glob("*.distcp"))) == 2, 90,
                 "the step-4 data files", job, tmp_path / "job.log")
    finally:
        kill_job(job)
    assert (ckpt / "step-2" / "COMPLETE").exists()
    assert not (ckpt / "step-4" / "COMPLETE").exists()

    run_toy(2, *args)
    starts = read_records(tmp_path / "log.jsonl", "start")
    assert [s["step"] for s in starts] == [0, 2]
    assert all((ckpt / f"step-{s}" / "COMPLETE").exists() for s in (2, 4, 6, 8))
    _assert_redone_steps_identical(tmp_path / "log.jsonl")


def test_kill_one_rank_mid_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoint"
    log = tmp_path / "log.jsonl"
    args = ["--run-folder", str(tmp_path / "run"), "--out", str(log), *STEPS]
    job = start_toy(2, *args, "--sleep-per-step", "0.5", "--pid-dir", str(tmp_path),
                    log=tmp_path / "job.log")
    try:
        wait_for(lambda: any(r["step"] == 5 for r in read_records(log, "step")), 90,
                 "step 5", job, tmp_path / "job.log")
        rank1 = int((tmp_path / "rank1.pid").read_text())
        os.kill(rank1, signal.SIGKILL)
        assert job.wait(timeout=60) != 0, "torchrun should fail when a rank dies"
    finally:
        if job.poll() is None:
            kill_job(job)
    complete_before = sorted(int(p.parent.name[5:]) for p in ckpt.glob("step-*/COMPLETE"))
    assert complete_before and complete_before[-1] >= 4

    run_toy(2, *args)
    starts = read_records(log, "start")
    assert [s["step"] for s in starts] == [0, complete_before[-1]]
    assert all((ckpt / f"step-{s}" / "COMPLETE").exists() for s in complete_before)
    _assert_redone_steps_identical(log)
