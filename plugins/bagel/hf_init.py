"""Start BAGEL from a Qwen2/Qwen2.5 LLM folder and a SigLIP folder, as the release pre-trains.

The release (`train/pretrain_unified_navit.py` without `finetune_from_hf`) builds the LLM with
`Qwen2ForCausalLM.from_pretrained(llm_path)`, copies every understanding weight into its
`_moe_gen` twin (`copy_init_moe`), builds the SigLIP with `num_hidden_layers + 1 +
vit_select_layer` layers from `vit_path`, and turns the patch Conv2d into a Linear. Everything
else (qk-norms, connector, timestep MLP, latent projections, sin-cos tables) starts fresh.

Here that is a key mapping, `hf_start_source()`: every BAGEL parameter name -> (HF file, HF key,
transform), handed to the same streaming loader as a BAGEL folder (`weights.load_model_tensors`),
so each tensor is read once, converted, and cut to the rank's shard. `[bagel] llm_path` and
`vit_path` select it; the LLM and ViT shapes come from the folders' `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from bagel_titan.errors import UserError

from .config import BagelArchitecture, BagelConfig, LLMArgs, ViTArgs
from .weights import StoredTensor, WeightSource, load_model_tensors

LLM_PREFIX = "language_model."
VIT_PREFIX = "vit_model."


def _read_config(folder: str, setting: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(
            f"[bagel] {setting} = {folder!r} has no config.json; point it at a Hugging Face "
            f"model folder (config.json + model.safetensors or model.safetensors.index.json)"
        )
    with open(path) as f:
        return json.load(f)


def _hf_files(folder: str, setting: str) -> dict[str, str]:
    """HF key -> safetensors file of a `save_pretrained` folder (one file or an index of shards)."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    raise UserError(
        f"[bagel] {setting} = {folder!r} holds no model.safetensors or model.safetensors.index.json "
        f"(save the model with save_pretrained(..., safe_serialization=True))"
    )


def _vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """A SiglipVisionModel's config.json, or the `vision_config` of a full SiglipModel's."""
    return config.get("vision_config") or config


def architecture(base: BagelArchitecture, options: BagelConfig) -> BagelArchitecture:
    """`base` (the flavor's: its VAE) with the LLM and ViT shapes of the HF folders."""
    llm, vit = base.llm, base.vit
    if options.llm_path:
        c = _read_config(options.llm_path, "llm_path")
        if c.get("model_type") not in ("qwen2", None):
            raise UserError(
                f"[bagel] llm_path {options.llm_path!r} is a {c.get('model_type')!r} model; BAGEL "
                f"starts from a Qwen2 / Qwen2.5 LLM"
            )
        # transformers >= 5 writes the RoPE settings under `rope_parameters`, older ones flat.
        rope = c.get("rope_parameters") or {
            "rope_theta": c.get("rope_theta", 1e6),
            **(c.get("rope_scaling") or {}),
        }
        if (
            rope.get("rope_type", rope.get("type", "default")) != "default"
            or c.get("hidden_act", "silu") != "silu"
        ):
            raise UserError(
                f"[bagel] llm_path {options.llm_path!r}: rope {rope} / hidden_act {c.get('hidden_act')!r} "
                f"are not supported (BAGEL uses Qwen2's default RoPE and silu)"
            )
        llm = LLMArgs(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope["rope_theta"]),
            qk_norm=True,
            tie_word_embeddings=False,
            max_position_embeddings=c.get("max_position_embeddings", 32768),
        )
    if options.vit_path and options.visual_und:
        c = _vision_config(_read_config(options.vit_path, "vit_path"))
        if c.get("model_type") not in ("siglip_vision_model", "siglip", None) or "patch_size" not in c:
            raise UserError(
                f"[bagel] vit_path {options.vit_path!r} is a {c.get('model_type')!r} model; BAGEL's "
                f"ViT starts from a SigLIP (SiglipVisionModel or SiglipModel) folder"
            )
        layers = c["num_hidden_layers"] + 1 + options.vit_select_layer
        if not 1 <= layers <= c["num_hidden_layers"]:
            raise UserError(
                f"[bagel] vit_select_layer = {options.vit_select_layer} keeps {layers} of the "
                f"{c['num_hidden_layers']} SigLIP layers; use -1 .. -{c['num_hidden_layers']}"
            )
        vit = ViTArgs(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=layers,
            num_heads=c["num_attention_heads"],
            image_size=c["image_size"],
            patch_size=c["patch_size"],
            num_channels=c.get("num_channels", 3),
            layer_norm_eps=c.get("layer_norm_eps", 1e-6),
        )
    return dataclasses.replace(base, llm=llm, vit=vit)


