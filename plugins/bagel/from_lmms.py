"""`bagel-titan-from-lmms CONFIG.yaml > train.toml`: an LMMS Engine BAGEL training YAML as a
bagel-titan TOML.

Both YAML shapes are read: the list form (``- type: trainer`` / ``config:``, training arguments
beside ``dataset_config`` and ``model_config``) and the plain mapping (training arguments under
``trainer_args``). Every key ends up in one of three places:

- mapped: a TOML assignment, commented with the LMMS key it came from;
- translated: mapped to what bagel-titan does where the literal value would train differently
  (pure-bf16 parameters, HF Trainer defaults that differ from bagel-titan's, batch size vs one
  pack per microbatch), with a ``NOTE`` comment above it explaining the difference;
- not converted: listed at the end of the TOML with the reason (no equivalent, no effect here,
  unknown key), and summarised on stderr.

HF Trainer defaults that change the training (AdamW betas/epsilon, the linear schedule, seed,
checkpointing every 500 steps, batch size 8) are written out when the YAML relies on them, since
bagel-titan's own defaults differ. The result is loaded with the real config loader before it
is printed, so what comes out is a valid config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import yaml

from .config import BagelConfig
from .processor_config import ProcessorConfig

# ---------------------------------------------------------------------------------------------
# The conversion record
# ---------------------------------------------------------------------------------------------


@dataclass
class Assignment:
    """One TOML key: its value, the LMMS key(s) it came from, and why it differs if it does."""

    value: Any
    source: str
    note: str = ""


@dataclass
class Skipped:
    """An LMMS key with no TOML counterpart, and the reason."""

    key: str
    value: Any
    reason: str


@dataclass
class DatasetOut:
    """One `[[data.datasets]]` entry (or `[[validation.datasets]]`)."""

    fields: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Conversion:
    """Everything the converter decided, in the order it decided it."""

    sections: dict[str, dict[str, Assignment]] = field(default_factory=dict)
    datasets: list[DatasetOut] = field(default_factory=list)
    validation_datasets: list[DatasetOut] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any, source: str, note: str = "") -> None:
        try:
            toml_value(value)
        except TypeError:
            self.skip(source, value, f"[{section}] {key} takes a single value or a list, not this")
            return
        self.sections.setdefault(section, {})[key] = Assignment(value, source, note)

    def get(self, section: str, key: str, default: Any = None) -> Any:
        assignment = self.sections.get(section, {}).get(key)
        return default if assignment is None else assignment.value

    def skip(self, key: str, value: Any, reason: str) -> None:
        self.skipped.append(Skipped(key, value, reason))


class LmmsConfigError(ValueError):
    """The YAML is not an LMMS Engine training config this converter can read."""


# ---------------------------------------------------------------------------------------------
# Reading the YAML (both shapes) into three mappings
# ---------------------------------------------------------------------------------------------


@dataclass
class LmmsConfig:
    """The trainer section of an LMMS Engine YAML, split into its parts."""

    top: dict[str, Any]
    """Keys beside the three parts (trainer_type, extra_kwargs, ...)."""
    dataset: dict[str, Any]
    model: dict[str, Any]
    trainer_args: dict[str, Any]
    trainer_prefix: str
    """How the training arguments are addressed in messages ("" or "trainer_args.")."""


PART_KEYS = ("dataset_config", "model_config")
TOP_KEYS = ("trainer_type", "extra_kwargs")
TRAINER_ARG_SECTIONS = ("trainer_args", "training_args")


def split_config(document: Any, conversion: Conversion) -> LmmsConfig:
    """The trainer config of a list-form or plain-mapping LMMS YAML."""
    if isinstance(document, list):
        trainers = []
        for i, item in enumerate(document):
            if isinstance(item, dict) and item.get("type") == "trainer" and isinstance(item.get("config"), dict):
                trainers.append(item["config"])
            else:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                conversion.skip(f"[{i}]", kind, "a list item other than `type: trainer`; bagel-titan "
                                                 "reads only the trainer config")
        if len(trainers) != 1:
            raise LmmsConfigError(f"a list-form LMMS config needs exactly one `- type: trainer` item with a "
                                  f"`config:` mapping, found {len(trainers)}")
        config = trainers[0]
    elif isinstance(document, dict):
        config = document
    else:
        raise LmmsConfigError(f"expected a YAML mapping or a list of `- type: ...` items, got "
                              f"{type(document).__name__}")
    if not any(k in config for k in PART_KEYS):
        raise LmmsConfigError(f"no `dataset_config` or `model_config` in the trainer config (keys: "
                              f"{sorted(config)}); is this an LMMS Engine training YAML?")
    args: dict[str, Any] = {}
    prefix = ""
    for name in TRAINER_ARG_SECTIONS:
        if isinstance(config.get(name), dict):
            args.update(config[name])
            prefix = f"{name}."
    top = {}
    for key, value in config.items():
        if key in PART_KEYS or key in TRAINER_ARG_SECTIONS:
            continue
        if key in TOP_KEYS:
            top[key] = value
        else:
            args[key] = value  # list form: training arguments sit beside the parts
    return LmmsConfig(top, dict(config.get("dataset_config") or {}), dict(config.get("model_config") or {}),
                      args, prefix)


# ---------------------------------------------------------------------------------------------
# Shared reasons and small helpers
# ---------------------------------------------------------------------------------------------

NO_EFFECT_HF = "a Hugging Face Trainer option that has no counterpart or effect in bagel-titan"
NO_VIDEO = "the BAGEL processor takes images only (no video)"
HF_DEFAULT = "HF Trainer default; bagel-titan's own default differs"

HF_TRAINER_DEFAULTS: dict[str, Any] = {
    # The TrainingArguments defaults an LMMS run gets when its YAML omits them, where
    # bagel-titan's default would train differently.
    "learning_rate": 5e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_scheduler_type": "linear",
    "seed": 42,
    "per_device_train_batch_size": 8,
    "save_steps": 500,
}

IGNORED_TRAINER_ARGS = frozenset("""
    overwrite_output_dir do_train do_eval do_predict prediction_loss_only per_device_eval_batch_size
    eval_accumulation_steps eval_delay torch_empty_cache_steps log_level log_level_replica
    log_on_each_node logging_dir logging_strategy logging_first_step logging_nan_inf_filter
    save_on_each_node save_safetensors restore_callback_states_from_checkpoint no_cuda use_cpu
    use_mps_device jit_mode_eval half_precision_backend bf16_full_eval fp16_full_eval fp16_opt_level
    local_rank ddp_backend tpu_num_cores tpu_metrics_debug debug past_index disable_tqdm
    remove_unused_columns label_names load_best_model_at_end metric_for_best_model greater_is_better
    ignore_data_skip fsdp_min_num_params accelerator_config parallelism_config deepspeed
    label_smoothing_factor optim_args adafactor length_column_name project trackio_space_id
    ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers dataloader_pin_memory
    dataloader_persistent_workers dataloader_drop_last skip_memory_metrics use_legacy_prediction_loop
    push_to_hub hub_model_id hub_strategy hub_token hub_private_repo hub_always_push hub_revision
    include_inputs_for_metrics include_for_metrics eval_do_concat_batches fp16_backend
    push_to_hub_model_id push_to_hub_organization mp_parameters auto_find_batch_size torchdynamo
    ray_scope ddp_timeout include_tokens_per_second include_num_input_tokens_seen neftune_noise_alpha
    optim_target_modules batch_eval_metrics eval_on_start liger_kernel_config eval_use_gather_object
    average_tokens_across_devices print_batch_input_steps save_total_limit_per_node
