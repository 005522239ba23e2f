"""Both LMMS YAML shapes (list form, plain mapping) split into top keys, datasets, model and
training arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .record import Conversion, LmmsConfigError


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
            if (
                isinstance(item, dict)
                and item.get("type") == "trainer"
                and isinstance(item.get("config"), dict)
            ):
                trainers.append(item["config"])
            else:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                conversion.skip(
                    f"[{i}]",
                    kind,
                    "a list item other than `type: trainer`; bagel-titan reads only the trainer config",
                )
        if len(trainers) != 1:
            raise LmmsConfigError(
                f"a list-form LMMS config needs exactly one `- type: trainer` item with a "
                f"`config:` mapping, found {len(trainers)}"
            )
        config = trainers[0]
    elif isinstance(document, dict):
        config = document
    else:
        raise LmmsConfigError(
            f"expected a YAML mapping or a list of `- type: ...` items, got {type(document).__name__}"
        )
    if not any(k in config for k in PART_KEYS):
        raise LmmsConfigError(
            f"no `dataset_config` or `model_config` in the trainer config (keys: "
            f"{sorted(config)}); is this an LMMS Engine training YAML?"
        )
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
    return LmmsConfig(
        top, dict(config.get("dataset_config") or {}), dict(config.get("model_config") or {}), args, prefix
    )
