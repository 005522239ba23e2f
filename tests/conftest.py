"""Shared test fixtures: the toy plugin on the path, subprocess helpers for torchrun runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY_DIR = REPO / "tests" / "toy"
for folder in (TOY_DIR, REPO / "benchmarks"):  # the toy plugin; benchmark helpers tests reuse
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Data the tests need ships with the repository: a test that needs a fixture fails, never skips,
# when it is missing.
FIXTURES = REPO / "tests" / "fixtures"
REFERENCE_SEED0 = FIXTURES / "bagel_reference" / "seed0"
"""A tiny BAGEL in the official layout with one packed batch and every tensor the public
implementation computes for it (format: `fixtures/bagel_reference/README.md`)."""


def reference_dirs() -> list[Path]:
    """seed0 plus any folders in BAGEL_TITAN_REFERENCE_DIRS (colon separated)."""
    extra = [Path(d) for d in os.environ.get("BAGEL_TITAN_REFERENCE_DIRS", "").split(":") if d]
    return [REFERENCE_SEED0, *(d for d in extra if d != REFERENCE_SEED0)]


# Tests run small models on 2 cores: one intra-op thread per process keeps multi-process
# tests from oversubscribing the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [extra.pop("PYTHONPATH", ""), str(TOY_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_bagel_titan(args: list[str], nproc: int = 1, timeout: float = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run `bagel-titan` (under torchrun when nproc > 1) and return the finished process."""
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "bagel_titan.cli", *args,
        ]
    else:
        cmd = [sys.executable, "-m", "bagel_titan.cli", *args]
    proc = subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def toy_args(tmp_path):
    """Command-line arguments of a small toy-model run in a temporary run folder."""
    return [
        "--job.plugins", "bagel_titan_toy",
        "--job.dump_folder", str(tmp_path),
        "--job.run_name", "toy",
        "--model.name", "toy_lm",
        "--model.flavor", "tiny",
        "--data.loader", "toy_synthetic",
        "--data.packing_length", "64",
        "--loss.components", "ce",
        "--attention.backend", "eager",
        "--training.steps", "6",
        "--training.device", "cpu",
        "--metrics.log_freq", "1",
        "--optimizer.lr", "3e-3",
    ]


def small_bagel_options(**overrides):
    """`[bagel]` options sized for the small test images (16 latent and ViT patches per side)."""
    from bagel_titan_plugins.bagel.config import BagelConfig

    return BagelConfig(**{"max_latent_size": 16, "vit_max_num_patch_per_side": 16, **overrides})
