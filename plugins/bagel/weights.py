"""Weights in and out: the official BAGEL folder, the HF "LE" layout, and bf16 export.

Official folder: `ema.safetensors` (or `model.safetensors`) with the model's keys, `ae.safetensors`
with the VAE's, `llm_config.json`, `vit_config.json`, tokenizer files.
LE layout (LMMS Engine): `config.json` (with `llm_config`/`vit_config`/`vae_config`) plus
safetensors shards listed in `model.safetensors.index.json` (or one `model.safetensors`); the same
keys, with the VAE inside under `vae_model.`.

Loading streams one tensor at a time (`safe_open`) into a materialised, possibly FSDP2-sharded
model: a rank never holds the full model on its CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bagel_titan.lora import adapter_state_keys
from bagel_titan_plugins.attention.state_keys import optional_attention_state_keys

from .config import (BagelArchitecture, BagelConfig, VAEArgs, architecture_from_release, bagel_config_from_release,
                     llm_config_dict, release_config_dict, vit_config_dict)
from .modeling import Bagel, assign_full

POSITION_TABLES = {
    "latent_pos_embed.pos_embed": "max_latent_size",
    "vit_pos_embed.pos_embed": "vit_max_num_patch_per_side",
}
"""Fixed sin-cos tables: recomputed, optional in a checkpoint, always written on export."""

VAE_PREFIX_LE = "vae_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


@dataclass
class WeightSource:
    """Where each tensor of a pretrained folder lives: key -> file, for the model and the VAE."""

    layout: str
    """"official", "le" or "fixture"."""
    model_files: dict[str, str] = field(default_factory=dict)
    """Model key -> safetensors file holding it."""
    vae_files: dict[str, str] = field(default_factory=dict)
    """VAE key (as the AutoEncoder names it, e.g. `encoder.conv_in.weight`) -> file."""
    vae_stored_keys: dict[str, str] = field(default_factory=dict)
    """VAE key -> the key in that file (`vae_model.`-prefixed in the LE layout)."""


def _keys_of(path: str) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


def detect(folder: str) -> WeightSource:
    """Find the layout of a pretrained folder; an unknown folder lists what was looked for."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"[model] pretrained_path {folder!r} is not a folder")
    if has("llm_config.json") and (has("ema.safetensors") or has("model.safetensors")):
        model_file = join("ema.safetensors" if has("ema.safetensors") else "model.safetensors")
        if not has("ae.safetensors"):
            raise FileNotFoundError(f"official BAGEL folder {folder!r} has no ae.safetensors (the FLUX VAE)")
        source = WeightSource("official", {k: model_file for k in _keys_of(model_file)})
        for k in _keys_of(join("ae.safetensors")):
            source.vae_files[k], source.vae_stored_keys[k] = join("ae.safetensors"), k
        return source
    if has("weights.safetensors") and has("vae_weights.safetensors") and has("config.json"):
        source = WeightSource("fixture", {k: join("weights.safetensors") for k in _keys_of(join("weights.safetensors"))})
        for k in _keys_of(join("vae_weights.safetensors")):
            source.vae_files[k], source.vae_stored_keys[k] = join("vae_weights.safetensors"), k
        return source
    if has("config.json") and (has("model.safetensors.index.json") or has("model.safetensors")):
        if has("model.safetensors.index.json"):
            with open(join("model.safetensors.index.json")) as f:
                weight_map = json.load(f)["weight_map"]
            files = {k: join(v) for k, v in weight_map.items()}
        else:
            files = {k: join("model.safetensors") for k in _keys_of(join("model.safetensors"))}
        source = WeightSource("le")
        for k, path in files.items():
            if k.startswith(VAE_PREFIX_LE):
                source.vae_files[k[len(VAE_PREFIX_LE):]] = path
                source.vae_stored_keys[k[len(VAE_PREFIX_LE):]] = k
            else:
                source.model_files[k] = path
        return source
    raise FileNotFoundError(
        f"cannot tell the weight layout of {folder!r}: expected an official BAGEL folder (llm_config.json + "
        f"ema.safetensors or model.safetensors + ae.safetensors) or the LE layout (config.json + "
        f"model.safetensors.index.json or model.safetensors)"
    )


def read_architecture(folder: str) -> tuple[BagelArchitecture, BagelConfig]:
    """Architecture and `[bagel]` options recorded in a pretrained folder of any layout.

    The ViT depth is counted from the weight keys (release `vit_config.json` files state one
    layer more than the weights hold); an official folder without `config.json` gets the FLUX
    VAE and the release's options.
    """
    source = detect(folder)
    config: dict = {}
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    if "llm_config" not in config:  # an official folder: the two HF sub-configs, the FLUX VAE
        for key, name in (("llm_config", "llm_config.json"), ("vit_config", "vit_config.json")):
            with open(os.path.join(folder, name)) as f:
                config[key] = json.load(f)
        config.setdefault("vae_config", dataclasses.asdict(VAEArgs()))
    arch = architecture_from_release(config, vit_config_counts_extra_layer=False)
    prefix = "vit_model.vision_model.encoder.layers."
    vit_layers = {int(k[len(prefix):].split(".")[0]) for k in source.model_files if k.startswith(prefix)}
    if vit_layers:
        arch = dataclasses.replace(arch, vit=dataclasses.replace(arch.vit, num_layers=max(vit_layers) + 1))
    return arch, bagel_config_from_release(config)


