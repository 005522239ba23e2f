"""FLOPs per packed batch against a hand count, and the 7b-mot architecture on the meta device."""

from __future__ import annotations


import torch

from conftest import FIXTURES
from bagel_titan_plugins.bagel.config import (
    BagelArchitecture,
    BagelConfig,
    LLMArgs,
    VAEArgs,
    ViTArgs,
    architecture_for,
)
from bagel_titan_plugins.bagel.flops import forward_flops, training_flops, visible_pairs
from bagel_titan_plugins.bagel.spec import build_bagel
from synthetic_bagel import Text, VaeImage, VitImage, synthetic_batch

KEYS = FIXTURES / "design" / "bagel7b_state_dict_keys.txt"


def test_visible_pairs_follow_the_mask_rule():
    # causal 3: 6 pairs; full 4 sees the 3 before + itself: 12 + 16; noise 2 sees 7 + itself: 14 + 4;
    # text 1 after the noise segment does not see it: 7 + 1.
    assert visible_pairs([(3, "causal"), (4, "full"), (2, "noise"), (1, "causal")]) == 6 + 28 + 18 + 8


def test_flops_match_a_hand_count():
    arch = BagelArchitecture(
        llm=LLMArgs(
            vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1
        ),
        vit=ViTArgs(
            hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1, image_size=8, patch_size=2
        ),
        vae=VAEArgs(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4),
    )
    options = BagelConfig(latent_patch_size=1, max_latent_size=4, vit_max_num_patch_per_side=4)
    batch = synthetic_batch(arch, options, [[Text(2)], [Text(1, loss=False), VitImage(1, 2), VaeImage(1, 1)]])
    assert batch.sequence_length == 14 and batch.num_ce_tokens == 3
    dense = 2 * 14 * (64 + 64 + 64 + 384)  # q, k+v, o, SwiGLU per token (one expert)
    attention = 4 * (10 + 6 + 28 + 30) * 2 * 4  # visible pairs x heads x head_dim, QK^T + PV
    lm_head = 2 * 3 * 8 * 32
    vit = 2 * 2 * (12 * 4 + 4 * 4 * 4 + 2 * 4 * 8) + 4 * 2 * 2 * 4 + 2 * 2 * (4 * 8 + 8 * 8)
    latent = 2 * 1 * (4 * 8 + 256 * 8 + 8 * 8) + 2 * 1 * 8 * 4
    assert forward_flops(batch, arch, options) == dense + attention + lm_head + vit + latent
    assert training_flops(batch, arch, options) == 3 * (dense + attention + lm_head + vit + latent)


def test_attention_is_counted_per_document_not_per_pack():
    arch, options = architecture_for("debug"), BagelConfig()
    one = synthetic_batch(arch, options, [[Text(30)]])
    two = synthetic_batch(arch, options, [[Text(30)], [Text(30)]])
    assert training_flops(two, arch, options) == 2 * training_flops(one, arch, options)


def test_7b_mot_on_meta_matches_the_release_state_dict():
    expected: dict[str, list[int]] = {}
    vae: dict[str, list[int]] = {}
    target = expected
    for line in KEYS.read_text().splitlines():
        if line.startswith("# FLUX"):
            target = vae
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        target[key] = [int(x) for x in shape.strip("[]").split(",")]
    with torch.device("meta"):
        model = build_bagel(architecture_for("7b-mot"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == 14.607
    assert {k: list(v.shape) for k, v in model.vae.module.state_dict().items()} == vae
