"""The main job end to end: the debug config on the example data, with each attention backend,
and exact resume of a 2-rank BAGEL run."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from bagel_titan_plugins.data.example_data import ensure_example_data
from conftest import REPO, run_bagel_titan, train_in_process

# End-to-end runs of the job: most launch it; the short one-rank runs use the Trainer in this
# process (`train_in_process`).
pytestmark = [pytest.mark.dist, pytest.mark.slow]

DEBUG_CONFIG = str(REPO / "train_configs" / "debug_model.toml")


@pytest.fixture(scope="module")
def example_data(tmp_path_factory) -> dict[str, str]:
    return ensure_example_data(str(tmp_path_factory.mktemp("example") / "data"))


def debug_args(run_folder: Path, data: dict[str, str], steps: int, *extra: str) -> list[str]:
    return [
        "--job.config_file",
        DEBUG_CONFIG,
        "--job.dump_folder",
        str(run_folder),
        "--job.run_name",
        "run",
        "--model.tokenizer_path",
        data["tokenizer"],
        "--data.datasets",
        f'[{{path = "{data["data"]}"}}]',
        "--training.steps",
        str(steps),
        "--training.device",
        "cpu",
        "--metrics.log_freq",
        "1",
        "--data.num_workers",
        "0",
        "--bagel.vae_path",
        "",  # a random VAE: fitting one takes a minute (tests/test_bagel_vae_fit.py)
        "--bagel.sampling.data_folder",
        data["samples"],
        "--validation.enable",
        "false",
        *extra,
    ]


def is_finite(value) -> bool:
    """metrics.jsonl writes a non-finite value as null."""
    return isinstance(value, float) and math.isfinite(value)


def losses(run: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def test_debug_run_learns_and_writes_everything(tmp_path, example_data):
    """60 steps on one rank, with the Trainer in this process (`train_in_process`)."""
    train_in_process(
        debug_args(
            tmp_path,
            example_data,
            60,
            "--validation.enable",
            "true",
            "--validation.interval",
            "30",
            "--bagel.sampling.prompts",
            '["a large red circle on a white background"]',
            "--bagel.sampling.num_steps",
            "4",
            "--bagel.sampling.image_size",
            "[48, 64]",
            "--checkpoint.interval",
            "30",
        )
    )
    run = tmp_path / "run"
    assert all(is_finite(v) for v in losses(run, "loss"))  # the config's backend, sdpa, trains
    ce, mse = losses(run, "loss/ce"), losses(run, "loss/flow_mse")
    assert len(ce) == 60 and len(mse) == 60
    # A pack without a generated image (or without answer text) logs 0 for that term (count 0):
    # compare the steps that had one.
    ce, mse = [v for v in ce if v > 0], [v for v in mse if v > 0]
    assert len(ce) >= 40 and len(mse) >= 40, (ce, mse)
    assert sum(ce[-10:]) / 10 < 0.7 * sum(ce[:10]) / 10, ce
    assert sum(mse[-10:]) / 10 < 0.9 * sum(mse[:10]) / 10, mse
    # Checkpoints, the export, samples and TensorBoard.
    assert (run / "checkpoint" / "step-60" / "COMPLETE").exists()
    export = run / "exports" / "final"
    for name in (
        "ema.safetensors",
        "ae.safetensors",
        "config.json",
        "llm_config.json",
        "vit_config.json",
        "tokenizer.json",
    ):
        assert (export / name).exists(), name
    pngs = sorted(p.name for p in (run / "samples" / "step-60").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].startswith("gen_0")
    texts = (run / "samples" / "step-60" / "texts.md").read_text()
    assert texts.count("question: ") == 3 and texts.count("answer: ") == 3
    assert any((run / "tb").iterdir())
    # The export loads back into a fresh model in the official layout, as bf16 values.
    from safetensors.torch import load_file

    from synthetic_bagel import build_bagel_for_tests
    from bagel_titan_plugins.bagel.weights import load_weights

    model = build_bagel_for_tests("debug")
    assert load_weights(model, str(export)) == "official"
    exported = load_file(str(export / "ema.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], exported[name].float())


# sdpa, the debug config's backend, is the one test_debug_run_learns_and_writes_everything trains.
@pytest.mark.parametrize("backend", ["eager", "nsa"])
def test_each_other_backend_trains_the_debug_model(tmp_path, example_data, backend):
    extra = [
        "--attention.backend",
        backend,
        "--checkpoint.enable",
        "false",
        "--checkpoint.export_at_end",
        "false",
    ]
    if backend == "nsa":  # small blocks so the tiny packs exercise every NSA branch
        extra += [
            "--attention.nsa.block_size",
            "16",
            "--attention.nsa.kernel_size",
            "8",
            "--attention.nsa.kernel_stride",
            "4",
            "--attention.nsa.topk",
            "4",
            "--attention.nsa.window_size",
            "32",
        ]
    train_in_process(debug_args(tmp_path, example_data, 3, *extra))
    logged = losses(tmp_path / "run", "loss")
    assert len(logged) == 3 and all(is_finite(v) for v in logged), logged


# Deterministic fp32, gradient accumulation, a loader worker, a checkpoint every 2 steps.
RESUME = [
    "--training.deterministic",
    "true",
    "--training.grad_accum_steps",
    "2",
    "--checkpoint.interval",
    "2",
    "--checkpoint.export_at_end",
    "false",
    "--data.num_workers",
    "1",
]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, example_data) -> Path:
    """4 steps straight on 2 ranks (RESUME), checkpoints at steps 2 and 4: the reference of both
    resume tests below, which start new jobs from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("two_rank")
    run_bagel_titan(debug_args(root, example_data, 4, *RESUME), nproc=2)
    return root / "run"


