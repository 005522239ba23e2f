"""BAGEL model behaviour beyond the fixture: packing isolation, missing modalities, noise,
freeze groups, options, and the spec through the plugin manager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import REFERENCE_SEED0
from bagel_titan.config.job_config import JobConfig
from bagel_titan.plugins import PluginManager
from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for
from bagel_titan_plugins.bagel.spec import BagelSpec, bagel_loss_term, bagel_outputs
from synthetic_bagel import build_bagel_for_tests
from synthetic_bagel import Text, VaeImage, VitImage, synthetic_batch
from bagel_titan_plugins.losses.ce import CELoss
from bagel_titan_plugins.losses.flow_mse import FlowMSELoss
from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions

ARCH = architecture_for("debug")
OPTS = BagelConfig()
TEXT_ONLY = [Text(5, loss=False), Text(6)]
UNDERSTANDING = [VitImage(3, 4), Text(4, loss=False), Text(5)]
EDITING = [Text(3, loss=False), VaeImage(2, 3, noised=False), VitImage(2, 2), VaeImage(2, 3, noised=True)]


@pytest.fixture(scope="module")
def model():
    return build_bagel_for_tests("debug", seed=0)


def _randomise_zero_init(model):
    """llm2vae starts at zero; give it values so the velocity path carries gradients."""
    with torch.no_grad():
        model.llm2vae.weight.normal_(std=0.02)


def _loss(model, batch, generator=None):
    r = model(batch, generator)
    out = bagel_outputs(r, batch)
    ce, mse = (
        bagel_loss_term(CELoss(CEOptions()), out, batch),
        bagel_loss_term(FlowMSELoss(FlowMSEOptions()), out, batch),
    )
    return ce.sum / max(ce.count, 1) + mse.sum / max(mse.count, 1), r


def _with_fixed_noise(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = model.vae.encode(batch.padded_images, generator=g) if batch.padded_images is not None else None
    n = int(batch.packed_vae_token_indexes.shape[0])
    counts = [h * w for h, w in batch.patchified_vae_latent_shapes]
    draws = torch.randn(len(counts), generator=g)
    draws[[not f for f in batch.vae_image_noised]] = float("-inf")
    t = torch.repeat_interleave(draws, torch.tensor(counts, dtype=torch.long)) if counts else torch.zeros(0)
    noise = torch.randn(n, model.patch_latent_dim, generator=g)
    return dataclasses.replace(batch, padded_latent=latents, packed_timesteps=t, noise=noise)


def test_samples_in_a_pack_do_not_see_each_other(model):
    samples = [TEXT_ONLY, UNDERSTANDING, EDITING]
    packed = _with_fixed_noise(model, synthetic_batch(ARCH, OPTS, samples))
    out = model(packed, keep_intermediates=True).intermediates["last_hidden_state"]
    start = 0
    vae_row = 0
    for i, sample in enumerate(samples):
        alone = _with_fixed_noise(model, synthetic_batch(ARCH, OPTS, [sample]))
        n_vae = int(alone.packed_vae_token_indexes.shape[0])
        alone = dataclasses.replace(
            alone,
            packed_text_ids=packed.packed_text_ids[
                (packed.packed_text_indexes >= start)
                & (packed.packed_text_indexes < start + alone.sequence_length)
            ],
            packed_vit_tokens=packed.packed_vit_tokens[
                (packed.packed_vit_token_indexes >= start)
                & (packed.packed_vit_token_indexes < start + alone.sequence_length)
            ],
            padded_latent=None if n_vae == 0 else packed.padded_latent,
            packed_timesteps=packed.packed_timesteps[vae_row : vae_row + n_vae],
            noise=packed.noise[vae_row : vae_row + n_vae],
        )
        if n_vae:  # the only VAE sample: the packed latents are its own
            assert packed.padded_latent.shape[0] == len(alone.patchified_vae_latent_shapes)
        got = model(alone, keep_intermediates=True).intermediates["last_hidden_state"]
        torch.testing.assert_close(got, out[start : start + alone.sequence_length], atol=1e-5, rtol=1e-5)
        start += alone.sequence_length
        vae_row += n_vae


def test_clean_condition_has_t0_and_no_loss(model):
    batch = _with_fixed_noise(model, synthetic_batch(ARCH, OPTS, [EDITING]))
    r = model(batch, keep_intermediates=True)
    t = r.intermediates["timesteps_shifted"]
    clean = torch.isinf(batch.packed_timesteps)
    assert clean.sum() == 6 and torch.all(t[clean] == 0) and torch.all(t[~clean] > 0)
    assert r.pred_velocity.shape[0] == batch.num_mse_tokens == 6
    torch.testing.assert_close(
        r.intermediates["noisy_latent_tokens"][clean], r.intermediates["packed_latent_clean"][clean]
    )


@pytest.mark.parametrize(
    "samples",
    [
        pytest.param([TEXT_ONLY], id="no-vit-no-vae"),
        pytest.param([[Text(4, loss=False), VaeImage(2, 2)]], id="no-ce-no-vit"),
        pytest.param([[VitImage(2, 2), Text(3, loss=False)]], id="no-ce-no-vae"),
        pytest.param([UNDERSTANDING], id="no-vae"),
    ],
)
def test_missing_modalities_train(samples):
    model = build_bagel_for_tests("debug", seed=1)
    _randomise_zero_init(model)
    batch = synthetic_batch(ARCH, OPTS, samples)
    loss, _ = _loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # Every trainable parameter gets a gradient (zeros where unused): FSDP ranks never diverge.
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_noise_comes_from_the_generator(model):
    batch = synthetic_batch(ARCH, OPTS, [EDITING])
    a, _ = _loss(model, batch, torch.Generator().manual_seed(1))
    b, _ = _loss(model, batch, torch.Generator().manual_seed(1))
    c, _ = _loss(model, batch, torch.Generator().manual_seed(2))
    assert a.item() == b.item() and a.item() != c.item()


def test_disabled_modalities_reject_their_tokens():
    no_und = build_bagel_for_tests("debug", visual_und=False)
    assert not any(k.startswith(("vit_model", "connector", "vit_pos_embed")) for k in no_und.state_dict())
    with pytest.raises(ValueError, match="visual_und"):
        no_und(synthetic_batch(ARCH, OPTS, [UNDERSTANDING]))
    no_gen = build_bagel_for_tests("debug", visual_gen=False)
    assert no_gen.vae is None and "llm2vae.weight" not in no_gen.state_dict()
    with pytest.raises(ValueError, match="visual_gen"):
        no_gen(synthetic_batch(ARCH, OPTS, [EDITING]))
    loss, _ = _loss(no_gen, synthetic_batch(ARCH, OPTS, [UNDERSTANDING]))
    loss.backward()


def test_oversized_latent_names_the_setting(model):
    small = dataclasses.replace(OPTS, max_latent_size=2)
    batch = synthetic_batch(ARCH, small, [[Text(2), VaeImage(3, 2)]])
    tiny = build_bagel_for_tests("debug", max_latent_size=2)
    with pytest.raises(ValueError, match="max_latent_size"):
        tiny(batch)


def test_vit_side_must_match_the_position_table():
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side = 70"):
        build_bagel_for_tests("debug", vit_max_num_patch_per_side=64)


def test_freeze_groups_and_sharding_units(model):
    spec = BagelSpec()
    cfg = JobConfig()
    names = {id(p): n for n, p in model.named_parameters()}

    def frozen(groups):
        cfg.model.freeze = groups
        return {names[id(p)] for m in spec.frozen_modules(model, cfg) for p in m.parameters()}

    und, gen = frozen(["und"]), frozen(["gen"])
    assert not und & gen
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in und
    assert "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight" in gen and "llm2vae.weight" in gen
    llm = frozen(["llm"])
    assert all(n.startswith("language_model.") for n in llm) and (und | gen) - llm == {
        n for n in gen if not n.startswith("language_model.")
    }
    assert frozen(["vit"]) == {n for n in names.values() if n.startswith("vit_model.")}
    with pytest.raises(ValueError, match="known"):
        frozen(["vae"])
    units = spec.sharding_units(model)
    assert len(units) == ARCH.vit.num_layers + ARCH.llm.num_layers
    assert (
        type(units[0]).__name__ == "SiglipEncoderLayer" and type(units[-1]).__name__ == "Qwen2MoTDecoderLayer"
    )


def test_spec_builds_on_meta_and_trains_through_the_plugin_manager():
    plugins = PluginManager()
    spec = plugins.model_specs.get("bagel")
    cfg = JobConfig()
    cfg.attention.backend = "eager"
    cfg.plugin_sections["bagel"] = BagelConfig()
    with torch.device("meta"):
        model = spec.build(cfg, plugins)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    spec.init_weights(model)
    assert model.latent_pos_embed.pos_embed.abs().sum() > 0 and model.llm2vae.weight.abs().sum() == 0
    batch = synthetic_batch(ARCH, OPTS, [UNDERSTANDING, EDITING])
    outputs = spec.forward(model, batch, torch.Generator().manual_seed(0))
    ce_factory, mse_factory = plugins.loss_components.get("ce"), plugins.loss_components.get("flow_mse")
    ce, mse = (
        bagel_loss_term(ce_factory({}), outputs, batch),
        bagel_loss_term(mse_factory({}), outputs, batch),
    )
    assert ce.count == batch.num_ce_tokens and mse.count == batch.num_mse_tokens == 6
    (ce.sum / ce.count + mse.sum / mse.count).backward()
    # llm2vae starts at zero, so only the CE path carries gradient into the LLM at step 0.
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.llm2vae.weight.grad.abs().sum() > 0
    assert spec.flops(batch) > 0
    assert plugins.config_sections.get("bagel") is BagelConfig


def test_config_errors_name_the_key():
    import json

    from bagel_titan_plugins.bagel.config import architecture_from_release

    with pytest.raises(KeyError, match="7b-mot"):
        architecture_for("7b")
    fixture = REFERENCE_SEED0 / "config.json"
    config = json.loads(fixture.read_text())
    config["llm_config"]["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="llm_config.rope_scaling"):
        architecture_from_release(config, vit_config_counts_extra_layer=False)


HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero"}
"""Ops that copy a device value to the host (a `.tolist()`, `bool(tensor)`, boolean indexing)."""


@pytest.mark.parametrize("strategy", ["dense", "per_document"])
def test_training_forward_reads_nothing_back_from_the_device(strategy):
    """The batch carries its attention metadata and token indexes from the collator, so the
    training forward and backward never wait for the device to learn a length or a mask."""
    from bagel_titan_plugins.attention.sdpa import SDPABackend, SDPAConfig
    from bagel_titan_plugins.bagel.spec import build_bagel

    class Backend:
        def build(self, spec, config):
            return SDPABackend().build(spec, SDPAConfig(strategy=strategy))

    model = build_bagel(ARCH, OPTS, backend=Backend())
    torch.manual_seed(0)
    model.init_weights()
    _randomise_zero_init(model)
    batch = synthetic_batch(ARCH, OPTS, [UNDERSTANDING, EDITING, TEXT_ONLY], torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, _ = _loss(model, batch, torch.Generator().manual_seed(1))
        loss.backward()
    synced = sorted({e.key for e in prof.key_averages()} & HOST_SYNC_OPS)
    assert not synced, f"the training step reads device values on the host through {synced}"


def test_one_rank_bf16_decoder_computes_what_bf16_parameters_compute():
    """One rank trains bf16 under autocast over fp32 master weights; several ranks gather FSDP2's
    bf16 parameters (as the release does). With weights that bf16 represents exactly, the decoder
    gives the same bits both ways, forward and every gradient: the residual stream runs in bf16
    under autocast too, so a config trains alike on one GPU and on many."""
    import copy

    from bagel_titan_plugins.attention.meta import AttentionMeta
    from bagel_titan_plugins.attention.sdpa import SDPABackend
    from bagel_titan_plugins.bagel.modeling_qwen2_mot import MoTRouting, Qwen2MoTModel

    torch.manual_seed(0)
    backend = SDPABackend()
    master = Qwen2MoTModel(ARCH.llm, lambda spec: backend.build(spec, None))
    with torch.no_grad():
        for p in master.parameters():
            p.add_(0.1 * torch.randn_like(p)).copy_(p.to(torch.bfloat16))
    gathered = copy.deepcopy(master).to(torch.bfloat16)  # what FSDP2's param_dtype computes with
    layout = [
        [(5, "causal", "und"), (4, "full", "gen"), (3, "causal", "und")],
        [(7, "causal", "und"), (6, "noise", "gen")],
    ]
    experts = [expert for doc in layout for n, _, expert in doc for _ in range(n)]
    und, gen = (torch.tensor([i for i, e in enumerate(experts) if e == want]) for want in ("und", "gen"))
    routing = MoTRouting.build(und, gen, len(experts))
    positions = torch.cat([torch.arange(sum(n for n, _, _ in doc)) for doc in layout])
    hidden = torch.randn(len(experts), ARCH.llm.hidden_size)
    weight = torch.randn(len(experts), ARCH.llm.hidden_size)

    def step(model: Qwen2MoTModel, h: torch.Tensor, autocast: bool) -> torch.Tensor:
        meta = AttentionMeta.from_segments([[(n, mode) for n, mode, _ in doc] for doc in layout])
        meta.prepare_for(model.layers[0].self_attn.attn_core)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(h, routing, positions, meta)
        (out.float() * weight).sum().backward()
        return out

    out_one_rank = step(master, hidden, autocast=True)
    out_gathered = step(gathered, hidden.to(torch.bfloat16), autocast=False)
    assert out_one_rank.dtype == torch.bfloat16
    assert torch.equal(out_one_rank, out_gathered)
    grads = [
        (n, p.grad, q.grad)
        for (n, p), q in zip(master.named_parameters(), gathered.parameters())
        if n != "embed_tokens.weight"  # the embedding is not used: the test feeds hidden states
    ]
    for name, g_master, g_gathered in grads:
        assert g_master is not None and g_gathered is not None, name
        assert g_master.dtype == torch.float32
        assert torch.equal(g_master.to(torch.bfloat16), g_gathered), name


def test_experts_work_on_padded_rows_that_never_reach_the_pack():
    """In 16-bit compute each expert's rows are padded to a multiple of ROW_MULTIPLE (a few
    shapes over a run, so oneDNN's per-shape bf16 kernels are built once): the padding rows are
    zero going in, dropped coming out, and add nothing to any gradient: an expert's weight
    gradient equals the one computed over its real rows alone. fp32 does not pad."""
    from bagel_titan_plugins.bagel.modeling_qwen2_mot import (
        ROW_MULTIPLE,
        MoTRouting,
        on_padded_rows,
        row_multiple,
    )

    torch.manual_seed(0)
    num_tokens, width = 150, 8
    is_gen = torch.rand(num_tokens) < 0.4
    und, gen = torch.nonzero(~is_gen)[:, 0], torch.nonzero(is_gen)[:, 0]
    routing = MoTRouting.build(und, gen, num_tokens, ROW_MULTIPLE)
    experts = (torch.nn.Linear(width, width), torch.nn.Linear(width, width))
    x = torch.randn(num_tokens, width, requires_grad=True)
    weight = torch.randn(num_tokens, width)

    x_und, x_gen = routing.split(x)
    assert x_und.shape[0] % ROW_MULTIPLE == 0 and x_gen.shape[0] % ROW_MULTIPLE == 0
    assert torch.equal(x_und[: und.numel()], x[und]) and not x_und[und.numel() :].any()
    assert torch.equal(x_gen[: gen.numel()], x[gen]) and not x_gen[gen.numel() :].any()
    out = routing.merge(experts[0](x_und), experts[1](x_gen))
    assert out.shape == (num_tokens, width)
    (out * weight).sum().backward()

    reference_x = x.detach().clone().requires_grad_()
    reference = torch.empty(num_tokens, width)
    reference_experts = [torch.nn.Linear(width, width) for _ in experts]
    for mine, theirs, rows in zip(experts, reference_experts, (und, gen)):
        theirs.load_state_dict(mine.state_dict())
        reference = reference.index_put((rows,), theirs(reference_x[rows]))
    (reference * weight).sum().backward()
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-6)
    for mine, theirs in zip(experts, reference_experts):
        assert torch.allclose(mine.weight.grad, theirs.weight.grad, atol=1e-5)
        assert torch.allclose(mine.bias.grad, theirs.bias.grad, atol=1e-5)

    head = torch.nn.Linear(width, 3)
    rows_seen: list[int] = []

    def recorded_head(rows: torch.Tensor) -> torch.Tensor:
        rows_seen.append(rows.shape[0])
        return head(rows)

    inputs = torch.randn(ROW_MULTIPLE + 5, width, requires_grad=True)
    assert row_multiple(inputs) == 1 and on_padded_rows(recorded_head, inputs).shape[0] == rows_seen[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert row_multiple(inputs) == ROW_MULTIPLE
        padded_out = on_padded_rows(recorded_head, inputs)
        plain_out = head(inputs)
    assert rows_seen[-1] == 2 * ROW_MULTIPLE and padded_out.shape == plain_out.shape
    assert torch.allclose(padded_out, plain_out, atol=1e-2)
    padded_grads = torch.autograd.grad(padded_out.float().sum(), [inputs, head.weight])
    plain_grads = torch.autograd.grad(plain_out.float().sum(), [inputs, head.weight])
    assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(padded_grads, plain_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_layer_finishing_only_the_heads_rows_changes_no_output_or_gradient(dtype):
    """The training forward finishes only the CE and MSE rows in the last layer (`HeadRows`);
    the full forward (`keep_intermediates`) computes every row. Same logits, velocities and
    gradients (under bf16 autocast too, where the kept rows are padded to ROW_MULTIPLE)."""
    from bagel_titan_plugins.bagel.modeling_qwen2_mot import ROW_MULTIPLE, padded_rows

    model = build_bagel_for_tests("debug", seed=0)
    _randomise_zero_init(model)
    batch = _with_fixed_noise(model, synthetic_batch(ARCH, OPTS, [TEXT_ONLY, UNDERSTANDING, EDITING]))
    last = model.language_model.model.layers[-1]
    mlp_rows: list[int] = []
    hooks = [
        mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[0]))
        for mlp in (last.mlp, last.mlp_moe_gen)
    ]
    results = []
    for full in (False, True):
        model.zero_grad(set_to_none=True)
        mlp_rows.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            r = model(batch, keep_intermediates=full)
            weight = torch.randn(r.ce_logits.shape, generator=torch.Generator().manual_seed(1))
            loss = (r.ce_logits.float() * weight).sum() + r.pred_velocity.float().square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((r.ce_logits, r.pred_velocity, grads, list(mlp_rows)))
    for hook in hooks:
        hook.remove()
    (ce, vel, grads, rows), (ce_full, vel_full, grads_full, rows_full) = results
    # The last layer's MLPs saw the heads' rows only (padded in bf16), fewer than the pack's.
    multiple = 1 if dtype == torch.float32 else ROW_MULTIPLE
    assert rows == [padded_rows(ce.shape[0], multiple), padded_rows(vel.shape[0], multiple)]
    assert ce.shape[0] + vel.shape[0] < batch.sequence_length
    assert sum(rows_full) >= batch.sequence_length
    assert (
        ce.shape[0] == batch.ce_loss_indexes.numel() > 0
        and vel.shape[0] == batch.mse_loss_indexes.numel() > 0
    )
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(ce, ce_full, **tol)
    torch.testing.assert_close(vel, vel_full, **tol)
    assert grads.keys() == grads_full.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_full[name], **tol, msg=lambda m: f"{name}: {m}")