def _stream(files: Mapping[str, str], stored: Mapping[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with safe_open(path, "pt") as f:
            for key in keys:
                yield key, f.get_tensor(stored[key] if stored else key)


def _check_keys(kind: str, expected: set[str], found: set[str], optional: set[str], where: str) -> None:
    missing = sorted(expected - found - optional)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise KeyError(
            f"{kind} weights in {where} do not match the model: missing {len(missing)} {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected {len(unexpected)} {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} (check [model] flavor and the [bagel] visual_und / "
            f"visual_gen options against the checkpoint)"
        )


def _check_position_table(model: Bagel, key: str, shape: tuple[int, ...], where: str) -> None:
    own = tuple(model.state_dict()[key].shape)
    if shape != own:
        setting = POSITION_TABLES[key]
        side = int(round(shape[0] ** 0.5))
        raise ValueError(
            f"{key} in {where} has {shape[0]} rows ({side}x{side}) but [bagel] {setting} = "
            f"{getattr(model.options, setting)} gives {own[0]}; set {setting} = {side}"
        )


def _check_shape(key: str, param: torch.Tensor, tensor: torch.Tensor, where: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{key} in {where} has shape {tuple(tensor.shape)} but the model's is {tuple(param.shape)}; "
            f"the checkpoint is another architecture: check [model] flavor"
        )


def load_weights(model: Bagel, folder: str) -> str:
    """Load a pretrained folder (layout detected) into `model` and its VAE; returns the layout.

    The sin-cos tables are recomputed (a checkpoint's copy only has its shape checked). A set
    `[bagel] vae_path` replaces the folder's VAE.
    """
    source = detect(folder)
    load_from_source(model, source, folder)
    return source.layout


def load_from_source(model: Bagel, source: WeightSource, where: str) -> None:
    own = model.state_dict()
    # Tables are recomputed; attention-backend parameters (NSA) are created fresh when absent.
    # LoRA adapters are initialised fresh, never part of a pretrained folder.
    optional = set(POSITION_TABLES) | optional_attention_state_keys(model) | adapter_state_keys(model)
    _check_keys("model", set(own), set(source.model_files), optional, where)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for key, tensor in _stream(source.model_files):
        if key in POSITION_TABLES:
            _check_position_table(model, key, tuple(tensor.shape), where)
            continue
        _check_shape(key, params[key], tensor, where)
        assign_full(params[key], tensor)
    model.reset_position_tables()
    if model.vae is None:
        return
    if model.options.vae_path:  # an explicit [bagel] vae_path wins over the folder's own VAE
        load_vae_file(model, model.options.vae_path)
    else:
        _load_vae(model, source.vae_files, source.vae_stored_keys, where)


def _load_vae(model: Bagel, files: Mapping[str, str], stored: Mapping[str, str] | None, where: str) -> None:
    model.vae.materialize(model.language_model.lm_head.weight.device)
    vae_params = model.vae.module.state_dict(keep_vars=True)
    _check_keys("VAE", set(vae_params), set(files), set(), where)
    for key, tensor in _stream(files, stored):
        _check_shape(key, vae_params[key], tensor, where)
        assign_full(vae_params[key], tensor)


def load_vae_file(model: Bagel, path: str) -> None:
    """Load `[bagel] vae_path` (one `ae.safetensors`, FLUX key layout) into the model's frozen VAE."""
    if model.vae is None:
        raise ValueError(f"[bagel] vae_path = {path!r} is set but [bagel] visual_gen = false (the model has "
                         f"no VAE); remove vae_path or enable visual_gen")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"[bagel] vae_path = {path!r} does not exist (working directory {os.getcwd()!r}); for the debug "
            f"flavor write it with `bagel-titan-example-data data/example --vae`, or point vae_path at an "
            f"ae.safetensors"
        )
    _load_vae(model, {k: path for k in _keys_of(path)}, None, f"[bagel] vae_path {path!r}")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def export(model: Bagel, folder: str, dtype: torch.dtype = torch.bfloat16,
           state_dict: Mapping[str, torch.Tensor] | None = None, *, write: bool = True) -> None:
    """Write an official-layout folder the release code loads unchanged.

    `ema.safetensors` in `dtype` (both sin-cos tables included), `ae.safetensors` (fp32),
    `llm_config.json`, `vit_config.json` (built layers + 1, the release's convention),
    `config.json`, and the tokenizer files of `model.tokenizer_path`. `state_dict` overrides the
    model's tensors (e.g. EMA weights). Under FSDP every rank must call this (full tensors are
    gathered); only ranks with `write=True` touch the disk.
    """
    tensors: dict[str, torch.Tensor] = {}
    overrides = dict(state_dict or {})
    adapters = adapter_state_keys(model)  # LoRA: `state_dict` holds the merged weights instead
    for key, value in model.state_dict().items():
        if key in adapters:
            continue
        value = overrides.pop(key, value)
        full = _full(value).detach()
        if write:
            tensors[key] = full.to(device="cpu", dtype=dtype).contiguous()
    if overrides:
        raise KeyError(f"export state_dict has keys the model does not: {sorted(overrides)[:20]}")
    if not write:
        return
    os.makedirs(folder, exist_ok=True)
    torch_dtype = str(dtype).removeprefix("torch.")
    save_file(tensors, os.path.join(folder, "ema.safetensors"), metadata={"format": "pt"})
    if model.vae is not None:
        vae = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.vae.module.state_dict().items()}
        save_file(vae, os.path.join(folder, "ae.safetensors"), metadata={"format": "pt"})
    configs = {
        "llm_config.json": llm_config_dict(model.arch, torch_dtype),
        "vit_config.json": vit_config_dict(model.arch, torch_dtype),
        "config.json": release_config_dict(model.arch, model.options, torch_dtype),
    }
    for name, content in configs.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    if model.tokenizer_path:
        for name in TOKENIZER_FILES:
            src = os.path.join(model.tokenizer_path, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))