""".split())

MODEL_CLASSES = ("Qwen2MoTDecoderLayer", "SiglipEncoderLayer")
"""Module classes of bagel-titan's BAGEL that `transformer_layer_cls_to_wrap` may name."""

ATTENTION_BACKENDS = {
    "eager": ("eager", ""),
    "sdpa": ("sdpa", ""),
    "flash_attention_2": ("sdpa", "flash_attention_2 cannot express BAGEL's packed mask with noise segments; "
                                  "bagel-titan's sdpa backend runs one SDPA call per document on long packs, "
                                  "which takes the flash kernel for causal text and full ViT documents "
                                  "(flex is the block-sparse alternative on GPU)"),
    "flash_attention_3": ("sdpa", "no flash_attention_3 backend; sdpa (per-document flash kernels) is used"),
    "flex_attention": ("flex", ""),
}

NSA_KEYS = ("block_size", "compress_type", "kernel_size", "kernel_stride", "topk", "init_blocks",
            "local_blocks", "window_size")

FREEZE_GROUPS = {"visual": "vit", "vit_model": "vit", "vit": "vit", "connector": "connector",
                 "language_model": "llm", "llm": "llm"}

OPTIMIZERS = {"adamw_torch_fused": "fused", "adamw_torch": "auto", "adamw_hf": "auto", "adamw": "auto"}

LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant",
                "constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"}


def _is_local(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def _looks_like_hub_id(path: str) -> bool:
    return (not _is_local(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))
            and not path.endswith((".json", ".jsonl", ".parquet", ".arrow", ".yaml", ".yml")))


def _hub_note(path: str, what: str) -> str:
    return (f"{path!r} looks like a Hugging Face Hub id and bagel-titan reads local files only: download it "
            f"(`huggingface-cli download {'--repo-type dataset ' if what == 'dataset' else ''}{path} "
            f"--local-dir DIR`) and set this path to DIR")


# ---------------------------------------------------------------------------------------------
# model_config
# ---------------------------------------------------------------------------------------------


def _pretrained(conv: Conversion, path: str, source: str) -> None:
    note = ("the checkpoint format (official BAGEL release or the HF 'LE' layout) is detected when loading; "
            "the architecture comes from [model] flavor: 7b-mot is BAGEL-7B-MoT, pick the flavor that "
            "matches this checkpoint")
    if _looks_like_hub_id(path):
        note += "; " + _hub_note(path, "model")
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
            conv.skip(f"{prefix}.patch_type", patch, "bagel-titan patches no classes at run time; only the "
                                                     "`nsa` patch has an equivalent ([attention] backend = \"nsa\")")
    nsa = "nsa" in patches
    if nsa:
        conv.set("attention", "backend", "nsa", f"{prefix}.patch_type",
                 "NSA is an attention backend here (native sparse attention for the LLM's causal text "
                 "queries, exact attention for full/noise segments; the ViT uses sdpa)")
    for key, value in kwargs.items():
        if key == "patch_type":
            continue
        if nsa and key in NSA_KEYS:
            conv.set("attention.nsa", key, value, f"{prefix}.{key}")
        elif nsa and key == "block_counts":
            conv.set("attention.nsa", "topk", value, f"{prefix}.{key}", "block_counts (older LMMS NSA patch) is "
                                                                        "the number of selected blocks: topk")
        else:
            conv.skip(f"{prefix}.{key}", value, "not an [attention.nsa] option" if nsa else
                      "belongs to a monkey patch that is not converted")


def _custom_loader(conv: Conversion, loader: Mapping[str, Any], prefix: str) -> None:
    for key, value in loader.items():
        if key == "model_path":
            _pretrained(conv, str(value), f"{prefix}.model_path")
        elif key == "model_type":
            _model_type(conv, value, f"{prefix}.model_type")
        elif key == "config" and isinstance(value, dict):
            for sub, sub_value in value.items():
                conv.skip(f"{prefix}.config.{sub}", sub_value, {
                    "vae_path": "the VAE is read from ae.safetensors inside [model] pretrained_path",
                    "vit_path": "building BAGEL from a separate SigLIP checkpoint is not supported; "
                                "pretrained_path must be a BAGEL release (or LE) folder",
                    "llm_path": "building BAGEL from a separate Qwen2 checkpoint is not supported; "
                                "pretrained_path must be a BAGEL release (or LE) folder",
                    "finetune_from_hf": "the checkpoint layout is detected, no flag needed",
                }.get(sub, "no equivalent in bagel-titan's model loading"))
        else:
            conv.skip(f"{prefix}.{key}", value, "no equivalent in bagel-titan's model loading")


def _model_type(conv: Conversion, value: Any, source: str) -> None:
    if value in (None, "bagel"):
        conv.set("model", "name", "bagel", source)
    else:
        conv.skip(source, value, "bagel-titan converts BAGEL configs only; [model] name = \"bagel\"")


