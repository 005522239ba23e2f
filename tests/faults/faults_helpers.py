"""Helpers of the fault tests (not a conftest.py: `from conftest import` must stay unambiguous):
a jsonl text dataset and the arguments of a `faults_lm` run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_port, subprocess_env

FAULTS_DIR = Path(__file__).resolve().parent


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def text_corpus(n: int) -> list[str]:
    """`n` distinct short documents."""
    return [f"document {i}: " + "abcdefghij"[i % 10] * (3 + i % 7) for i in range(n)]


def faults_args(
    run_folder: Path, datasets: Path | list[Path], *, steps: int = 6, workers: int = 0
) -> list[str]:
    """A `faults_lm` run on `datasets` in `run_folder` (checkpoints every 2 steps)."""
    paths = datasets if isinstance(datasets, list) else [datasets]
    config = run_folder.parent / f"{run_folder.name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("".join(f'[[data.datasets]]\npath = "{p}"\n\n' for p in paths))
    return [
        "--job.config_file",
        str(config),
        "--job.plugins",
        "bagel_titan_faults",
        "--job.dump_folder",
        str(run_folder.parent),
        "--job.run_name",
        run_folder.name,
        "--model.name",
        "faults_lm",
        "--model.flavor",
        "tiny",
        "--data.packing_length",
        "64",
        "--data.num_workers",
        str(workers),
        "--loss.components",
        "ce",
        "--attention.backend",
        "eager",
        "--training.steps",
        str(steps),
        "--training.device",
        "cpu",
        "--training.deterministic",
        "--metrics.log_freq",
        "1",
        "--metrics.enable_tensorboard",
        "false",
        "--optimizer.lr",
        "3e-3",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--checkpoint.export_at_end",
        "false",
    ]


def env() -> dict[str, str]:
    """Extra environment of a faults run: this folder on the path (the plugin lives here)."""
    return {"PYTHONPATH": str(FAULTS_DIR)}


def start_run(args: list[str], log: Path, nproc: int = 2, **extra_env: str) -> subprocess.Popen:
    """Start `bagel-titan` (under torchrun when nproc > 1) in its own process group, output to
    `log`; the caller stops it with `stop_group`."""
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "bagel_titan.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "bagel_titan.cli", *args]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            env=subprocess_env(**env(), **extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in its own session, so a rank and its
    loader workers are not in torchrun's process group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_all(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the run's every process at once (launcher, ranks, loader workers), as a
    scheduler (`scancel`) or `kill -- -<pgid>` on a plain run delivers it."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the run that is still there (all at once: once the launcher is
    gone its ranks are no longer found below it)."""
    signal_all(proc, signal.SIGKILL)
    proc.wait()


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def logged_steps(run_folder: Path) -> list[int]:
    path = run_folder / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def complete_steps(run_folder: Path) -> list[int]:
    folder = run_folder / "checkpoint"
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("step-*/COMPLETE"))
