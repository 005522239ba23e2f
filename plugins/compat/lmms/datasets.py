"""`dataset_config`: dataset files and YAML mixtures, image transforms, the processor."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import yaml

from bagel_titan_plugins.bagel.processor_config import ProcessorConfig

from .record import Conversion, DatasetOut
from .tables import NO_VIDEO, as_list, hub_note, is_local, looks_like_hub_id


DATA_TYPES = {
    "json": "json",
    "jsonl": "jsonl",
    "parquet": "parquet",
    "arrow": "arrow",
    "yaml": "yaml",
    "hf_dataset": "hf_disk",
    "hf": "parquet",
}


def _first_record(path: str) -> dict[str, Any] | None:
    """The first record of a local json/jsonl file (streamed), to tell LLaVA from messages."""
    from bagel_titan_plugins.data.readers.llava import iter_json_array

    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                line = next((text for text in f if text.strip()), "")
            record = json.loads(line) if line else None
        else:
            record = next(iter_json_array(path), None)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    files = (
        [path]
        if os.path.isfile(path)
        else sorted(
            os.path.join(root, n) for root, _, names in os.walk(path) for n in names if n.endswith(".parquet")
        )
    )
    return list(pq.ParquetFile(files[0]).schema_arrow.names) if files else []


def reader_format(path: str, data_type: str) -> tuple[str, str]:
    """(bagel-titan `format`, why it differs from the LMMS data_type) for a local or remote path."""
    base = DATA_TYPES.get(data_type, "")
    if data_type in ("json", "jsonl") and os.path.isfile(path):
        record = _first_record(path)
        if record is not None and "conversations" in record and "messages" not in record:
            return "llava", "LLaVA-style records (`conversations`, `image`): read by the `llava` reader"
    if data_type == "parquet" and is_local(path):
        columns = set(_parquet_columns(path))
        if {"image_list", "instruction_list"} <= columns:
            return "bagel_edit", "the BAGEL release's editing layout"
        if {"image", "captions"} <= columns:
            return "bagel_t2i", "the BAGEL release's text-to-image layout"
    if data_type in ("arrow", "hf_dataset") and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return "hf_disk", "an HF save_to_disk folder: read by its declared features"
    if not is_local(path) and data_type in ("json", "jsonl", "parquet", "arrow"):
        return base, (
            f'{path!r} is not readable here, so its layout was not inspected: use format = "llava" '
            f'for LLaVA conversations, "bagel_t2i" / "bagel_edit" for the release\'s parquet '
            f'shards, "hf_disk" for a save_to_disk folder'
        )
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
        conv.skip(
            f"{source}.data_type",
            data_type,
            f"unknown data_type; known: {sorted(DATA_TYPES)} (format left to the file extension)",
        )
    else:
        out.fields["format"] = fmt
        if why and fmt != DATA_TYPES.get(data_type):
            out.notes.append(f"data_type {data_type!r} -> format {fmt!r}: {why}")
        elif why:
            out.notes.append(why)
    if data_type == "hf" or looks_like_hub_id(path):
        out.notes.append(hub_note(path, "dataset") + " (the download holds parquet files)")
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
        conv.skip(
            source,
            path,
            "the dataset list file does not exist here, so its datasets could not be "
            "inlined; add them as [[data.datasets]] entries",
        )
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
                if (
                    entry.get(key)
                    and not os.path.isabs(str(entry[key]))
                    and not looks_like_hub_id(str(entry[key]))
                ):
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
                conv.skip(
                    source,
                    value,
                    f"the {target.upper()} stride follows the architecture ({stride} px for "
                    f"BAGEL-7B: {'VAE downsample 8 x latent patch 2' if target == 'vae' else 'ViT patch 14'})",
                )
            else:
                conv.skip(
                    source, value, f"matches the architecture's {target.upper()} stride; nothing to set"
                )
        elif target == "vit" and key in ("image_mean", "image_std") and len(set(as_list(value))) == 1:
            conv.set("bagel.processor", f"vit_{key}", float(as_list(value)[0]), source)
        elif key == "max_pixels":
            conv.skip(
                source,
                value,
                "images are bounded by the min/max side sizes; "
                "[bagel.processor] max_image_pixels skips oversized inputs instead",
            )
        else:
            conv.skip(
                source,
                value,
                f"no [bagel.processor] option for it (options: "
                f"{[f.name for f in dataclasses.fields(ProcessorConfig)]})",
            )


def _processor(conv: Conversion, processor: Mapping[str, Any], prefix: str) -> None:
    for key, value in processor.items():
        source = f"{prefix}.{key}"
        if key == "processor_name" and value:
            conv.set(
                "model",
                "tokenizer_path",
                str(value),
                source,
                hub_note(str(value), "model") if looks_like_hub_id(str(value)) else "",
            )
        elif key == "processor_type":
            if value == "bagel":
                conv.skip(
                    source, value, 'the BAGEL processor belongs to [model] name = "bagel"; nothing to set'
                )
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
            reason = (
                'every dataset goes through the BAGEL processor of [model] name = "bagel" and is streamed'
                if str(value).startswith("bagel")
                else "bagel-titan trains BAGEL only: its processor handles every dataset (messages, "
                "caption + image, text)"
            )
            conv.skip(source, value, reason)
        elif key == "dataset_format":
            conv.skip(
                source,
                value,
                "used as the format of datasets without a data_type"
                if value != "yaml"
                else "the datasets are listed below (inline or from dataset_path)",
            )
        elif key == "datasets" and isinstance(value, list):
            for i, entry in enumerate(value):
                dataset = _dataset(
                    conv, entry, f"{source}[{i}]", default_type if default_type != "yaml" else ""
                )
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
            note = (
                (
                    "bagel-titan's first_fit is a real first-fit over a buffer of open packs; "
                    "best_fit_decreasing (with [data] packing_window) fills packs fuller"
                )
                if value == "first_fit"
                else ""
            )
            conv.set("data", "packing_strategy", str(value), source, note)
        elif key == "packing_length" and value:
            conv.set("data", "packing_length", int(value), source)
        elif key in ("video_backend", "video_sampling_strategy", "frame_num", "fps"):
            conv.skip(source, value, NO_VIDEO)
        elif key == "shuffle":
            conv.set(
                "data",
                "shuffle",
                bool(value),
                source,
                "each epoch permutes row groups, then samples within [data] shuffle_window" if value else "",
            )
        elif key == "eval_dataset_path" and value:
            dataset = _dataset(conv, {"path": value}, source, default_type if default_type != "yaml" else "")
            if dataset:
                conv.validation_datasets.append(dataset)
        elif key == "object_storage":
            conv.skip(
                source,
                value,
                "local files only"
                if value in (None, "none")
                else "bagel-titan reads local files only: copy the data from the bucket first",
            )
        elif key == "filter_overlong":
            if value:
                conv.set(
                    "data",
                    "oversize_policy",
                    "skip",
                    source,
                    "samples longer than [data] packing_length are skipped and counted",
                )
            else:
                conv.set(
                    "data",
                    "oversize_policy",
                    "skip",
                    source,
                    "bagel-titan cannot keep a sample longer than [data] packing_length: it is skipped and "
                    'counted (oversize_policy = "truncate" cuts text-only samples instead)',
                )
        elif key == "max_length" and value:
            if data.get("packing"):
                conv.skip(source, value, "with packing the limit is [data] packing_length")
            else:
                conv.set(
                    "data",
                    "packing_length",
                    int(value),
                    source,
                    "without packing each sample is its own batch, at most packing_length tokens",
                )
        elif key == "tokenizer" and value:
            conv.set("model", "tokenizer_path", str(value), source)
        elif (
            key in ("filter_overlong_workers", "bucket_name", "extra_kwargs") or value is None or value == {}
        ):
            conv.skip(
                source, value, "unset" if value in (None, {}) else "no equivalent in bagel-titan's loader"
            )
        else:
            conv.skip(source, value, "not an LMMS dataset_config key this converter knows; not converted")