def convert_model(conv: Conversion, model: Mapping[str, Any]) -> None:
    # the NSA patch first: it decides the attention backend whatever attn_implementation says
    for key, value in sorted(model.items(), key=lambda item: item[0] != "monkey_patch_kwargs"):
        source = f"model_config.{key}"
        if key == "load_from_pretrained_path" and value:
            _pretrained(conv, str(value), source)
        elif key == "load_with_custom_loader" and isinstance(value, dict):
            _custom_loader(conv, value, source)
        elif key == "load_from_config" and value:
            conv.skip(source, value, "bagel-titan builds the architecture from [model] flavor (debug, 7b-mot), "
                                     "not from an HF config; set flavor accordingly")
        elif key == "attn_implementation" and value:
            backend, note = ATTENTION_BACKENDS.get(value, ("", ""))
            if not backend:
                conv.skip(source, value, f"unknown attention implementation; known: {sorted(ATTENTION_BACKENDS)}")
            elif conv.get("attention", "backend") == "nsa":
                conv.skip(source, value, "the NSA patch sets [attention] backend = \"nsa\" (the ViT runs sdpa)")
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


# ---------------------------------------------------------------------------------------------
# dataset_config
# ---------------------------------------------------------------------------------------------

DATA_TYPES = {"json": "json", "jsonl": "jsonl", "parquet": "parquet", "arrow": "arrow", "yaml": "yaml",
              "hf_dataset": "hf_disk", "hf": "parquet"}


def _first_record(path: str) -> dict[str, Any] | None:
    """The first record of a local json/jsonl file (streamed), to tell LLaVA from messages."""
    from bagel_titan_plugins.data.readers.llava import iter_json_array

    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                line = next((l for l in f if l.strip()), "")
            record = json.loads(line) if line else None
        else:
            record = next(iter_json_array(path), None)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, n) for root, _, names in os.walk(path) for n in names if n.endswith(".parquet"))
    return list(pq.ParquetFile(files[0]).schema_arrow.names) if files else []


def reader_format(path: str, data_type: str) -> tuple[str, str]:
    """(bagel-titan `format`, why it differs from the LMMS data_type) for a local or remote path."""
    base = DATA_TYPES.get(data_type, "")
    if data_type in ("json", "jsonl") and os.path.isfile(path):
        record = _first_record(path)
        if record is not None and "conversations" in record and "messages" not in record:
            return "llava", "LLaVA-style records (`conversations`, `image`): read by the `llava` reader"
    if data_type == "parquet" and _is_local(path):
        columns = set(_parquet_columns(path))
        if {"image_list", "instruction_list"} <= columns:
            return "bagel_edit", "the BAGEL release's editing layout"
        if {"image", "captions"} <= columns:
            return "bagel_t2i", "the BAGEL release's text-to-image layout"
    if data_type in ("arrow", "hf_dataset") and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return "hf_disk", "an HF save_to_disk folder: read by its declared features"
    if not _is_local(path) and data_type in ("json", "jsonl", "parquet", "arrow"):
        return base, (f"{path!r} is not readable here, so its layout was not inspected: use format = \"llava\" "
                      f"for LLaVA conversations, \"bagel_t2i\" / \"bagel_edit\" for the release's parquet "
                      f"shards, \"hf_disk\" for a save_to_disk folder")
    return base, ""


def _dataset(conv: Conversion, entry: Any, source: str, default_type: str) -> DatasetOut | None:
    if not isinstance(entry, dict) or not entry.get("path"):
        conv.skip(source, entry, "a dataset entry needs a `path`")
        return None
    path = str(entry["path"])
    data_type = str(entry.get("data_type") or default_type or "")
    out = DatasetOut({"path": path}, source)
    fmt, why = reader_format(path, data_type)
    if not fmt:
        conv.skip(f"{source}.data_type", data_type, f"unknown data_type; known: {sorted(DATA_TYPES)} (format left "
                                                    f"to the file extension)")
    else:
        out.fields["format"] = fmt
        if why and fmt != DATA_TYPES.get(data_type):
            out.notes.append(f"data_type {data_type!r} -> format {fmt!r}: {why}")
        elif why:
            out.notes.append(why)
    if data_type == "hf" or _looks_like_hub_id(path):
        out.notes.append(_hub_note(path, "dataset") + " (the download holds parquet files)")
    if entry.get("data_folder"):
        out.fields["data_folder"] = str(entry["data_folder"])
    for key in ("weight", "sampling_ratio", "sample_ratio"):
        if key in entry:
            out.fields["weight"] = float(entry[key])
    for key, value in entry.items():
        if key in ("path", "data_type", "data_folder", "weight", "sampling_ratio", "sample_ratio"):
            continue
        if key == "kwargs" and isinstance(value, dict) and set(value) <= {"split"}:
            out.notes.append(f"split {value.get('split')!r}: point `path` at that split's files")
        else:
            conv.skip(f"{source}.{key}", value, "no per-dataset equivalent")
    return out


def _datasets_from_yaml(conv: Conversion, path: str, source: str, default_type: str) -> list[DatasetOut]:
    """The datasets an external LMMS dataset YAML lists, inlined (its `data_type` keys are LMMS's)."""
    if not os.path.isfile(path):
        conv.skip(source, path, "the dataset list file does not exist here, so its datasets could not be "
                                "inlined; add them as [[data.datasets]] entries")
        return []
    with open(path) as f:
        listed = yaml.safe_load(f)
    if isinstance(listed, dict):
        listed = listed.get("datasets")
    if not isinstance(listed, list):
        conv.skip(source, path, "the file holds no `datasets:` list")
        return []
    base = os.path.dirname(path)
    out = []
    for i, entry in enumerate(listed):
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in ("path", "data_folder"):
                if entry.get(key) and not os.path.isabs(str(entry[key])) and not _looks_like_hub_id(str(entry[key])):
                    candidate = os.path.join(base, str(entry[key]))
                    entry[key] = candidate if os.path.exists(candidate) else entry[key]
        dataset = _dataset(conv, entry, f"{source} -> {os.path.basename(path)}[{i}]", default_type)
        if dataset:
            out.append(dataset)
    return out


