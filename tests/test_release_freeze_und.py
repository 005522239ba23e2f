"""`[bagel] freeze_und` has the release's semantics (modeling/bagel/qwen2_navit.py, freeze_und):
on the reference fixture, no gradient reaches the understanding experts, the embeddings, the
ViT or the connector, while every generation-side gradient is the one of an unfrozen run (and
of the release, recorded in the fixture's grads.safetensors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_SEED0
from bagel_titan_plugins.bagel.parity import load_fixture_batch, load_fixture_model
from bagel_titan_plugins.bagel.spec import bagel_loss_term, bagel_outputs
from bagel_titan_plugins.losses.ce import CELoss
from bagel_titan_plugins.losses.flow_mse import FlowMSELoss
from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions


def _grads(freeze_und: bool) -> dict[str, torch.Tensor | None]:
    model = load_fixture_model(str(REFERENCE_SEED0))
    if freeze_und:  # the same weights, built with the option on
        model.options = dataclasses.replace(model.options, freeze_und=True)
        for module in model.language_model.modules():
            if hasattr(module, "freeze_und"):
                module.freeze_und = True
    batch, _, _ = load_fixture_batch(str(REFERENCE_SEED0))
    result = model(batch)
    outputs = bagel_outputs(result, batch)
    ce = bagel_loss_term(CELoss(CEOptions()), outputs, batch)
    mse = bagel_loss_term(FlowMSELoss(FlowMSEOptions()), outputs, batch)
    (ce.sum / ce.count + mse.sum / mse.count).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _is_und(name: str) -> bool:
    return name.startswith("language_model.model.") and "_moe_gen" not in name


def _is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or not bool(grad.abs().max() > 0)


@pytest.fixture(scope="module")
def grads():
    return _grads(False), _grads(True)


def test_understanding_vit_and_connector_get_no_gradient(grads):
    free, frozen = grads
    frozen_side = [n for n in frozen if _is_und(n) or n.startswith(("vit_model.", "connector."))]
    assert any(n.startswith("vit_model.") for n in frozen_side) and any(
        n.startswith("connector.") for n in frozen_side
    )
    assert (
        any(".mlp.up_proj" in n for n in frozen_side)
        and "language_model.model.embed_tokens.weight" in frozen_side
    )
    # Without the option these gradients exist, so the zeros below are the option's doing.
    assert all(not _is_zero(free[n]) for n in frozen_side)
    assert [n for n in frozen_side if not _is_zero(frozen[n])] == []


def test_generation_gradients_are_unchanged(grads):
    """The forward is the same function; a generation-side gradient changes only where it ran
    through understanding tokens. In the fixture the only such path is the `<|vision_start|>` /
    `<|vision_end|>` markers inside the noised image's split: they attend to the layer-0 VAE keys
    and values and are attended by the layer-1 VAE queries. So the layer-0 generation k/v (and
    what feeds them: input_layernorm_moe_gen, vae2llm, the timestep MLP) may differ, as they do
    in the release; every other generation gradient, and the lm_head's (the release's
    freeze_und leaves the CE training it), is the unfrozen run's and the release's."""
    free, frozen = grads
    release = load_file(str(REFERENCE_SEED0 / "grads.safetensors"))
    last = len({n.split(".")[3] for n in frozen if n.startswith("language_model.model.layers.")}) - 1
    through_markers = (
        "layers.0.self_attn.k_",
        "layers.0.self_attn.v_",
        "layers.0.input_layernorm_moe_gen",
        "time_embedder.",
        "vae2llm.",
    )
    gen_side = [
        n
        for n in frozen
        if "_moe_gen" in n
        or n.startswith(("time_embedder.", "vae2llm.", "llm2vae."))
        or n == "language_model.lm_head.weight"
    ]
    unchanged = [n for n in gen_side if not any(m in n for m in through_markers)]
    assert f"language_model.model.layers.{last}.self_attn.k_proj_moe_gen.weight" in unchanged
    assert (
        "llm2vae.weight" in unchanged
        and "language_model.model.layers.0.mlp_moe_gen.up_proj.weight" in unchanged
    )
    for name in unchanged:
        assert frozen[name] is not None, name
        torch.testing.assert_close(frozen[name], free[name], rtol=1e-5, atol=1e-7, msg=name)
        want = release[name]
        rel = float((frozen[name] - want).norm()) / max(float(want.norm()), 1e-12)
        assert rel < 1e-4, (name, rel)
    for name in set(gen_side) - set(unchanged):  # still trained, only the marker path is cut
        assert not _is_zero(frozen[name]), name


def test_freeze_und_is_a_bagel_option_with_help():
    from bagel_titan_plugins.bagel.config import BagelConfig
    from synthetic_bagel import build_bagel_for_tests

    model = build_bagel_for_tests(freeze_und=True)
    assert all(layer.freeze_und and layer.self_attn.freeze_und for layer in model.language_model.model.layers)
    assert BagelConfig().freeze_und is False
