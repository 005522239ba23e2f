"""The few-GPU mode on 2 gloo ranks: FSDP2 CPU offload of parameters, gradients and optimizer
state, the EMA shadow in host memory, activation checkpointing, and an exact resume."""

from __future__ import annotations

import pytest

from bagel_titan_plugins.data.example_data import ensure_example_data
from conftest import run_bagel_titan
from test_e2e_debug import debug_args, logged_steps, losses, resume_from_step_2


@pytest.fixture(scope="module")
def example_data(tmp_path_factory) -> dict[str, str]:
    return ensure_example_data(str(tmp_path_factory.mktemp("example") / "data"))


@pytest.mark.dist
@pytest.mark.slow
def test_offload_with_host_ema_and_ac_resumes_exactly(tmp_path, example_data):
    """4 steps straight == a new job resumed from that run's step-2 checkpoint for 2 more: the
    same losses and the same exported EMA."""
    common = [
        "--training.deterministic",
        "true",
        "--checkpoint.interval",
        "2",
        "--data.num_workers",
        "1",
        "--parallelism.cpu_offload",
        "true",
        "--ema.device",
        "cpu",
        "--ema.decay",
        "0.5",
        "--activation_checkpoint.mode",
        "full",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_bagel_titan(debug_args(straight, example_data, 4, *common), nproc=2)
    resume_from_step_2(straight / "run", resumed)
    run_bagel_titan(debug_args(resumed, example_data, 4, *common), nproc=2)
    assert logged_steps(straight / "run") == [1, 2, 3, 4] and logged_steps(resumed / "run") == [3, 4]
    a, b = losses(straight / "run", "loss"), losses(resumed / "run", "loss")
    assert a[2:] == b  # bitwise: the same floats in the JSON
    exported = [
        (run / "run" / "exports" / "final" / "ema.safetensors").read_bytes() for run in (straight, resumed)
    ]
    assert exported[0] == exported[1]