def _image_transform(conv: Conversion, args: Mapping[str, Any], prefix: str, target: str) -> None:
    """`image_transform_args` (VAE side) or `vit_image_transform_args` -> [bagel.processor]."""
    stride = {"vae": 16, "vit": 14}[target]
    for key, value in args.items():
        source = f"{prefix}.{key}"
        if key in ("max_image_size", "min_image_size"):
            conv.set("bagel.processor", f"{target}_{key.split('_')[0]}_size", int(value), source)
        elif key == "image_stride":
            if int(value) != stride:
                conv.skip(source, value, f"the {target.upper()} stride follows the architecture ({stride} px for "
                                         f"BAGEL-7B: {'VAE downsample 8 x latent patch 2' if target == 'vae' else 'ViT patch 14'})")
            else:
                conv.skip(source, value, f"matches the architecture's {target.upper()} stride; nothing to set")
        elif target == "vit" and key in ("image_mean", "image_std") and len(set(_as_list(value))) == 1:
            conv.set("bagel.processor", f"vit_{key}", float(_as_list(value)[0]), source)
        elif key == "max_pixels":
            conv.skip(source, value, "images are bounded by the min/max side sizes; "
                                     "[bagel.processor] max_image_pixels skips oversized inputs instead")
        else:
            conv.skip(source, value, f"no [bagel.processor] option for it (options: "
                                     f"{[f.name for f in dataclasses.fields(ProcessorConfig)]})")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _processor(conv: Conversion, processor: Mapping[str, Any], prefix: str) -> None:
    for key, value in processor.items():
        source = f"{prefix}.{key}"
        if key == "processor_name" and value:
            conv.set("model", "tokenizer_path", str(value), source,
                     _hub_note(str(value), "model") if _looks_like_hub_id(str(value)) else "")
        elif key == "processor_type":
            if value == "bagel":
                conv.skip(source, value, "the BAGEL processor belongs to [model] name = \"bagel\"; nothing to set")
            else:
                conv.skip(source, value, "bagel-titan uses the BAGEL processor for every dataset")
        elif key == "extra_kwargs" and isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub == "image_transform_args" and isinstance(sub_value, dict):
                    _image_transform(conv, sub_value, f"{source}.{sub}", "vae")
                elif sub == "vit_image_transform_args" and isinstance(sub_value, dict):
                    _image_transform(conv, sub_value, f"{source}.{sub}", "vit")
                elif sub == "frame_sampler_args":
                    conv.skip(f"{source}.{sub}", sub_value, NO_VIDEO)
                else:
                    conv.skip(f"{source}.{sub}", sub_value, "no BAGEL processor option of that name")
        elif value is None or value == {}:
            conv.skip(source, value, "unset")
        else:
            conv.skip(source, value, "no BAGEL processor option of that name")


def convert_dataset(conv: Conversion, data: Mapping[str, Any]) -> None:
    default_type = str(data.get("dataset_format") or "")
    for key, value in data.items():
        source = f"dataset_config.{key}"
        if key == "dataset_type":
            reason = ("every dataset goes through the BAGEL processor of [model] name = \"bagel\" and is streamed"
                      if str(value).startswith("bagel") else
                      "bagel-titan trains BAGEL only: its processor handles every dataset (messages, "
                      "caption + image, text)")
            conv.skip(source, value, reason)
        elif key == "dataset_format":
            conv.skip(source, value, "used as the format of datasets without a data_type" if value != "yaml"
                      else "the datasets are listed below (inline or from dataset_path)")
        elif key == "datasets" and isinstance(value, list):
            for i, entry in enumerate(value):
                dataset = _dataset(conv, entry, f"{source}[{i}]",
                                   default_type if default_type != "yaml" else "")
                if dataset:
                    conv.datasets.append(dataset)
        elif key == "dataset_path" and value:
            if str(value).endswith((".yaml", ".yml")):
                conv.datasets.extend(_datasets_from_yaml(conv, str(value), source, ""))
            else:
                dataset = _dataset(conv, {"path": value}, source, default_type)
                if dataset:
                    conv.datasets.append(dataset)
        elif key == "processor_config" and isinstance(value, dict):
            _processor(conv, value, source)
        elif key == "packing":
            conv.set("data", "packing", bool(value), source)
        elif key == "packing_strategy" and value:
            note = ("bagel-titan's first_fit is a real first-fit over a buffer of open packs; "
                    "best_fit_decreasing (with [data] packing_window) fills packs fuller") if value == "first_fit" else ""
            conv.set("data", "packing_strategy", str(value), source, note)
        elif key == "packing_length" and value:
            conv.set("data", "packing_length", int(value), source)
        elif key in ("video_backend", "video_sampling_strategy", "frame_num", "fps"):
            conv.skip(source, value, NO_VIDEO)
        elif key == "shuffle":
            conv.set("data", "shuffle", bool(value), source,
                     "each epoch permutes row groups, then samples within [data] shuffle_window" if value else "")
        elif key == "eval_dataset_path" and value:
            dataset = _dataset(conv, {"path": value}, source, default_type if default_type != "yaml" else "")
            if dataset:
                conv.validation_datasets.append(dataset)
        elif key == "object_storage":
            conv.skip(source, value, "local files only" if value in (None, "none") else
                      "bagel-titan reads local files only: copy the data from the bucket first")
        elif key == "filter_overlong":
            if value:
                conv.set("data", "oversize_policy", "skip", source,
                         "samples longer than [data] packing_length are skipped and counted")
            else:
                conv.set("data", "oversize_policy", "skip", source,
                         "bagel-titan cannot keep a sample longer than [data] packing_length: it is skipped and "
                         "counted (oversize_policy = \"truncate\" cuts text-only samples instead)")
        elif key == "max_length" and value:
            if data.get("packing"):
                conv.skip(source, value, "with packing the limit is [data] packing_length")
            else:
                conv.set("data", "packing_length", int(value), source,
                         "without packing each sample is its own batch, at most packing_length tokens")
        elif key == "tokenizer" and value:
            conv.set("model", "tokenizer_path", str(value), source)
        elif key in ("filter_overlong_workers", "bucket_name", "extra_kwargs") or value is None or value == {}:
            conv.skip(source, value, "unset" if value in (None, {}) else "no equivalent in bagel-titan's loader")
        else:
            conv.skip(source, value, "not an LMMS dataset_config key this converter knows; not converted")


