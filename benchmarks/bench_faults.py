"""Soak test of interruption safety: a 2-rank run killed and restarted at random points.

A reference run trains `--steps` steps without interruption. The soak run trains the same job
in the same run folder, killed `--interruptions` times at random points (SIGKILL to the whole
process group mid-step, SIGKILL in the middle of a checkpoint save, SIGTERM to the group as
`timeout`/`scancel` send it) and restarted each time. After every restart it checks that the
run resumed from the newest complete checkpoint (no completed step lost) and, after a SIGTERM,
that the stop checkpoint held the last step trained. At the end the final weights must equal the
reference run's bit for bit. Model: the tests' `faults_lm` (toy LM through the real packed
loader, with loader workers), on CPU with gloo.

    python benchmarks/bench_faults.py --interruptions 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests"), str(REPO / "tests" / "faults")]

from common import add_results_option, append_section, device_description, markdown_table  # noqa: E402
from faults_helpers import (  # noqa: E402
    complete_steps,
    descendants,
    faults_args,
    logged_steps,
    signal_all,
    start_run,
    text_corpus,
    write_jsonl,
)

MODES = ("sigkill_mid_step", "sigkill_mid_save", "sigterm_group")


def job_args(run: Path, dataset: Path, steps: int) -> list[str]:
    return [
        *faults_args(run, dataset, steps=steps, workers=1),
        "--checkpoint.export_at_end",
        "true",
        "--checkpoint.export_dtype",
        "float32",
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "exports" / "final" / "model.safetensors"))


def resumed_step(log: Path) -> int:
    found = re.findall(r"loaded checkpoint from \S+ \(step (\d+)\)", log.read_text())
    return int(found[-1]) if found else 0


def trained_to(log: Path) -> int:
    """The last step this attempt trained (its own console lines, not the shared metrics file)."""
    found = re.findall(r"step\s+(\d+)\s+loss", log.read_text())
    return int(found[-1]) if found else 0


def wait(predicate: Callable[[], bool], job: subprocess.Popen, timeout: float) -> bool:
    """Poll `predicate` until true (True), the job ends or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def wait_for_exit(pids: list[int], timeout: float = 60) -> None:
    """Wait until none of `pids` runs any more (a next attempt must not share the folder with them)."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} still run {timeout} s after the kill")
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_group(job: subprocess.Popen, sig: int) -> None:
    """`sig` to torchrun, every rank and every loader worker at once (ranks run in their own
    sessions, so a process-group kill of torchrun would leave them running)."""
    signal_all(job, sig)


def soak(args: argparse.Namespace, work: Path) -> dict:
    dataset = write_jsonl(work / "data.jsonl", text_corpus(400))
    sleep = str(args.sleep_per_step)  # FAULTS_SLEEP_PER_STEP of every attempt
    reference = work / "reference"
    job = start_run(
        job_args(reference, dataset, args.steps), work / "reference.log", FAULTS_SLEEP_PER_STEP=sleep
    )
    assert job.wait(timeout=900) == 0, (work / "reference.log").read_text()[-3000:]

    rng = random.Random(args.seed)
    run = work / "soak"
    outcomes = {mode: 0 for mode in MODES}
    lost_steps = 0
    stop_checkpoints_missing = 0
    attempts = 0
    while True:
        attempts += 1
        log = work / f"soak-{attempts}.log"
        before = complete_steps(run)
        interrupting = sum(outcomes.values()) < args.interruptions
        job = start_run(job_args(run, dataset, args.steps), log, FAULTS_SLEEP_PER_STEP=sleep)
        if not interrupting:
            code = job.wait(timeout=900)
            assert code == 0, log.read_text()[-3000:]
            if before and resumed_step(log) != before[-1]:
                lost_steps += 1
            break
        mode = rng.choice(MODES)
        start_step = before[-1] if before else 0
        target = start_step + rng.randint(1, 3)
        reached = wait(lambda: trained_to(log) >= target, job, 300)
        if before and resumed_step(log) != before[-1]:
            lost_steps += 1
        if not reached:  # the run finished first: it is the last attempt
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        survivors = [job.pid, *descendants(job.pid)]
        if mode == "sigkill_mid_save":
            wait(lambda: any((run / "checkpoint").glob("step-*/SAVING")), job, 30)
            kill_group(job, signal.SIGKILL)
        elif mode == "sigkill_mid_step":
            time.sleep(rng.uniform(0.0, args.sleep_per_step))
            kill_group(job, signal.SIGKILL)
        else:
            kill_group(job, signal.SIGTERM)
        try:
            job.wait(timeout=90)
        finally:
            kill_group(job, signal.SIGKILL)
            job.wait()
        wait_for_exit(survivors)
        if mode == "sigterm_group" and "stopping at step" in log.read_text():
            if complete_steps(run)[-1:] != logged_steps(run)[-1:]:
                stop_checkpoints_missing += 1
        outcomes[mode] += 1
    same = all(
        torch.equal(a, b) for a, b in zip(final_weights(run).values(), final_weights(reference).values())
    )
    same = same and final_weights(run).keys() == final_weights(reference).keys()
    steps = logged_steps(run)
    return {
        "outcomes": outcomes,
        "attempts": attempts,
        "lost_steps": lost_steps,
        "stop_checkpoints_missing": stop_checkpoints_missing,
        "bitwise_equal": same,
        "every_step_logged_once": steps == list(range(1, args.steps + 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interruptions", type=int, default=20, help="kills before the run may finish")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the job")
    parser.add_argument("--sleep-per-step", type=float, default=0.2, help="seconds each forward sleeps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    add_results_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    result = soak(args, work)  # on a failure the folder stays, with every attempt's log
    minutes = (time.time() - start) / 60
    rows = [[mode, count] for mode, count in result["outcomes"].items()]
    rows += [
        ["interruptions (total)", sum(result["outcomes"].values())],
        ["restarts", result["attempts"] - 1],
        ["restarts that lost a completed step", result["lost_steps"]],
        ["SIGTERM stops without their stop checkpoint", result["stop_checkpoints_missing"]],
        ["metrics.jsonl lists every step once", result["every_step_logged_once"]],
        ["final weights bitwise equal to the uninterrupted run", result["bitwise_equal"]],
    ]
    body = markdown_table(["soak (2 gloo ranks, faults_lm, 1 loader worker per rank)", "value"], rows)
    print(body)
    append_section(
        args.results,
        "Fault soak: random kills and restarts",
        device_description(),
        [
            f"{args.steps} steps, checkpoint every 2, {args.sleep_per_step} s sleep per step, "
            f"kill schedule seed {args.seed}; {minutes:.1f} min wall"
        ],
        body,
    )
    print(json.dumps(result))
    if result["lost_steps"] or result["stop_checkpoints_missing"] or not result["bitwise_equal"]:
        sys.exit(f"soak failed; logs in {work}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
