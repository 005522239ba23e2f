"""Shared test fixtures: the toy plugin on the path, the fixture paths, and the one set of
helpers that launch processes (`run_bagel_titan`, `run_torchrun`, `start_bagel_titan`).

Markers (registered in pyproject.toml): `dist` for tests that launch processes (torchrun,
subprocesses, mp.spawn), `slow` for tests over ~20 s. `make test-fast` runs the rest."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
    """A free TCP port on localhost (for tests that start their own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: the toy plugin and the benchmark helpers
    (synthetic batches) importable as in the tests themselves, one thread per process,
    unbuffered output (a killed job's log is complete), plus `extra`."""
    env = dict(os.environ)
    paths = [extra.pop("PYTHONPATH", ""), str(TOY_DIR), str(REPO / "benchmarks"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


_current_test: pytest.Item | None = None


@pytest.fixture(autouse=True)
def _remember_current_test(request):
    """Lets the launch helpers check that the test calling them is marked `dist`."""
    global _current_test
    _current_test = request.node
    yield
    _current_test = None


def _require_dist_marker() -> None:
    """`make test-fast` (-m "not slow and not dist") must not launch processes: a test that does
    and is not marked fails here with the fix, instead of silently slowing the fast subset."""
    if _current_test is not None and _current_test.get_closest_marker("dist") is None:
        raise AssertionError(
            f"{_current_test.nodeid} launches processes: mark it @pytest.mark.dist "
            "(and @pytest.mark.slow if it takes over ~20 s)"
        )


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """The one torchrun command line of the suite: `target` (a script and its arguments, or
    "-m", a module and its arguments) on `nproc` local ranks. `--standalone` picks a free
    rendezvous port itself; no restarts, so a dead rank fails the job."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "--max-restarts",
        "0",
        *target,
    ]


def bagel_titan_cmd(args: list[str], nproc: int = 1) -> list[str]:
    """`bagel-titan ARGS`, under torchrun when nproc > 1."""
    if nproc > 1:
        return torchrun_cmd(nproc, "-m", "bagel_titan.cli", *args)
    return [sys.executable, "-m", "bagel_titan.cli", *args]


def run_command(
    cmd: list[str], timeout: float = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run `cmd` in the repository with the test environment; with `check`, a non-zero exit
    fails the test with the end of its output."""
    _require_dist_marker()
    # Output goes to files, not pipes: a pipe reaches end-of-file only when every process holding
    # it has exited, and each rank with a loader worker leaves a torch_shm_manager (the handoff's
    # shared-memory segments) that lingers for about 1.5 s after the job has ended.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        returncode = subprocess.run(
            cmd, env=subprocess_env(**env), stdout=out, stderr=err, timeout=timeout, cwd=REPO
        ).returncode
        stdout, stderr = (_read_back(f) for f in (out, err))
    proc = subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _read_back(file) -> str:
    """What a finished process wrote into the temporary `file`, as text."""
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")


def run_torchrun(
    nproc: int, *target: str, timeout: float = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run a script or module under torchrun (see `torchrun_cmd`) and return the finished process."""
    return run_command(torchrun_cmd(nproc, *target), timeout=timeout, check=check, **env)


def run_bagel_titan(
    args: list[str], nproc: int = 1, timeout: float = 600, check: bool = True, **env
) -> subprocess.CompletedProcess:
    """Run `bagel-titan` (under torchrun when nproc > 1) and return the finished process."""
    return run_command(bagel_titan_cmd(args, nproc), timeout=timeout, check=check, **env)


def train_in_process(args: list[str]) -> None:
    """What `bagel-titan ARGS` does on one rank (the real Trainer, built, trained, closed), in
    this process: no process start-up to pay, for tests that read only the run folder. torch's
    deterministic-algorithms switch, which the Trainer sets, is put back afterwards."""

    from bagel_titan.config.manager import load_job_config
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    with determinism_restored():
        try:
            job_config, plugins = load_job_config(args)
            trainer = Trainer(job_config, plugins)
            try:
                trainer.train()
            finally:
                trainer.close()
        finally:
            destroy_distributed()


@contextlib.contextmanager
def determinism_restored() -> Iterator[None]:
    """Puts torch's deterministic-algorithms switch back as it was: a Trainer run in the test
    process sets it from `[training] deterministic`."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def start_bagel_titan(args: list[str], log: Path, nproc: int = 1, **env: str) -> subprocess.Popen:
    """Start `bagel-titan` in the background, in its own session (so that `kill_session` ends
    torchrun and every rank), output to `log`."""
    _require_dist_marker()
    with open(log, "w") as out:
        return subprocess.Popen(
            bagel_titan_cmd(args, nproc),
            env=subprocess_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )


def kill_session(proc: subprocess.Popen) -> None:
    """kill -9 a process started by `start_bagel_titan` and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone: nothing left to kill
    proc.wait(timeout=60)


def wait_for(
    predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `predicate` until it holds; fail when `proc` exits first or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"job exited ({proc.returncode}) before {what}:\n" + (log.read_text()[-4000:] if log else "")
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


SHIPPED_7B_CONFIGS = ("bagel_7b.toml", "bagel_7b_nsa.toml", "bagel_7b_lora.toml")


@pytest.fixture(scope="session")
def plans_7b(tmp_path_factory) -> dict[str, dict]:
    """tests/scripts/plan_7b.py's report for each shipped 7B config (by file name): the whole
    parallelize plan applied to the 7B model on the meta device over 2 gloo ranks, the three
    configs one after the other in one launch (test_configs_7b.py, test_lora_train.py)."""
    out = tmp_path_factory.mktemp("plan_7b") / "plans.json"
    configs = [str(REPO / "train_configs" / name) for name in SHIPPED_7B_CONFIGS]
    proc = run_torchrun(2, str(REPO / "tests" / "scripts" / "plan_7b.py"), str(out), *configs, timeout=300)
    print(proc.stdout)  # parameter counts and the memory estimate per rank for 8 GPUs
    return json.loads(out.read_text())


@pytest.fixture
def toy_args(tmp_path):
    """Command-line arguments of a small toy-model run in a temporary run folder (`tmp_path/toy`)."""
    return toy_cli_args(tmp_path)


def toy_cli_args(dump_folder: Path, run_name: str = "toy") -> list[str]:
    """Command-line arguments of a small toy-model run in `dump_folder/run_name`: the real
    Trainer with the toy model spec of tests/toy/bagel_titan_toy.py as a plugin."""
    return [
        "--job.plugins",
        "bagel_titan_toy",
        "--job.dump_folder",
        str(dump_folder),
        "--job.run_name",
        run_name,
        "--model.name",
        "toy_lm",
        "--model.flavor",
        "tiny",
        "--data.loader",
        "toy_synthetic",
        "--data.packing_length",
        "64",
        "--loss.components",
        "ce",
        "--attention.backend",
        "eager",
        "--training.steps",
        "6",
        "--training.device",
        "cpu",
        "--metrics.log_freq",
        "1",
        "--optimizer.lr",
        "3e-3",
    ]


# What must be bitwise equal between two runs at the same step (not the timings).
TOY_STEP_KEYS = ("loss", "loss/ce", "grad_norm", "lr", "tokens_seen", "data/packs")


def toy_trace(run: Path, kind: str) -> list[dict]:
    """The `kind` ("start" or "step") records of a toy run's `[toy] trace`, oldest first."""
    path = run / "toy_trace.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if r["kind"] == kind]


def toy_step_values(record: dict) -> dict:
    """A `toy_trace` step record without its timings: the metrics in TOY_STEP_KEYS, weights and EMA checksums, data positions."""
    metrics = record["metrics"]
    assert all(key in metrics for key in TOY_STEP_KEYS), metrics
    return {
        "step": record["step"],
        **{k: metrics[k] for k in TOY_STEP_KEYS},
        "model": record["model"],
        "ema": record["ema"],
        "positions": record["positions"],
    }


def small_bagel_options(**overrides):
    """`[bagel]` options sized for the small test images (16 latent and ViT patches per side)."""
    from bagel_titan_plugins.bagel.config import BagelConfig

    return BagelConfig(**{"max_latent_size": 16, "vit_max_num_patch_per_side": 16, **overrides})


def fsdp_bagel_from_folder(folder: str, world: int):
    """The BAGEL of `folder`'s configs built on the meta device, FSDP2-sharded per ViT and LLM
    layer and at the root over a `world`-rank CPU mesh, then materialised (uninitialised)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bagel_titan_plugins.bagel.spec import build_bagel
    from bagel_titan_plugins.bagel.weights import read_architecture

    arch, options = read_architecture(str(folder))
    with torch.device("meta"):
        model = build_bagel(arch, options)
    mesh = init_device_mesh("cpu", (world,))
    for layer in list(model.vit_model.vision_model.encoder.layers) + list(model.language_model.model.layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    return model