# ---------------------------------------------------------------------------------------------
# training arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainerContext:
    """The training arguments with the HF defaults filled in, and which ones the YAML set."""

    args: dict[str, Any]
    given: set[str]
    prefix: str
    model: Mapping[str, Any]
    consumed: set[str] = field(default_factory=set)
    """Given keys some handler turned into a setting or a note."""

    def source(self, key: str) -> str:
        """How `key` is cited in the output; citing it marks it as accounted for."""
        self.consumed.add(key)
        return f"{self.prefix}{key}" if key in self.given else f"{key} (HF default)"


TrainerHandler = Callable[[Conversion, str, Any, TrainerContext], None]
"""(conversion, LMMS key, value, context): maps one training argument."""


def _steps(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    max_steps = ctx.args.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        conv.set("training", "steps", max_steps, ctx.source("max_steps"))
        if "num_train_epochs" in ctx.given:
            conv.skip(ctx.source("num_train_epochs"), ctx.args["num_train_epochs"],
                      "max_steps takes precedence (as in the HF Trainer)")
        return
    epochs = ctx.args.get("num_train_epochs", 3.0)
    conv.skip(ctx.source("num_train_epochs"), epochs,
              "CHECK: bagel-titan counts optimizer steps, not epochs; set [training] steps to about epochs x "
              "samples / (samples per pack x grad_accum_steps x data-parallel ranks) (the data repeats "
              "endlessly); [training] steps keeps its default until then")


def _batch(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    per_device = int(ctx.args.get("per_device_train_batch_size") or 1)
    accum = int(ctx.args.get("gradient_accumulation_steps") or 1)
    packing = bool(conv.get("data", "packing", True))
    unit = "pack" if packing else "sample"
    note = ""
    if per_device != 1:
        note = (f"a microbatch is one {unit} in bagel-titan: per_device_train_batch_size ({per_device}) x "
                f"gradient_accumulation_steps ({accum}) microbatches per optimizer step keep the {unit}s per step")
    conv.set("training", "grad_accum_steps", per_device * accum,
             " x ".join(ctx.source(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps")
                        if k in ctx.given or k in HF_TRAINER_DEFAULTS), note)


def _precision(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    bf16, fp16 = bool(ctx.args.get("bf16")), bool(ctx.args.get("fp16"))
    torch_dtype = str(ctx.model.get("torch_dtype") or "")
    source = " + ".join(s for s in (ctx.source("bf16"), ctx.source("fp16") if "fp16" in ctx.given else "",
                                    "model_config.torch_dtype" if torch_dtype else "") if s)
    if not (bf16 or fp16 or torch_dtype in ("bfloat16", "float16")):
        conv.set("training", "dtype", "float32", source)
        return
    note = ("LMMS Engine loads the parameters in bf16 (torch_dtype bfloat16) and updates them in bf16 (pure "
            "bf16: AdamW state in bf16, updates below bf16's resolution are lost). bagel-titan computes in bf16 "
            "(FSDP2 mixed precision) but keeps fp32 master weights and optimizer state and reduces gradients in "
            "fp32: the same forward numerics, more exact updates, about 8 more bytes per parameter of sharded "
            "state") if torch_dtype in ("bfloat16", "") and (bf16 or torch_dtype == "bfloat16") else (
            "bf16 autocast over fp32 parameters: bagel-titan's bfloat16 mixed precision does the same")
    if fp16 or torch_dtype == "float16":
        note = ("bagel-titan has no fp16 (no loss scaling): bf16 mixed precision with fp32 master weights is used "
                "instead")
    conv.set("training", "dtype", "bfloat16", source, note)


def _lr_schedule(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    source = ctx.source("lr_scheduler_type")
    kwargs = ctx.args.get("lr_scheduler_kwargs") or {}
    if kwargs:
        ctx.consumed.add("lr_scheduler_kwargs")
    schedule = LR_SCHEDULES.get(str(value))
    if schedule is None:
        closest = {"cosine_with_restarts": "cosine", "polynomial": "linear"}.get(str(value))
        if closest is None:
            conv.skip(source, value, "no such schedule in bagel-titan (constant, linear, cosine); "
                                     "[lr_scheduler] decay_type keeps its default")
            return
        conv.set("lr_scheduler", "decay_type", closest, source,
                 f"no {value} schedule: {closest} is the closest (one decay to min_lr at [training] steps)")
    else:
        conv.set("lr_scheduler", "decay_type", schedule, source,
                 "the HF Trainer's default schedule is linear decay to 0; bagel-titan's default is constant"
                 if "lr_scheduler_type" not in ctx.given else "")
    if value == "cosine_with_min_lr":
        if "min_lr" in kwargs:
            conv.set("lr_scheduler", "min_lr", float(kwargs["min_lr"]), f"{ctx.prefix}lr_scheduler_kwargs.min_lr")
        elif "min_lr_rate" in kwargs:
            lr = float(ctx.args.get("learning_rate", HF_TRAINER_DEFAULTS["learning_rate"]))
            conv.set("lr_scheduler", "min_lr", float(kwargs["min_lr_rate"]) * lr,
                     f"{ctx.prefix}lr_scheduler_kwargs.min_lr_rate x learning_rate")
    for key, kw_value in kwargs.items():
        if not (value == "cosine_with_min_lr" and key in ("min_lr", "min_lr_rate")):
            conv.skip(f"{ctx.prefix}lr_scheduler_kwargs.{key}", kw_value, "no such [lr_scheduler] option")


def _warmup(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    steps = int(ctx.args.get("warmup_steps") or 0)
    ratio = float(ctx.args.get("warmup_ratio") or 0.0)
    if ctx.args.get("lr_scheduler_type") == "constant" and (steps or ratio):
        conv.set("lr_scheduler", "warmup_steps", 0, ctx.source("lr_scheduler_type"),
                 "the HF `constant` schedule ignores warm-up (constant_with_warmup uses it)")
        return
    if steps > 0:
        conv.set("lr_scheduler", "warmup_steps", steps, ctx.source("warmup_steps"))
        if "warmup_ratio" not in ctx.given:
            return
        if ratio:
            conv.skip(ctx.source("warmup_ratio"), ratio, "warmup_steps takes precedence (as in the HF Trainer)")
    elif ratio > 0:
        total = conv.get("training", "steps")
        if total is None:
            conv.skip(ctx.source("warmup_ratio"), ratio, "CHECK: a ratio of the total steps, which are not known "
                                                         "(epochs); set [lr_scheduler] warmup_steps")
        else:
            conv.set("lr_scheduler", "warmup_steps", math.ceil(ratio * total), ctx.source("warmup_ratio"),
                     f"warmup_ratio {ratio} x {total} steps, rounded up as the HF Trainer does")
        if "warmup_steps" in ctx.given:
            conv.skip(ctx.source("warmup_steps"), ctx.args["warmup_steps"], "0: warmup_ratio applies")
    elif "warmup_steps" in ctx.given or "warmup_ratio" in ctx.given:
        conv.set("lr_scheduler", "warmup_steps", 0, ctx.source("warmup_steps" if "warmup_steps" in ctx.given
                                                               else "warmup_ratio"))


def _checkpointing(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    strategy = ctx.args.get("save_strategy", "steps")
    if strategy == "no":
        conv.set("checkpoint", "enable", False, ctx.source("save_strategy"))
        return
    if strategy == "epoch":
        conv.skip(ctx.source("save_strategy"), strategy, "bagel-titan saves every N steps: see "
                                                         "[checkpoint] interval")
    conv.set("checkpoint", "enable", True, ", ".join(ctx.source(k) for k in ("save_steps", "save_strategy")
                                                     if k in ctx.given or k == "save_steps"),
             "the HF Trainer saves every 500 steps by default; bagel-titan's checkpoints are off by default"
             if "save_steps" not in ctx.given else "")
    conv.set("checkpoint", "interval", int(ctx.args.get("save_steps") or 500), ctx.source("save_steps"))
    if ctx.args.get("save_total_limit"):
        conv.set("checkpoint", "keep_latest_k", int(ctx.args["save_total_limit"]), ctx.source("save_total_limit"))


def _output_dir(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    path = os.path.normpath(str(value))
    conv.set("job", "dump_folder", os.path.dirname(path) or ".", ctx.source("output_dir"))
    conv.set("job", "run_name", os.path.basename(path), ctx.source("output_dir"))


def _report_to(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    targets = set(_as_list(value)) - {"none", None}
    conv.set("metrics", "enable_tensorboard", bool(targets), ctx.source("report_to"),
             "no wandb: metrics go to the console, TensorBoard (<run>/tb) and <run>/metrics.jsonl"
             if targets - {"tensorboard"} else "")


def _fsdp(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    conv.set("parallelism", "fsdp", True, ctx.source("fsdp2"),
             "" if value else "LMMS fsdp2: false replicates the model; bagel-titan shards it with FSDP2 "
                              "(same math, less memory per GPU)")


def _fsdp_config(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    ctx.consumed.add(key)  # each sub-key is mapped or noted on its own
    for key, sub in (value or {}).items():
        source = f"{ctx.prefix}fsdp_config.{key}"
        if key == "transformer_layer_cls_to_wrap" and sub:
            _wrap_classes(conv, sub, source)
        elif key == "reshard_after_forward":
            conv.set("parallelism", "reshard_after_forward", "always" if sub else "never", source,
                     "bagel-titan's default (\"default\") reshards every unit but the last")
        elif key in ("offload_params", "cpu_offload") and sub:
            conv.set("parallelism", "cpu_offload", True, source)
        else:
            conv.skip(source, sub, "no FSDP2 option of that name in [parallelism]")


def _wrap_classes(conv: Conversion, names: Any, source: str) -> None:
    names = _as_list(names)
    unknown = [n for n in names if n not in MODEL_CLASSES]
    if unknown:
        conv.skip(source, names, f"{unknown} are not module classes of bagel-titan's BAGEL (it has "
                                 f"{list(MODEL_CLASSES)}); the spec's units (every decoder and ViT layer) are used")
        return
    conv.set("parallelism", "transformer_layer_cls_to_wrap", names, source,
             "the same FSDP units as the LMMS run; leave it empty to also shard every SigLIP layer on its own"
             if "SiglipEncoderLayer" not in names else "")


def _freeze(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    groups = set(conv.get("model", "freeze", []))
    for name in _as_list(value or []):
        if name in FREEZE_GROUPS:
            groups.add(FREEZE_GROUPS[name])
        elif name in ("vae", "vae_model"):
            conv.skip(ctx.source("freeze_modules"), name, "the VAE is always frozen")
        else:
            conv.skip(ctx.source("freeze_modules"), name, "no such module group; [model] freeze takes "
                                                          "llm, vit, connector, und, gen")
    if groups:
        conv.set("model", "freeze", sorted(groups), ctx.source("freeze_modules"))


def _validation(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    if value in ("no", None):
        conv.set("validation", "enable", False, ctx.source("eval_strategy"))
        return
    conv.set("validation", "enable", True, ctx.source("eval_strategy"),
             "" if value == "steps" else f"eval_strategy {value!r}: bagel-titan validates every N steps")
    if ctx.args.get("eval_steps"):
        conv.set("validation", "interval", int(ctx.args["eval_steps"]), ctx.source("eval_steps"))


def _optim(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    if value in OPTIMIZERS:
        conv.set("optimizer", "implementation", OPTIMIZERS[value], ctx.source("optim"))
    else:
        conv.skip(ctx.source("optim"), value, "bagel-titan trains with AdamW only")


def _simple(section: str, name: str, cast: Callable[[Any], Any] = lambda v: v) -> TrainerHandler:
    """A training argument that maps one to one onto `[section] name`."""
    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        if value is not None:
            conv.set(section, name, cast(value), ctx.source(key), "" if key in ctx.given else HF_DEFAULT)
    return handler


def _betas(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    conv.set("optimizer", "betas", [float(ctx.args["adam_beta1"]), float(ctx.args["adam_beta2"])],
             f"{ctx.source('adam_beta1')}, {ctx.source('adam_beta2')}",
             "HF AdamW defaults (0.9, 0.999); bagel-titan's default is (0.9, 0.95)"
             if not {"adam_beta1", "adam_beta2"} <= ctx.given else "")


def _skip_reason(reason: str) -> TrainerHandler:
    """A training argument with no equivalent, whatever its value."""
    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        conv.skip(ctx.source(key), value, reason)
    return handler


def _read_by(other: str) -> TrainerHandler:
    """A training argument that `other`'s handler reads; noted only if that handler never runs."""
    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        return None
    handler.read_by = other  # type: ignore[attr-defined]
    return handler


def _skip_if_set(reason: str, off: tuple[Any, ...] = (None, False, "", [], {})) -> TrainerHandler:
    """An option whose `off` values are what bagel-titan does; any other value has no equivalent."""
    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        is_off = any(type(value) is type(o) and value == o for o in off if o is not None) or value is None
        conv.skip(ctx.source(key), value, "off, as in bagel-titan" if is_off else reason)
    return handler


TRAINER_HANDLERS: dict[str, TrainerHandler] = {
    "max_steps": _steps,
    "num_train_epochs": _read_by("max_steps"),
    "per_device_train_batch_size": _batch,
    "gradient_accumulation_steps": _read_by("per_device_train_batch_size"),
    "learning_rate": _simple("optimizer", "lr", float),
    "weight_decay": _simple("optimizer", "weight_decay", float),
    "adam_beta1": _betas,
    "adam_beta2": _read_by("adam_beta1"),
    "adam_epsilon": _simple("optimizer", "eps", float),
    "max_grad_norm": _simple("training", "max_norm", float),
    "optim": _optim,
    "lr_scheduler_type": _lr_schedule,
    "lr_scheduler_kwargs": _read_by("lr_scheduler_type"),
    "warmup_ratio": _warmup,
    "warmup_steps": _read_by("warmup_ratio"),
    "seed": _simple("training", "seed", int),
    "data_seed": _simple("data", "seed", int),
    "full_determinism": _simple("training", "deterministic", bool),
    "gradient_checkpointing": lambda conv, key, value, ctx: conv.set(
        "activation_checkpoint", "mode", "full" if value else "none", ctx.source("gradient_checkpointing")),
    "gradient_checkpointing_kwargs": _skip_if_set("activation checkpointing has no kwargs here; "
                                                  "[activation_checkpoint] mode = full or selective"),
    "bf16": _precision,
    "fp16": _read_by("bf16"),
    "tf32": _skip_reason("TF32 matmuls follow PyTorch's defaults"),
    "reduce_dtype": lambda conv, key, value, ctx: conv.skip(
        ctx.source("reduce_dtype"), value, "gradients are always reduced in fp32 here (more exact than a bf16 "
                                           "reduce, twice its traffic)" if value != "float32" else "fp32, as here"),
    "output_dtype": lambda conv, key, value, ctx: conv.set(
        "checkpoint", "export_dtype", "float32" if value == "float32" else "bfloat16", ctx.source("output_dtype")),
    "fsdp2": _fsdp,
    "fsdp_config": _fsdp_config,
    "fsdp": _skip_if_set("HF FSDP1 options: bagel-titan always uses FSDP2 ([parallelism])"),
    "fsdp_transformer_layer_cls_to_wrap": lambda conv, key, value, ctx: value and _wrap_classes(conv, value, ctx.source(key)),
    "sp_ulysses_degree": _skip_if_set("no sequence parallelism in bagel-titan", off=(None, 1)),
    "use_muon": _skip_if_set("bagel-titan trains with AdamW only"),
    "save_steps": _checkpointing,
    "save_strategy": _read_by("save_steps"),
    "save_total_limit": _read_by("save_steps"),
    "save_only_model": _skip_reason("checkpoints always hold model, optimizer and data position (exact resume); "
                                    "the weights-only copy is the export (checkpoint.export_*)"),
    "resume_from_checkpoint": _skip_if_set("a run resumes from its own latest checkpoint when [checkpoint] "
                                           "enable = true; to start from another run's step-N folder set "
                                           "[checkpoint] initial_load_path"),
    "output_dir": _output_dir,
    "run_name": _skip_reason("the run folder name comes from output_dir; run_name named the tracker run"),
    "report_to": _report_to,
    "logging_steps": _simple("metrics", "log_freq", int),
    "dataloader_num_workers": _simple("data", "num_workers", int),
    "dataloader_prefetch_factor": _simple("data", "prefetch_factor", int),
    "freeze_modules": _freeze,
    "eval_strategy": _validation,
    "evaluation_strategy": _validation,
    "eval_steps": _read_by("eval_strategy"),
    "torch_compile": _simple("compile", "enable", bool),
    "torch_compile_backend": _skip_if_set("torch.compile uses inductor here"),
    "torch_compile_mode": _skip_if_set("torch.compile uses the default mode here"),
    "group_by_length": _skip_reason("the packing strategy decides what goes together"),
    "use_liger_kernel": _skip_if_set("no Liger kernels; the losses run in PyTorch ([compile] enable compiles "
                                     "them)"),
    "use_rmpad": _skip_reason("batches are always packed without padding"),
    "enable_profiler": _skip_if_set("no built-in profiler; use torch.profiler around a few steps"),
    "profiler_config": _skip_reason("no built-in profiler"),
}


def convert_trainer_args(conv: Conversion, args: Mapping[str, Any], prefix: str, model: Mapping[str, Any]) -> None:
    effective = {**HF_TRAINER_DEFAULTS, **args}
    ctx = TrainerContext(effective, set(args), prefix, model)
    always = ("max_steps", "bf16", "adam_beta1", "warmup_ratio")  # they also read keys that may be absent
    for key in ["max_steps"] + [k for k in TRAINER_HANDLERS if k != "max_steps"]:  # steps first: warm-up needs them
        if key in always or key in effective and effective[key] is not None:
            TRAINER_HANDLERS[key](conv, key, effective.get(key), ctx)
    skipped = {item.key for item in conv.skipped}
    for key, value in args.items():
        if key in ctx.consumed or f"{prefix}{key}" in skipped:
            continue
        handler = TRAINER_HANDLERS.get(key)
        if value is None or value == {}:
            conv.skip(f"{prefix}{key}", value, "unset")
        elif handler is not None:
            other = getattr(handler, "read_by", "")
            conv.skip(f"{prefix}{key}", value, f"no effect with these settings (read together with {other})"
                      if other else "no effect with these settings")
        elif key in IGNORED_TRAINER_ARGS:
            conv.skip(f"{prefix}{key}", value, NO_EFFECT_HF)
        else:
            conv.skip(f"{prefix}{key}", value, "not an LMMS/HF training argument this converter knows; "
                                               "not converted")


def convert_top(conv: Conversion, top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if key == "trainer_type":
            conv.skip(key, value, "bagel-titan has one trainer (FSDP2, torchtitan style): nothing to choose")
        else:
            conv.skip(key, value, "unset" if value in (None, {}) else "no equivalent")


def convert(document: Any) -> Conversion:
    """Convert a parsed LMMS Engine YAML (list form or plain mapping)."""
    conv = Conversion()
    config = split_config(document, conv)
    conv.set("model", "name", "bagel", "(BAGEL config)")
    convert_top(conv, config.top)
    convert_dataset(conv, config.dataset)
    convert_model(conv, config.model)
    convert_trainer_args(conv, config.trainer_args, config.trainer_prefix, config.model)
    tokenizer = conv.sections.get("model", {}).get("tokenizer_path")
    if tokenizer is not None and tokenizer.value == conv.get("model", "pretrained_path"):
        del conv.sections["model"]["tokenizer_path"]
        conv.skip(tokenizer.source, tokenizer.value, "the tokenizer is read from [model] pretrained_path, "
                                                     "the same folder")
    if conv.validation_datasets and conv.get("validation", "enable") is None:
        conv.set("validation", "enable", False, "eval_strategy (HF default \"no\")")
    return conv


# ---------------------------------------------------------------------------------------------
# TOML output
# ---------------------------------------------------------------------------------------------

SECTION_ORDER = ("job", "model", "training", "optimizer", "lr_scheduler", "parallelism", "activation_checkpoint",
                 "compile", "checkpoint", "metrics", "data", "validation", "attention", "attention.nsa",
                 "attention.sdpa", "attention.flex", "loss", "ema", "bagel", "bagel.processor")


def toml_value(value: Any) -> str:
    """A TOML literal for a scalar or a list of scalars."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def _comment_lines(text: str, prefix: str = "# NOTE: ", width: int = 100) -> list[str]:
    words, lines, line = text.split(), [], prefix
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip() not in ("#", prefix.strip()):
            lines.append(line.rstrip())
            line = "#   "
        line += word + " "
    lines.append(line.rstrip())
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def to_toml(conv: Conversion, source_file: str) -> str:
    lines = [f"# bagel-titan config converted from the LMMS Engine config {source_file}",
             "# by bagel-titan-from-lmms. Each key names the LMMS key it came from; read every NOTE (a",
             "# translation that differs from the LMMS run) and the list of keys not converted at the end.", ""]
    sections = sorted(conv.sections, key=lambda s: (SECTION_ORDER.index(s) if s in SECTION_ORDER else 99, s))
    for section in sections:
        lines.append(f"[{section}]")
        for key, item in conv.sections[section].items():
            if item.note:
                lines.extend(_comment_lines(item.note))
            lines.append(f"{key} = {toml_value(item.value)}  # {item.source}")
        lines.append("")
        if section == "data":
            lines.extend(_datasets_toml("data.datasets", conv.datasets))
        if section == "validation":
            lines.extend(_datasets_toml("validation.datasets", conv.validation_datasets))
    if conv.datasets and "data" not in conv.sections:
        lines.extend(_datasets_toml("data.datasets", conv.datasets))
    if conv.validation_datasets and "validation" not in conv.sections:
        lines.extend(_datasets_toml("validation.datasets", conv.validation_datasets))
    if conv.skipped:
        lines.append("# ---- LMMS Engine keys not converted ----")
        for item in conv.skipped:
            lines.extend(_comment_lines(f"{item.key} = {_short(item.value)}: {item.reason}", prefix="# "))
    return "\n".join(lines) + "\n"


def _datasets_toml(table: str, datasets: Iterable[DatasetOut]) -> list[str]:
    lines = []
    for dataset in datasets:
        for note in dataset.notes:
            lines.extend(_comment_lines(note))
        lines.append(f"[[{table}]]  # {dataset.source}")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in dataset.fields.items())
        lines.append("")
    return lines


def summary(conv: Conversion) -> str:
    """The stderr report: translations to review, then skipped keys grouped by reason."""
    mapped = sum(len(s) for s in conv.sections.values()) + len(conv.datasets) + len(conv.validation_datasets)
    out = [f"bagel-titan-from-lmms: {mapped} settings written, {len(conv.skipped)} LMMS keys not converted"]
    notes = [(f"[{s}] {k}", a.note) for s, items in conv.sections.items() for k, a in items.items() if a.note]
    notes += [(f"dataset {d.fields['path']}", n) for d in conv.datasets + conv.validation_datasets for n in d.notes]
    if notes:
        out.append("review (translated, see the NOTE comments):")
        out += [f"  {where}: {note}" for where, note in notes]
    by_reason: dict[str, list[str]] = {}
    for item in conv.skipped:
        by_reason.setdefault(item.reason, []).append(item.key)
    if by_reason:
        out.append("not converted:")
        out += [f"  {', '.join(keys)}: {reason}" for reason, keys in by_reason.items()]
    return "\n".join(out) + "\n"


class ConvertedConfigError(ValueError):
    """The converted values do not form a valid bagel-titan config (e.g. NSA sizes that do not
    divide each other): the loader's message names the key."""


def check_loads(toml_text: str) -> None:
    """Load the TOML with bagel-titan's config loader (all plugin sections)."""
    from bagel_titan.config.manager import load_job_config

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml_text)
    try:
        load_job_config(["--job.config_file", f.name])
    except (ValueError, TypeError, KeyError) as exc:  # ConfigError and section validation errors
        raise ConvertedConfigError(f"the converted config does not load: {exc}") from exc
    finally:
        os.unlink(f.name)


def convert_file(path: str) -> tuple[str, Conversion]:
    """(TOML text, conversion record) for the LMMS YAML at `path`, checked to load."""
    with open(path) as f:
        document = yaml.safe_load(f)
    conv = convert(document)
    text = to_toml(conv, path)
    check_loads(text)
    return text, conv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagel-titan-from-lmms",
                                     description="Convert an LMMS Engine BAGEL training YAML into a bagel-titan "
                                                 "TOML (printed on stdout; a summary goes to stderr).")
    parser.add_argument("config", help="the LMMS Engine YAML (list form or plain mapping)")
    parser.add_argument("-o", "--output", help="write the TOML here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text, conv = convert_file(args.config)
    except (OSError, yaml.YAMLError, LmmsConfigError, ConvertedConfigError) as exc:
        print(f"bagel-titan-from-lmms: error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    sys.stderr.write(summary(conv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
