"""Issue 19 items 1 and 2: a failing rank ends every rank within seconds with its message
printed; SIGTERM to the process group writes the stop checkpoint (loader workers survive it) and
the run exits with 128 + 15."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from faults_helpers import (
    complete_steps,
    faults_args,
    logged_steps,
    signal_all,
    start_run,
    stop_group,
    text_corpus,
    wait_until,
    write_jsonl,
)

pytestmark = pytest.mark.dist


def test_one_failing_rank_ends_the_run_within_seconds(tmp_path: Path) -> None:
    dataset = write_jsonl(tmp_path / "data.jsonl", text_corpus(100))
    log = tmp_path / "log.txt"
    job = start_run(faults_args(tmp_path / "run", dataset, steps=6), log, nproc=2, FAULTS_RAISE_AT="1:3")
    start = time.monotonic()
    try:
        code = job.wait(timeout=120)  # before the fix: the peer waited out the 600 s pg timeout
    finally:
        stop_group(job)
    output = log.read_text()
    assert code != 0
    assert "injected failure on rank 1 at step 3" in output
    assert time.monotonic() - start < 100
    assert "another rank stopped" in output  # the healthy rank says why it ends


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_the_group_writes_the_stop_checkpoint(tmp_path: Path, nproc: int) -> None:
    dataset = write_jsonl(tmp_path / "data.jsonl", text_corpus(200))
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    args = faults_args(run, dataset, steps=40, workers=2)
    job = start_run(args, log, nproc=nproc, FAULTS_SLEEP_PER_STEP="0.3")
    try:
        wait_until(lambda: len(logged_steps(run)) >= 3, 120, "step 3", job, log)
        signal_all(job, signal.SIGTERM)  # every process at once, as `scancel` delivers it
        code = job.wait(timeout=60)
    finally:
        stop_group(job)
    output = log.read_text()
    assert "DataLoader worker" not in output, output[-3000:]
    last = logged_steps(run)[-1]
    assert complete_steps(run)[-1] == last, "the stop checkpoint holds the last step"
    assert last < 40
    if nproc == 1:
        assert code == 128 + signal.SIGTERM
    else:  # torchrun reports its own failure; every rank stopped on the signal
        assert code != 0
        assert output.count(f"stopping at step {last} on signal {int(signal.SIGTERM)}") == 2
    assert "Unable to shutdown process" not in output  # no rank needed torchrun's SIGKILL