def resume_from_step_2(source: Path, run_folder: Path) -> None:
    """A new run folder holding only `source`'s step-2 checkpoint: a job there resumes from it."""
    step2 = Path("checkpoint") / "step-2"
    assert (source / step2 / "COMPLETE").exists()
    shutil.copytree(source / step2, run_folder / "run" / step2)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_bagel_resume_is_exact(tmp_path, example_data, two_rank_run):
    """4 steps straight == a new 2-rank job resumed from that run's step-2 checkpoint for 2 more
    (fp32, deterministic, grad accumulation, the loader worker's position restored)."""
    resume_from_step_2(two_rank_run, tmp_path)
    run_bagel_titan(debug_args(tmp_path, example_data, 4, *RESUME), nproc=2)
    resumed = tmp_path / "run"
    assert logged_steps(two_rank_run) == [1, 2, 3, 4]
    assert logged_steps(resumed) == [3, 4]  # it resumed at step 2
    assert losses(resumed, "loss") == losses(two_rank_run, "loss")[2:]  # bitwise: the same floats in the JSON
    assert losses(resumed, "data/samples") == losses(two_rank_run, "data/samples")[2:]


def test_resume_on_fewer_ranks_restarts_the_data_in_a_new_order(tmp_path, example_data, two_rank_run, caplog):
    """2 ranks save at step 2; 1 rank (in this process) resumes: weights resharded, data positions
    not mappable, so the data restarts with a seed derived from the step (not a replay of the
    first samples)."""
    from bagel_titan.trainer import restart_data_seed

    resume_from_step_2(two_rank_run, tmp_path)
    # No loader worker: on another world size the data positions are not restored anyway.
    caplog.set_level(logging.INFO)
    train_in_process(debug_args(tmp_path, example_data, 3, *RESUME, "--data.num_workers", "0"))
    seed = restart_data_seed(0, 2)
    assert f"data restarts at step 2 with [data] seed {seed}" in caplog.text
    assert seed not in (0, restart_data_seed(0, 4), restart_data_seed(1, 2))
    assert logged_steps(tmp_path / "run") == [3]
    assert is_finite(losses(tmp_path / "run", "loss")[0])
