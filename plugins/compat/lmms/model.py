"""`model_config`: pretrained path, attention implementation, BAGEL options, the NSA patch."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from bagel_titan_plugins.bagel.config import BagelConfig

from .record import Conversion
from .tables import ATTENTION_BACKENDS, NSA_KEYS, hub_note, looks_like_hub_id


def _pretrained(conv: Conversion, path: str, source: str) -> None:
    note = (
        "the checkpoint format (official BAGEL release or the HF 'LE' layout) is detected when loading; "
        "the architecture comes from [model] flavor: 7b-mot is BAGEL-7B-MoT, pick the flavor that "
        "matches this checkpoint"
    )
    if looks_like_hub_id(path):
        note += "; " + hub_note(path, "model")
    conv.set("model", "pretrained_path", path, source, note)
    conv.set("model", "flavor", "7b-mot", source)


def _bagel_options(conv: Conversion, options: Mapping[str, Any], prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(BagelConfig)}
    for key, value in options.items():
        if key in names:
            conv.set("bagel", key, value, f"{prefix}.{key}")
        else:
            conv.skip(f"{prefix}.{key}", value, f"no [bagel] option of that name (options: {sorted(names)})")


def _monkey_patch(conv: Conversion, kwargs: Mapping[str, Any], prefix: str) -> None:
    patches = kwargs.get("patch_type") or []
    patches = [patches] if isinstance(patches, str) else list(patches)
    for patch in patches:
        if patch != "nsa":
            conv.skip(
                f"{prefix}.patch_type",
                patch,
                "bagel-titan patches no classes at run time; only the "
                '`nsa` patch has an equivalent ([attention] backend = "nsa")',
            )
    nsa = "nsa" in patches
    if nsa:
        conv.set(
            "attention",
            "backend",
            "nsa",
            f"{prefix}.patch_type",
            "NSA is an attention backend here (native sparse attention for the LLM's causal text "
            "queries, exact attention for full/noise segments; the ViT uses sdpa)",
        )
    for key, value in kwargs.items():
        if key == "patch_type":
            continue
        if nsa and key in NSA_KEYS:
            conv.set("attention.nsa", key, value, f"{prefix}.{key}")
        elif nsa and key == "block_counts":
            conv.set(
                "attention.nsa",
                "topk",
                value,
                f"{prefix}.{key}",
                "block_counts (older LMMS NSA patch) is the number of selected blocks: topk",
            )
        else:
            conv.skip(
                f"{prefix}.{key}",
                value,
                "not an [attention.nsa] option" if nsa else "belongs to a monkey patch that is not converted",
            )


def _custom_loader(conv: Conversion, loader: Mapping[str, Any], prefix: str) -> None:
    for key, value in loader.items():
        if key == "model_path":
            _pretrained(conv, str(value), f"{prefix}.model_path")
        elif key == "model_type":
            _model_type(conv, value, f"{prefix}.model_type")
        elif key == "config" and isinstance(value, dict):
            for sub, sub_value in value.items():
                conv.skip(
                    f"{prefix}.config.{sub}",
                    sub_value,
                    {
                        "vae_path": "the VAE is read from ae.safetensors inside [model] pretrained_path",
                        "vit_path": "this config loads a BAGEL checkpoint (model_path); to start from SigLIP and "
                        "Qwen2.5 folders instead, set [bagel] vit_path and llm_path",
                        "llm_path": "this config loads a BAGEL checkpoint (model_path); to start from SigLIP and "
                        "Qwen2.5 folders instead, set [bagel] vit_path and llm_path",
                        "finetune_from_hf": "the checkpoint layout is detected, no flag needed",
                    }.get(sub, "no equivalent in bagel-titan's model loading"),
                )
        else:
            conv.skip(f"{prefix}.{key}", value, "no equivalent in bagel-titan's model loading")


def _model_type(conv: Conversion, value: Any, source: str) -> None:
    if value in (None, "bagel"):
        conv.set("model", "name", "bagel", source)
    else:
        conv.skip(source, value, 'bagel-titan converts BAGEL configs only; [model] name = "bagel"')


def convert_model(conv: Conversion, model: Mapping[str, Any]) -> None:
    # the NSA patch first: it decides the attention backend whatever attn_implementation says
    for key, value in sorted(model.items(), key=lambda item: item[0] != "monkey_patch_kwargs"):
        source = f"model_config.{key}"
        if key == "load_from_pretrained_path" and value:
            _pretrained(conv, str(value), source)
        elif key == "load_with_custom_loader" and isinstance(value, dict):
            _custom_loader(conv, value, source)
        elif key == "load_from_config" and value:
            conv.skip(
                source,
                value,
                "bagel-titan builds the architecture from [model] flavor (debug, 7b-mot), "
                "not from an HF config; set flavor accordingly",
            )
        elif key == "attn_implementation" and value:
            backend, note = ATTENTION_BACKENDS.get(value, ("", ""))
            if not backend:
                conv.skip(
                    source, value, f"unknown attention implementation; known: {sorted(ATTENTION_BACKENDS)}"
                )
            elif conv.get("attention", "backend") == "nsa":
                conv.skip(source, value, 'the NSA patch sets [attention] backend = "nsa" (the ViT runs sdpa)')
            else:
                conv.set("attention", "backend", backend, source, note)
        elif key == "torch_dtype":
            continue  # read together with bf16 (see _precision)
        elif key == "model_type":
            _model_type(conv, value, source)
        elif key == "extra_kwargs" and isinstance(value, dict):
            _bagel_options(conv, value, source)
        elif key == "overwrite_config" and isinstance(value, dict):
            _bagel_options(conv, value, source)
        elif key == "monkey_patch_kwargs" and isinstance(value, dict):
            _monkey_patch(conv, value, source)
        elif value is None or value == {}:
            conv.skip(source, value, "unset")
        else:
            conv.skip(source, value, "not an LMMS model_config key this converter knows; not converted")
