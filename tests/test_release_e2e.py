"""Issue 17's options together in a real 2-rank FSDP run of the debug config: start from
Qwen2 + SigLIP folders written by transformers, release packing with a mandatory dataset and a
per-dataset processor override, freeze_und, and the release's micro-step weighting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_e2e_debug import debug_args, example_data  # noqa: F401 (fixture)
from conftest import run_bagel_titan


@pytest.mark.dist
@pytest.mark.slow
def test_release_recipe_trains_on_two_ranks(tmp_path, example_data):  # noqa: F811
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    qwen.save_pretrained(tmp_path / "qwen")
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=980,
            patch_size=14,
        )
    ).save_pretrained(tmp_path / "siglip")
    data = example_data["data"]
    run_bagel_titan(
        debug_args(
            tmp_path,
            example_data,
            4,
            "--data.datasets",
            f'[{{path = "{data}", name = "a"}}, {{path = "{data}", name = "b", is_mandatory = true, '
            f"processor = {{vae_max_size = 32}}}}]",
            "--data.num_workers",
            "1",
            "--data.packing_strategy",
            "release",
            "--data.packing_length",
            "1024",
            "--data.release_packing.expected_num_tokens",
            "800",
            "--data.release_packing.max_num_tokens_per_sample",
            "600",
            "--bagel.llm_path",
            str(tmp_path / "qwen"),
            "--bagel.vit_path",
            str(tmp_path / "siglip"),
            "--bagel.freeze_und",
            "true",
            "--training.grad_accum_steps",
            "2",
            "--training.grad_accum_weighting",
            "microbatches",
            "--optimizer.lr",
            "1e-2",
            "--ema.start_step",
            "100",
            "--checkpoint.export_dtype",
            "float32",
        ),
        nproc=2,
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["data/packs"] == 2 * 2 * 4  # summed over the ranks: 2 ranks x 2 microbatches x 4 steps
    exported = next(
        p
        for p in (tmp_path / "run" / "exports" / "final").glob("*.safetensors")
        if p.name != "ae.safetensors"
    )
    weights = load_file(str(exported))
    hf = qwen.state_dict()
    # freeze_und: the understanding experts never get a gradient, so they are still Qwen's;
    # the generation twins started as copies (copy_init_moe) and have trained.
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        torch.testing.assert_close(weights[f"language_model.{name}"], hf[name], rtol=0, atol=0)
    gen = weights["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    assert not torch.allclose(gen, hf["model.layers.1.mlp.up_proj.weight"])
