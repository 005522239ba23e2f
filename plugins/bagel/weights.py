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

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
import math
from typing import AbstractSet, Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from bagel_titan.distributed.tensor_io import (
    Region,
    SafetensorsStreamWriter,
    assign_region,
    gather_full,
    local_region,
)
from bagel_titan.errors import UserError
from bagel_titan.lora import LoRAExport, adapter_state_keys
from bagel_titan_plugins.attention.state_keys import optional_attention_state_keys

from .config import (
    BagelArchitecture,
    BagelConfig,
    VAEArgs,
    architecture_from_release,
    bagel_config_from_release,
    llm_config_dict,
    release_config_dict,
    vit_config_dict,
)
from .modeling import Bagel

POSITION_TABLES = {
    "latent_pos_embed.pos_embed": "max_latent_size",
    "vit_pos_embed.pos_embed": "vit_max_num_patch_per_side",
}
"""Fixed sin-cos tables: recomputed, optional in a checkpoint, always written on export."""

VAE_PREFIX_LE = "vae_model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of ours lives on disk."""

    file: str
    """The safetensors file holding it."""
    key: str
    """Its key in that file."""
    shape: tuple[int, ...] | None = None
    """Our shape when the stored tensor differs only by a reshape that keeps dim 0 (e.g. a conv
    patch embedding stored for a linear one): its rows are read, then reshaped. None: same shape."""
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A conversion that keeps dim 0, applied to the rows read (SigLIP's Conv2d patch kernel
    [D, C, p, p] into BAGEL's Linear [D, p*p*C]); our shape is what it makes of the stored one."""


@dataclass
class WeightSource:
    """Where each tensor of a pretrained folder lives, by the name the model gives it.

    Any source layout (official, LE, HF Qwen2.5 + SigLIP folders, ...) is such a mapping; two of
    our names may share one stored tensor (e.g. an und weight copied into its `_moe_gen` twin).
    """

    layout: str
    """"official", "le", "fixture" or "hf_start" (Qwen2.5 + SigLIP folders, `hf_init.py`)."""
    model: dict[str, StoredTensor] = field(default_factory=dict)
    """Model state-dict key -> stored tensor."""
    vae: dict[str, StoredTensor] = field(default_factory=dict)
    """VAE key (as the AutoEncoder names it, e.g. `encoder.conv_in.weight`) -> stored tensor."""
    fresh: set[str] = field(default_factory=set)
    """Model keys no file holds that keep their fresh init (the HF start's new modules)."""


class WeightsError(UserError, ValueError):
    """Pretrained weights that do not fit the model (shapes, tables) or cannot be read."""


class WeightsNotFound(UserError, FileNotFoundError):
    """A pretrained folder or file that is missing or has an unknown layout."""


class WeightKeysMismatch(UserError, KeyError):
    """Stored keys that do not match the model's (another architecture or options)."""


def _open_safetensors(path: str) -> Any:
    """`safe_open(path)`, with a file that is not safetensors (or is truncated) as a user error."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise WeightsError(
            f"{path!r} is not a readable safetensors file ({exc}); replace it with the safetensors file "
            f"it should be (re-download it if it is truncated)"
        ) from exc


def _keys_of(path: str) -> list[str]:
    with _open_safetensors(path) as f:
        return list(f.keys())


def _same_keys(path: str) -> dict[str, StoredTensor]:
    return {k: StoredTensor(path, k) for k in _keys_of(path)}


def detect(folder: str) -> WeightSource:
    """Find the layout of a pretrained folder; an unknown folder lists what was looked for."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    if not os.path.isdir(folder):
        raise WeightsNotFound(f"[model] pretrained_path {folder!r} is not a folder")
    if has("llm_config.json") and (has("ema.safetensors") or has("model.safetensors")):
        model_file = join("ema.safetensors" if has("ema.safetensors") else "model.safetensors")
        if not has("ae.safetensors"):
            raise WeightsNotFound(f"official BAGEL folder {folder!r} has no ae.safetensors (the FLUX VAE)")
        return WeightSource("official", _same_keys(model_file), _same_keys(join("ae.safetensors")))
    if has("weights.safetensors") and has("vae_weights.safetensors") and has("config.json"):
        return WeightSource(
            "fixture", _same_keys(join("weights.safetensors")), _same_keys(join("vae_weights.safetensors"))
        )
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
                source.vae[k[len(VAE_PREFIX_LE) :]] = StoredTensor(path, k)
            else:
                source.model[k] = StoredTensor(path, k)
        return source
    raise WeightsNotFound(
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
    vit_layers = {int(k[len(prefix) :].split(".")[0]) for k in source.model if k.startswith(prefix)}
    if vit_layers:
        arch = dataclasses.replace(arch, vit=dataclasses.replace(arch.vit, num_layers=max(vit_layers) + 1))
    return arch, bagel_config_from_release(config)


class _Reader:
    """Reads the slice of a stored tensor that a (possibly sharded) model tensor holds, keeping
    each file open once; nothing else of the tensor is read or decoded."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *_: object) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()

    def _open(self, path: str) -> Any:
        if path not in self._files:
            handle = _open_safetensors(path)
            self._files[path] = handle.__enter__()
        return self._files[path]

    def shape(self, ref: StoredTensor) -> tuple[int, ...]:
        """The tensor's shape as the model sees it, read from the header only."""
        stored = tuple(self._open(ref.file).get_slice(ref.key).get_shape())
        if ref.convert is not None:
            converted = tuple(ref.convert(torch.empty(stored, device="meta")).shape)
            if converted[0] != stored[0]:
                raise ValueError(
                    f"{ref.key} in {ref.file}: its conversion changes the rows {stored} -> {converted}"
                )
            return converted
        if ref.shape is None:
            return stored
        if stored[0] != ref.shape[0] or math.prod(stored) != math.prod(ref.shape):
            raise WeightsError(
                f"{ref.key} in {ref.file} has shape {stored}, which no row-keeping reshape "
                f"turns into {ref.shape}"
            )
        return ref.shape

    def read(self, ref: StoredTensor, region: Region) -> torch.Tensor:
        """The `region` (slices in the model's shape) of the stored tensor."""
        handle = self._open(ref.file).get_slice(ref.key)
        if ref.shape is None and ref.convert is None:
            return handle[region] if region else handle[:]
        shape = self.shape(ref)
        if any(r != slice(0, n) for r, n in zip(region[1:], shape[1:])):
            raise ValueError(f"{ref.key}: a reshaped tensor can only be split by rows, got {region}")
        rows = handle[region[0]] if region else handle[:]
        return ref.convert(rows) if ref.convert is not None else rows.reshape(-1, *shape[1:])


def load_tensors(targets: Mapping[str, torch.Tensor], refs: Mapping[str, StoredTensor], where: str) -> None:
    """Fill each target tensor (a plain tensor or an FSDP2 shard) from its stored tensor.

    The entry point for every source layout: each rank reads only the rows its shard holds
    (`get_slice`), casts them and copies them into place, so a rank's host never holds more
    than one slice beyond its own shard and the accelerator never sees a full tensor.
    """
    with _Reader() as reader:
        for name, ref in refs.items():
            target = targets[name]
            _check_shape(name, target, reader.shape(ref), where)
            assign_region(target, reader.read(ref, local_region(target)))


def _check_keys(kind: str, expected: set[str], found: set[str], optional: set[str], where: str) -> None:
    missing = sorted(expected - found - optional)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise WeightKeysMismatch(
            f"{kind} weights in {where} do not match the model: missing {len(missing)} {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected {len(unexpected)} {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} (check [model] flavor and the [bagel] visual_und / "
            f"visual_gen options against the checkpoint)"
        )


def _check_position_table(model: Bagel, key: str, shape: tuple[int, ...], where: str) -> None:
    own = tuple(getattr(model, key.split(".")[0]).pos_embed.shape)
    if shape != own:
        setting = POSITION_TABLES[key]
        side = int(round(shape[0] ** 0.5))
        raise WeightsError(
            f"{key} in {where} has {shape[0]} rows ({side}x{side}) but [bagel] {setting} = "
            f"{getattr(model.options, setting)} gives {own[0]}; set {setting} = {side}"
        )


def _check_shape(key: str, param: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if tuple(param.shape) != tuple(shape):
        raise WeightsError(
            f"{key} in {where} has shape {tuple(shape)} but the model's is {tuple(param.shape)}; "
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
    """Load `source` into the model (sharded or not) and its VAE; see `load_tensors`."""
    load_model_tensors(model, source, where)
    if model.vae is None:
        return
    if model.options.vae_path:  # an explicit [bagel] vae_path wins over the folder's own VAE
        load_vae_file(model, model.options.vae_path)
    else:
        _load_vae(model, source.vae, where)


def load_model_tensors(model: Bagel, source: WeightSource, where: str) -> None:
    """The model's (non-VAE) tensors of `source`, each rank reading only its shard's rows."""
    own = model.state_dict(keep_vars=True)
    # Tables are recomputed; attention-backend parameters (NSA) are created fresh when absent;
    # LoRA adapters are initialised fresh, never part of a pretrained folder.
    optional = (
        set(POSITION_TABLES) | optional_attention_state_keys(model) | adapter_state_keys(model) | source.fresh
    )
    _check_keys("model", set(own), set(source.model), optional, where)
    refs = dict(source.model)
    with _Reader() as reader:
        for key in POSITION_TABLES:
            if key in refs:
                _check_position_table(model, key, reader.shape(refs.pop(key)), where)
    load_tensors(own, refs, where)
    model.reset_position_tables()


def _load_vae(model: Bagel, refs: Mapping[str, StoredTensor], where: str) -> None:
    assert model.vae is not None  # callers load a VAE only into a model that has one
    model.vae.materialize(model.language_model.lm_head.weight.device)
    vae_params = model.vae.module.state_dict(keep_vars=True)
    _check_keys("VAE", set(vae_params), set(refs), set(), where)
    load_tensors(vae_params, refs, where)


def load_vae_file(model: Bagel, path: str) -> None:
    """Load `[bagel] vae_path` (one `ae.safetensors`, FLUX key layout) into the model's frozen VAE."""
    if model.vae is None:
        raise WeightsError(
            f"[bagel] vae_path = {path!r} is set but [bagel] visual_gen = false (the model has "
            f"no VAE); remove vae_path or enable visual_gen"
        )
    if not os.path.isfile(path):
        raise WeightsNotFound(
            f"[bagel] vae_path = {path!r} does not exist (working directory {os.getcwd()!r}); for the debug "
            f"flavor write it with `bagel-titan-example-data data/example --vae`, or point vae_path at an "
            f"ae.safetensors"
        )
    _load_vae(model, _same_keys(path), f"[bagel] vae_path {path!r}")


WEIGHT_FILES = {True: "ema.safetensors", False: "model.safetensors"}
"""The release's names: EMA weights vs raw (non-averaged) weights."""


def export_entries(
    model: Bagel, state_dict: Mapping[str, torch.Tensor] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, local tensor or DTensor) for every tensor of the model, in file order,
    LoRA adapters included; `state_dict` replaces the model's tensors by name (e.g. the sharded
    EMA shadow)."""
    overrides = dict(state_dict or {})
    entries = [(key, overrides.pop(key, value)) for key, value in model.state_dict().items()]
    if overrides:
        raise KeyError(f"export state_dict has keys the model does not: {sorted(overrides)[:20]}")
    return entries


def _write_streamed(
    path: str,
    entries: list[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    write: bool,
    lora: LoRAExport | None = None,
    skip: AbstractSet[str] = frozenset(),
) -> None:
    """Gather, cast and write one tensor at a time (collective for sharded entries), leaving out
    `skip`. With `lora`, an adapted weight is gathered in fp32 with its A and B, merged, then cast."""
    by_name = dict(entries)
    written = [(name, tensor) for name, tensor in entries if name not in skip]
    layout = {name: (dtype, tuple(t.shape)) for name, t in written}
    with SafetensorsStreamWriter(path, layout) if write else contextlib.nullcontext() as writer:
        for name, tensor in written:
            if lora is not None and lora.adapts(name):
                full_of = lambda key: gather_full(by_name[key], torch.float32)  # noqa: E731
                full = lora.merged(name, gather_full(tensor, torch.float32), full_of).to(dtype)
            else:
                full = gather_full(tensor, dtype)
            if writer is not None:
                writer.write(name, full)
            del full


def export(
    model: Bagel,
    folder: str,
    dtype: torch.dtype = torch.bfloat16,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    ema: bool = False,
    write: bool = True,
    lora: LoRAExport | None = None,
) -> None:
    """Write an official-layout folder the release code loads unchanged.

    `ema.safetensors` (EMA weights, `ema=True`) or `model.safetensors` (the raw weights) in
    `dtype`, both sin-cos tables included; `ae.safetensors` (fp32); `llm_config.json`,
    `vit_config.json` (built layers + 1, the release's convention), `config.json`; the tokenizer
    files of `model.tokenizer_path`. `state_dict` overrides the model's tensors by name and may be
    sharded like them. Collective under FSDP: every rank calls it; tensors are gathered ONE at a
    time, cast before the gather, and only ranks with `write=True` touch the disk, so the
    writer's host holds one full tensor beyond its own shard, never the model. LoRA adapters are
    never written under official keys: with `lora` each adapted weight is written merged.
    """
    entries = export_entries(model, state_dict)
    if write:
        os.makedirs(folder, exist_ok=True)
    _write_streamed(
        os.path.join(folder, WEIGHT_FILES[ema]), entries, dtype, write, lora, adapter_state_keys(model)
    )
    if not write:
        return
    if model.vae is not None:
        _write_streamed(
            os.path.join(folder, "ae.safetensors"),
            list(model.vae.module.state_dict().items()),
            torch.float32,
            write,
        )
    _write_folder_files(model, folder, dtype)


def _write_folder_files(model: Bagel, folder: str, dtype: torch.dtype) -> None:
    """The configs and tokenizer files beside the weights; every file 0644."""
    torch_dtype = str(dtype).removeprefix("torch.")
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
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def write_random_weights(
    model: Bagel, folder: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 0.02
) -> None:
    """An official-layout folder with random normal(0, std) weights for `model`'s shapes (which
    may live on the meta device), generated and written one tensor at a time: benchmarks and
    tests of the weight I/O at full width without a download."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    files = {"ema.safetensors": (model.state_dict(), dtype)}
    if model.vae is not None:
        files["ae.safetensors"] = (model.vae.module.state_dict(), torch.float32)
    for name, (state, file_dtype) in files.items():
        layout = {k: (file_dtype, tuple(v.shape)) for k, v in state.items()}
        with SafetensorsStreamWriter(os.path.join(folder, name), layout) as writer:
            for key, value in state.items():
                writer.write(key, (torch.randn(value.shape, generator=generator) * std).to(file_dtype))
    _write_folder_files(model, folder, dtype)
