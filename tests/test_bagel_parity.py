"""Parity with the public BAGEL implementation on every reference fixture folder.

Folders: the default seed0 plus any in BAGEL_TITAN_REFERENCE_DIRS (colon separated)."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_SEED0, reference_dirs
from bagel_titan.plugins import get_plugin_manager
from bagel_titan_plugins.bagel.parity import compare_fixture, load_fixture_batch, main

DEFAULT = REFERENCE_SEED0


def fixture_dirs() -> list[str]:
    return [str(d) for d in reference_dirs()]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("folder", fixture_dirs())
def test_every_tensor_and_gradient_matches(folder, backend):
    diffs = compare_fixture(folder, get_plugin_manager().attention_backends.get(backend))
    bad = [f"{d.name}: {d.kind} {d.value:.2e}" for d in diffs if not d.ok]
    assert not bad, "\n".join(bad)
    names = {d.name for d in diffs}
    assert {"total_loss", "last_hidden_state", "ce_per_token"} <= names
    assert any(n.startswith("grad language_model.model.layers.0.self_attn.q_proj_moe_gen") for n in names)


@pytest.mark.parametrize("folder", fixture_dirs())
def test_batch_adapter_drops_the_flex_padding(folder):
    batch, raw, info = load_fixture_batch(folder)
    assert sum(batch.sample_lens) == sum(batch.split_lens) == batch.sequence_length == info["sequence_length"]
    assert len(batch.sample_lens) == info.get("num_real_samples", len(batch.sample_lens))
    noised_tokens = sum(
        h * w for (h, w), n in zip(batch.patchified_vae_latent_shapes, batch.vae_image_noised) if n
    )
    assert noised_tokens == batch.num_mse_tokens


def test_parity_command_passes_and_fails(tmp_path, capsys):
    assert main([str(DEFAULT), "--backend", "eager"]) == 0
    assert "0 above tolerance" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT, broken)
    os.chmod(broken, 0o755)
    weights_file = broken / "weights.safetensors"
    os.chmod(weights_file, 0o644)
    tensors = load_file(weights_file)
    tensors["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"] *= 1.01
    save_file(tensors, weights_file)
    assert main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "mse_pred_velocity" in out