def _vision_key(stored: str) -> str | None:
    """A SigLIP key as `vision_model.*`: transformers < 5 saves a SiglipVisionModel with that
    prefix, 5.x without it; a full SiglipModel also holds `text_model.*` (not read)."""
    if stored.startswith(("text_model.", "logit_")):
        return None
    return stored[stored.index("vision_model.") :] if "vision_model." in stored else f"vision_model.{stored}"


def _conv_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """SigLIP's patch Conv2d [D, C, p, p] -> BAGEL's Linear [D, p*p*C], input order (py, px, c)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def hf_start_source(model_keys: list[str], options: BagelConfig) -> WeightSource:
    """Where each BAGEL parameter comes from in the HF folders (a `WeightSource` for the loader).

    LLM: `language_model.<k>` <- `<k>`; with `copy_init_moe` a `*_moe_gen*` key reads its
    understanding twin. A tied-embedding Qwen (no `lm_head.weight` stored) gets its
    `embed_tokens` as lm_head. ViT: `vit_model.<k>` <- `<k>` of the first built layers (the
    pooling head and the dropped last layers are not read). Keys without a source (qk-norms,
    connector, generation projections, tables, and the `_moe_gen` twins without
    `copy_init_moe`) keep their fresh init and are listed in `fresh`.
    """
    source = WeightSource("hf_start")
    llm_files = _hf_files(options.llm_path, "llm_path") if options.llm_path else {}
    vit_files: dict[str, str] = {}
    stored_vit: dict[str, str] = {}
    if options.vit_path and options.visual_und:
        for stored, path in _hf_files(options.vit_path, "vit_path").items():
            name = _vision_key(stored)
            if name is not None:
                vit_files[name], stored_vit[name] = path, stored
    for key in model_keys:
        hf_key: str | None = None
        if key.startswith(LLM_PREFIX) and llm_files:
            hf_key = key[len(LLM_PREFIX) :]
            if "_moe_gen" in hf_key:
                hf_key = hf_key.replace("_moe_gen", "") if options.copy_init_moe else None
            if hf_key == "lm_head.weight" and hf_key not in llm_files:
                hf_key = "model.embed_tokens.weight"  # tied embeddings (small Qwen2.5 models)
            if hf_key is not None and hf_key not in llm_files:
                hf_key = None
            if hf_key is not None:
                source.model[key] = StoredTensor(llm_files[hf_key], hf_key)
        elif key.startswith(VIT_PREFIX) and vit_files:
            hf_key = key[len(VIT_PREFIX) :]
            if hf_key in vit_files:
                patch = hf_key.endswith("embeddings.patch_embedding.weight")
                source.model[key] = StoredTensor(
                    vit_files[hf_key], stored_vit[hf_key], convert=_conv_to_linear if patch else None
                )
            else:
                hf_key = None
        if hf_key is None:
            source.fresh.add(key)
    return source


def check_hf_start(model_keys: set[str], options: BagelConfig, source: WeightSource) -> None:
    """Every LLM / ViT weight the release reads must be found (a wrong folder is not a fresh init)."""
    required = []
    if options.llm_path:
        required += [
            k
            for k in model_keys
            if k.startswith(LLM_PREFIX)
            and "_moe_gen" not in k
            and not k.endswith(("q_norm.weight", "k_norm.weight"))
        ]
    if options.vit_path and options.visual_und:
        required += [k for k in model_keys if k.startswith(VIT_PREFIX)]
    missing = sorted(k for k in required if k in source.fresh)
    if missing:
        raise UserError(
            f"the Hugging Face folders lack {len(missing)} weight(s) BAGEL needs, e.g. {missing[:5]}; "
            f"check [bagel] llm_path = {options.llm_path!r} (a Qwen2ForCausalLM folder) and vit_path = "
            f"{options.vit_path!r} (a SigLIP folder)"
        )


def load_hf_start(model: Any) -> WeightSource:
    """Load the `[bagel] llm_path` / `vit_path` weights into a freshly initialised `model` (which
    may be FSDP2-sharded: every tensor is streamed and cut to the rank's shard)."""
    from bagel_titan_plugins.attention.state_keys import optional_attention_state_keys

    options: BagelConfig = model.options
    keys = [k for k in model.state_dict() if k not in optional_attention_state_keys(model)]
    source = hf_start_source(keys, options)
    check_hf_start(set(keys), options, source)
    load_model_tensors(
        model, source, f"[bagel] llm_path {options.llm_path!r} / vit_path {options.vit_path!r}"
    )
    return source
