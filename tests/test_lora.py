"""LoRA in process: targets and config errors, exact step-0 equality with the base model, the
merge, the merged export against base + adapters, and the adapter files loaded with peft."""

from __future__ import annotations

import dataclasses

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bagel_titan.checkpoint.export import export_weights
from bagel_titan.config import ConfigError, load_job_config
from bagel_titan.config.job_config import LoRA
from bagel_titan.errors import UserError
from bagel_titan.lora import (
    LoRAExport,
    LoRALinear,
    apply_lora,
    init_adapters,
    lora_modules,
    merge_lora_weight,
)
from bagel_titan_plugins.bagel.config import architecture_from_release, bagel_config_from_release
from bagel_titan_plugins.bagel.parity import load_fixture_batch, load_fixture_model
from bagel_titan_plugins.bagel.spec import BagelSpec, bagel_loss_term, bagel_outputs, build_bagel
from bagel_titan_plugins.bagel.weights import detect, load_from_source, load_weights, read_architecture
from bagel_titan_plugins.losses.ce import CELoss
from bagel_titan_plugins.losses.flow_mse import FlowMSELoss
from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions
from conftest import REFERENCE_SEED0

FIXTURE = str(REFERENCE_SEED0)


def meta_fixture_model():
    with open(os.path.join(FIXTURE, "config.json")) as f:
        release = json.load(f)
    with torch.device("meta"):
        return build_bagel(
            architecture_from_release(release, vit_config_counts_extra_layer=False),
            bagel_config_from_release(release),
        )


def lora_fixture_model(config: LoRA, randomise_b: bool = True):
    """The fixture's model with adapters injected on the meta device (as the trainer does),
    weights loaded, adapters initialised; B made non-zero unless told otherwise."""
    model = meta_fixture_model()
    apply_lora(model, BagelSpec(), config)
    model.to_empty(device="cpu")
    load_from_source(model, detect(FIXTURE), FIXTURE)
    init_adapters(model, seed=0)
    if randomise_b:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in lora_modules(model).values():
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)
    return model


def loss_and_hidden(model, batch):
    r = model(batch, keep_intermediates=True)
    out = bagel_outputs(r, batch)
    ce, mse = (
        bagel_loss_term(CELoss(CEOptions()), out, batch),
        bagel_loss_term(FlowMSELoss(FlowMSEOptions()), out, batch),
    )
    return ce.sum / ce.count + mse.sum / mse.count, r.intermediates["last_hidden_state"]


CONFIG = LoRA(
    enable=True,
    rank=4,
    alpha=8.0,
    targets=["und", "gen", "vit.q_proj", "connector", "vae2llm"],
    train_also=["llm2vae"],
)


