"""LoRA end to end: the debug config with `--lora.enable true --lora.rank 8` trains, starts at the
base model's loss, exports merged weights that load strictly into a fresh model plus peft-format
adapters; a 2-rank FSDP2 LoRA run with AC, EMA and gradient accumulation resumes bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_titan_plugins.data.example_data import ensure_example_data
from conftest import run_bagel_titan, train_in_process
from test_e2e_debug import debug_args, logged_steps, losses, resume_from_step_2

LORA = ["--lora.enable", "true", "--lora.rank", "8"]


def assert_export_is_merged(
    export: Path, step_folder: Path, tmp_path: Path, gen_trained: bool = True
) -> dict[str, torch.Tensor]:
    """Merged = frozen base (from the checkpoint) + alpha/r * B A of the exported (EMA) adapters,
    exactly in bf16, for the first (und) and last (gen) adapted projections; returns the adapter
    file. The gen adapters train only when a gradient reaches them (see `gen_trained`)."""
    merged = load_file(str(export / "ema.safetensors"))
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    adapters = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    base = checkpoint_model_state(step_folder, tmp_path)
    checked = config["target_modules"][:3] + config["target_modules"][-3:]
    assert len(checked) == 6
    for i, module in enumerate(checked):
        a = adapters[f"base_model.model.{module}.lora_A.weight"]
        b = adapters[f"base_model.model.{module}.lora_B.weight"]
        if i < 3 or gen_trained:
            assert b.abs().max() > 0, module  # trained
        want = (base[f"{module}.weight"] + 4.0 * b @ a).bfloat16()
        torch.testing.assert_close(merged[f"{module}.weight"], want, rtol=0, atol=0)
    return adapters


@pytest.fixture(scope="module")
def example_data(tmp_path_factory) -> dict[str, str]:
    return ensure_example_data(str(tmp_path_factory.mktemp("example") / "data"))


def checkpoint_model_state(step_folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_folder), str(tmp_path / "ckpt.pt"))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    return state["model"]


@pytest.mark.dist
@pytest.mark.slow
def test_debug_lora_run_trains_from_the_base_loss_and_exports_merged(tmp_path, example_data):
    """One rank: the LoRA run's first loss is the base model's, its loss goes down, and its export
    is merged weights plus peft adapters. Both runs use the Trainer in this process
    (`train_in_process`; marked `dist` and `slow` with the other end-to-end runs)."""
    common = ["--lr_scheduler.warmup_steps", "2", "--ema.decay", "0.5"]
    full, lora = tmp_path / "full", tmp_path / "lora"
    train_in_process(
        debug_args(
            full,
            example_data,
            1,
            *common,
            "--checkpoint.enable",
            "false",
            "--checkpoint.export_at_end",
            "false",
        )
    )
    # The random base's llm2vae is zero, which blocks every gradient to the generation experts:
    # trained in full beside the adapters, it opens that path (and covers peft's modules_to_save).
    # Adapters start at B = 0 and learn with a higher lr than a full fine-tune, as LoRA usually does.
    train_in_process(
        debug_args(
            lora,
            example_data,
            30,
            *common,
            *LORA,
            "--checkpoint.interval",
            "30",
            "--lora.train_also",
            '["llm2vae"]',
            "--optimizer.lr",
            "1e-2",
        )
    )
    run = lora / "run"
    # Step 1's loss is measured before any update: with B = 0 it is the base model's, bitwise.
    assert losses(run, "loss")[0] == losses(full / "run", "loss")[0]
    loss = losses(run, "loss")
    # Rank-8 adapters on a random 1M-parameter base: clearly down in 30 steps (the full
    # fine-tune does more; tests/test_e2e_debug.py).
    assert sum(loss[-5:]) / 5 < 0.97 * sum(loss[:5]) / 5, loss

    export = run / "exports" / "final"
    from synthetic_bagel import build_bagel_for_tests
    from bagel_titan_plugins.bagel.weights import load_weights

    fresh = build_bagel_for_tests("debug")
    assert load_weights(fresh, str(export)) == "official"  # strict: exactly the official keys
    merged = load_file(str(export / "ema.safetensors"))
    assert set(merged) == set(fresh.state_dict())
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32.0
    assert len(config["target_modules"]) == 14 * len(
        fresh.language_model.model.layers
    )  # und + gen, 7 projections
    adapters = assert_export_is_merged(export, run / "checkpoint" / "step-30", tmp_path)
    torch.testing.assert_close(
        merged["llm2vae.weight"], adapters["base_model.model.llm2vae.weight"].bfloat16(), rtol=0, atol=0
    )
    assert adapters["base_model.model.llm2vae.weight"].abs().max() > 0
    assert config["modules_to_save"] == ["llm2vae"]


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_lora_resume_is_bitwise(tmp_path, example_data):
    """4 steps straight == a new job resumed from that run's step-2 checkpoint for 2 more: FSDP2
    on 2 gloo ranks, full activation checkpointing, EMA, gradient accumulation, adapters plus a
    module trained in full."""
    common = [
        *LORA,
        "--lora.train_also",
        '["connector"]',
        "--training.deterministic",
        "true",
        "--training.grad_accum_steps",
        "2",
        "--activation_checkpoint.mode",
        "full",
        "--checkpoint.interval",
        "2",
        "--checkpoint.export_at_end",
        "false",
        "--data.num_workers",
        "1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_bagel_titan(
        debug_args(straight, example_data, 4, *common, "--checkpoint.export_at_end", "true"), nproc=2
    )
    resume_from_step_2(straight / "run", resumed)
    run_bagel_titan(debug_args(resumed, example_data, 4, *common), nproc=2)
    assert logged_steps(straight / "run") == [1, 2, 3, 4] and logged_steps(resumed / "run") == [3, 4]
    a, b = losses(straight / "run", "loss"), losses(resumed / "run", "loss")
    assert a[2:] == b  # bitwise
    assert losses(straight / "run", "grad_norm")[2:] == losses(resumed / "run", "grad_norm")
    # The streaming export gathers each sharded base weight with its A and B and merges it.
    # (The random debug base's llm2vae is zero and not trained here: no gradient reaches the gen adapters.)
    assert_export_is_merged(
        straight / "run" / "exports" / "final",
        straight / "run" / "checkpoint" / "step-4",
        tmp_path,
        gen_trained=False,
    )


@pytest.mark.dist
@pytest.mark.slow
def test_7b_lora_recipe_applies_on_meta_with_two_ranks(plans_7b):
    """train_configs/bagel_7b_lora.toml: adapters injected into the 7B model on the meta device,
    then AC and FSDP2 over 2 gloo ranks; exactly the adapters are trainable (its memory
    arithmetic counts 80.7M of them)."""
    report = plans_7b["bagel_7b_lora.toml"]
    adapters = 16 * 180_224 * 28  # rank x (in + out) summed over 7 projections and 2 experts, 28 layers
    assert report["params_trainable"] == adapters == 80_740_352
    assert abs(report["params_total"] - 14_607_000_000 - adapters) < 1_000_000
    assert report["fsdp_units"] == report["units"] and report["root_is_fsdp"] and report["all_meta"]


@pytest.mark.dist
@pytest.mark.slow
def test_bench_lora_records_both_rows(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    results = tmp_path / "RESULTS.md"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_lora.py"),
        "--models",
        "debug",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--packing-length",
        "256",
        "--rank",
        "4",
        "--results",
        str(results),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## bench_lora" in text and "| debug |" in text and "skipped" not in text
    assert "full fine-tune" in text and "LoRA r=4 (und+gen)" in text
