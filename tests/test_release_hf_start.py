"""Start BAGEL from a Qwen2 LLM folder and a SigLIP folder, as the release pre-trains
(`[bagel] llm_path` / `vit_path`, `copy_init_moe`, `vit_select_layer`). The folders are written
by transformers' own `Qwen2ForCausalLM` / `SiglipVisionModel.save_pretrained`, so every key name
is the real one."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from bagel_titan.config.job_config import JobConfig
from bagel_titan.errors import UserError
from bagel_titan.plugins import PluginManager
from bagel_titan_plugins.attention.meta import AttentionMeta
from bagel_titan_plugins.bagel.config import BagelConfig

SIDE = 4  # ViT patches per side: 56 px images of 14 px patches


def write_qwen(folder, tied=False):
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    return model


def write_siglip(folder):
    torch.manual_seed(2)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=SIDE * 14,
        patch_size=14,
    )
    model = SiglipVisionModel(config)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    qwen, siglip = write_qwen(root / "qwen"), write_siglip(root / "siglip")
    # A Qwen2 folder whose file lacks the layers (an interrupted download).
    from safetensors.torch import save_file

    (root / "empty_qwen").mkdir()
    (root / "empty_qwen" / "config.json").write_text((root / "qwen" / "config.json").read_text())
    save_file(
        {"model.embed_tokens.weight": qwen.state_dict()["model.embed_tokens.weight"].contiguous()},
        str(root / "empty_qwen" / "model.safetensors"),
    )
    return root, qwen, siglip


def build(root, **options):
    plugins = PluginManager()
    spec = plugins.model_specs.get("bagel")
    cfg = JobConfig()
    cfg.attention.backend = "eager"
    cfg.plugin_sections["bagel"] = BagelConfig(
        **{
            "llm_path": str(root / "qwen"),
            "vit_path": str(root / "siglip"),
            "vit_max_num_patch_per_side": SIDE,
            "max_latent_size": 8,
            **options,
        }
    )
    model = spec.build(cfg, plugins)
    torch.manual_seed(0)
    spec.init_weights(model)
    return model


def test_llm_weights_and_their_moe_gen_copies(folders):
    root, qwen, _ = folders
    model = build(root)
    hf = qwen.state_dict()
    ours = model.state_dict()
    assert (
        model.arch.llm.hidden_size == 64
        and model.arch.llm.num_layers == 2
        and model.arch.llm.vocab_size == 256
    )
    assert model.arch.llm.rope_theta == 10000.0 and model.arch.llm.num_kv_heads == 2
    for key, value in hf.items():
        torch.testing.assert_close(ours[f"language_model.{key}"], value, rtol=0, atol=0, msg=key)
        twin = (
            f"language_model.{key}".replace("q_proj", "q_proj_moe_gen")
            .replace("mlp.", "mlp_moe_gen.")
            .replace("model.norm", "model.norm_moe_gen")
            .replace("input_layernorm", "input_layernorm_moe_gen")
        )
        if twin in ours and twin != f"language_model.{key}":
            torch.testing.assert_close(ours[twin], value, rtol=0, atol=0, msg=twin)  # copy_init_moe
    # Qwen2 has no qk-norm: BAGEL's starts at ones (fresh), as in the release.
    assert torch.equal(ours["language_model.model.layers.0.self_attn.q_norm.weight"], torch.ones(16))
    assert torch.equal(ours["language_model.model.layers.0.self_attn.k_norm_moe_gen.weight"], torch.ones(16))


def test_vit_drops_the_last_layers_and_matches_siglip(folders):
    root, _, siglip = folders
    model = build(root)
    assert model.arch.vit.num_layers == 2  # 3 + 1 + vit_select_layer (-2)
    assert "vit_model.vision_model.encoder.layers.2.mlp.fc1.weight" not in model.state_dict()
    torch.manual_seed(3)
    image = torch.randn(1, 3, SIDE * 14, SIDE * 14)
    patches = (
        image[0].reshape(3, SIDE, 14, SIDE, 14).permute(1, 3, 2, 4, 0).reshape(SIDE * SIDE, -1)
    )  # (py, px, c)
    meta = AttentionMeta.full_documents([SIDE * SIDE])
    meta.prepare_for(model.vit_model.vision_model.encoder.layers[0].self_attn.attn_core)
    with torch.no_grad():
        ours = model.vit_model(patches, torch.arange(SIDE * SIDE), meta)
        out = siglip(pixel_values=image, output_hidden_states=True)
        # The release's ViT output: post_layernorm after the penultimate layer.
        post_layernorm = getattr(siglip, "vision_model", siglip).post_layernorm  # transformers 5 flattened it
        want = post_layernorm(out.hidden_states[2])[0]
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_become_the_lm_head_and_copy_init_moe_off(tmp_path, folders):
    _, _, _ = folders
    qwen = write_qwen(tmp_path / "qwen", tied=True)
    write_siglip(tmp_path / "siglip")
    model = build(tmp_path, copy_init_moe=False)
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["language_model.lm_head.weight"], qwen.state_dict()["model.embed_tokens.weight"]
    )
    up, up_gen = (ours[f"language_model.model.layers.0.mlp{s}.up_proj.weight"] for s in ("", "_moe_gen"))
    assert not torch.equal(up, up_gen)  # the generation experts start fresh


def test_wrong_folders_and_conflicts_are_user_errors(folders):
    root, _, _ = folders
    with pytest.raises(UserError, match="starts from a SigLIP"):
        build(root, vit_path=str(root / "qwen"))  # a Qwen folder is not a SigLIP one
    with pytest.raises(UserError, match="lack .* weight"):
        build(root, llm_path=str(root / "empty_qwen"))
    with pytest.raises(UserError, match="has no config.json"):
        build(root, llm_path=str(root / "missing"))
    plugins = PluginManager()
    cfg = JobConfig()
    cfg.model.pretrained_path = str(root)
    cfg.plugin_sections["bagel"] = BagelConfig(llm_path=str(root / "qwen"))
    with pytest.raises(UserError, match="set one of them"):
        plugins.model_specs.get("bagel").build(cfg, plugins)