def test_targets_resolve_to_linears_and_everything_else_is_frozen():
    model = lora_fixture_model(CONFIG)
    adapted = lora_modules(model)
    layers = len(model.language_model.model.layers)
    assert len(adapted) == 14 * layers + len(model.vit_model.vision_model.encoder.layers) + 2 + 1
    assert "language_model.model.layers.0.mlp_moe_gen.down_proj" in adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in adapted for p in ("lora_A", "lora_B")} | {
        "llm2vae.weight",
        "llm2vae.bias",
    }
    # The official keys are where they were: only the adapters are new.
    base = load_fixture_model(FIXTURE)
    adapters = {f"{m}.{p}" for m in adapted for p in ("lora_A", "lora_B")}
    assert set(model.state_dict()) - set(base.state_dict()) == adapters


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(targets=["und.qproj"]), "'und.qproj' matches no module"),
        (dict(targets=["decoder"]), "valid targets: und, und.q_proj"),
        (dict(train_also=["lm_head"]), "valid groups: llm, vit, connector"),
        (dict(targets=["und"], train_also=["llm"]), "trained in full or through adapters"),
    ],
)
def test_a_target_that_matches_nothing_names_the_valid_ones(bad, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        apply_lora(meta_fixture_model(), BagelSpec(), LoRA(enable=True, **bad))


def test_empty_targets_take_the_model_specs_default_groups():
    """The core's default names no model: empty targets are the spec's `default_targets`
    (BAGEL: both experts), and a spec without defaults asks for them by name."""
    adapted = apply_lora(meta_fixture_model(), BagelSpec(), LoRA(enable=True))
    assert adapted == apply_lora(meta_fixture_model(), BagelSpec(), LoRA(enable=True, targets=["und", "gen"]))
    assert adapted and all(".mlp" in n or ".self_attn" in n for n in adapted)

    class NoDefaults(BagelSpec):
        def lora_groups(self, model):
            return dataclasses.replace(super().lora_groups(model), default_targets=[])

    with pytest.raises(UserError, match=r"targets is empty .*\(valid: und, und\.q_proj"):
        apply_lora(meta_fixture_model(), NoDefaults(), LoRA(enable=True))


def test_config_values_are_checked_once_in_the_config():
    for args, message in [
        (["--lora.rank", "0"], "rank must be >= 1"),
        (["--lora.dropout", "1.0"], "dropout must be in"),
        (
            ["--lora.enable", "true", "--lora.base_dtype", "bfloat16"],
            'needs \\[training\\] dtype = "bfloat16"',
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_job_config(args)
    cfg, _ = load_job_config(
        ["--lora.enable", "true", "--lora.base_dtype", "bfloat16", "--training.dtype", "bfloat16"]
    )
    assert cfg.lora.base_dtype == "bfloat16"


def test_step0_loss_equals_the_base_models_exactly():
    """B = 0: adding the adapters changes no bit of the forward."""
    batch, _, _ = load_fixture_batch(FIXTURE)
    base_loss, base_hidden = loss_and_hidden(load_fixture_model(FIXTURE), batch)
    lora_loss, lora_hidden = loss_and_hidden(lora_fixture_model(CONFIG, randomise_b=False), batch)
    assert torch.equal(base_hidden, lora_hidden)
    assert base_loss.item() == lora_loss.item()


def test_gradients_reach_only_the_trainable_parameters():
    model = lora_fixture_model(CONFIG)
    batch, _, _ = load_fixture_batch(FIXTURE)
    loss_and_hidden(model, batch)[0].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(model.get_submodule(m).lora_A.grad.abs().sum() > 0 for m in lora_modules(model))


def test_merged_tensor_is_base_plus_scaled_b_a():
    linear = torch.nn.Linear(6, 5)
    lora = LoRALinear(linear, rank=3, alpha=6.0, dropout=0.0, dtype=torch.float32)
    a, _ = LoRALinear.initial_adapters(3, 6, 5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(torch.randn(5, 3))
    merged = merge_lora_weight(linear.weight, lora.lora_A, lora.lora_B, lora.scaling)
    torch.testing.assert_close(merged, linear.weight + 2.0 * lora.lora_B @ lora.lora_A, rtol=0, atol=1e-6)
    x = torch.randn(4, 6)
    torch.testing.assert_close(torch.nn.functional.linear(x, merged, linear.bias), lora(x), rtol=0, atol=1e-5)
    # bf16 base: merged in fp32, rounded once.
    bf16 = merge_lora_weight(linear.weight.bfloat16(), lora.lora_A, lora.lora_B, lora.scaling)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(
        bf16, (linear.weight.bfloat16().float() + 2.0 * lora.lora_B @ lora.lora_A).bfloat16()
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The LoRA fixture model (non-zero B) exported in fp32, and its own forward."""
    model = lora_fixture_model(CONFIG)
    batch, _, _ = load_fixture_batch(FIXTURE)
    with torch.no_grad():
        loss, hidden = loss_and_hidden(model, batch)
    folder = tmp_path_factory.mktemp("export") / "final"
    export_weights(
        BagelSpec(), model, str(folder), torch.float32, lora=CONFIG, base_model_name_or_path=FIXTURE
    )
    return model, folder, loss, hidden


def test_merged_export_holds_official_keys_and_merged_weights(exported):
    model, folder, _, _ = exported
    weights = load_file(str(folder / "model.safetensors"))
    base = load_fixture_model(FIXTURE)
    assert set(weights) == set(base.state_dict())  # strictly the official keys, no adapter
    base_sd, lora_sd = base.state_dict(), model.state_dict()
    for name, module in lora_modules(model).items():
        want = (
            base_sd[f"{name}.weight"] + module.scaling * lora_sd[f"{name}.lora_B"] @ lora_sd[f"{name}.lora_A"]
        )
        torch.testing.assert_close(weights[f"{name}.weight"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights["llm2vae.weight"], lora_sd["llm2vae.weight"], rtol=0, atol=0)
    assert torch.equal(weights["language_model.lm_head.weight"], base_sd["language_model.lm_head.weight"])


def test_forward_of_the_merged_export_equals_base_plus_adapters(exported):
    _, folder, loss, hidden = exported
    # A fresh model built from the export's own configs; `load_weights` checks the keys strictly.
    arch, options = read_architecture(str(folder))
    with torch.device("meta"):
        fresh = build_bagel(arch, options)
    fresh.to_empty(device="cpu")
    assert load_weights(fresh, str(folder)) == "official"
    batch, _, _ = load_fixture_batch(FIXTURE)
    with torch.no_grad():
        merged_loss, merged_hidden = loss_and_hidden(fresh, batch)
    torch.testing.assert_close(merged_hidden, hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_loss, loss, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())


def test_adapter_files_load_with_peft(exported):
    """`adapter/` is peft's format: PeftModel.from_pretrained on the base model gives our forward,
    and peft's own merge gives our merged export."""
    peft = pytest.importorskip("peft")  # a [test] dependency: skipped only outside `make setup`
    model, folder, loss, hidden = exported
    adapter = folder / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.llm2vae.weight" in keys
    assert len(keys) == 2 * len(lora_modules(model)) + 2

    peft_model = peft.PeftModel.from_pretrained(load_fixture_model(FIXTURE), str(adapter))
    batch, _, _ = load_fixture_batch(FIXTURE)
    with torch.no_grad():
        peft_loss, peft_hidden = loss_and_hidden(peft_model.base_model.model, batch)
    torch.testing.assert_close(peft_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft_loss, loss, rtol=1e-6, atol=1e-6)
    merged = peft_model.merge_and_unload().state_dict()
    ours = load_file(str(folder / "model.safetensors"))
    for name in lora_modules(model):
        torch.testing.assert_close(ours[f"{name}.weight"], merged[f"{name}.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["llm2vae.weight"], merged["llm2vae.weight"], rtol=0, atol=0)


def test_export_plan_is_per_tensor():
    """What a streaming export calls for each official key."""
    model = lora_fixture_model(CONFIG)
    sd = model.state_dict()
    plan = LoRAExport.of(model, CONFIG)
    key = "language_model.model.layers.0.self_attn.q_proj"
    assert plan.skip(f"{key}.lora_A") and not plan.skip(f"{key}.weight")
    merged = plan.merged(f"{key}.weight", sd[f"{key}.weight"], sd.__getitem__)
    scaling = CONFIG.alpha / CONFIG.rank
    torch.testing.assert_close(
        merged, sd[f"{key}.weight"] + scaling * sd[f"{key}.lora_B"] @ sd[f"{key}.lora_A"]
    )
    assert plan.merged(f"{key}.bias", sd[f"{key}.bias"], sd.__getitem__) is sd[f"{key}.bias"]
    assert LoRAExport.of(load_fixture_model(FIXTURE), CONFIG) is None


def test_base_dtype_keeps_the_frozen_base_in_bf16_and_the_trainable_in_dtype():
    model = meta_fixture_model()
    apply_lora(
        model,
        BagelSpec(),
        LoRA(enable=True, targets=["gen.q_proj"], train_also=["connector"], base_dtype="bfloat16"),
    )
    dtypes = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert dtypes["language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"] == (torch.bfloat16, False)
    assert dtypes["language_model.model.layers.0.self_attn.q_proj_moe_gen.lora_A"] == (torch.float32, True)
    assert dtypes["connector.fc1.weight"] == (torch.float32, True)
    assert {d for d, trainable in dtypes.values() if not trainable} == {torch.bfloat16}
