"""One LMMS YAML document -> the conversion record."""

from __future__ import annotations

from typing import Any

from .datasets import convert_dataset
from .model import convert_model
from .record import Conversion
from .shapes import split_config
from .trainer_args import convert_top, convert_trainer_args


def convert(document: Any) -> Conversion:
    """Convert a parsed LMMS Engine YAML (list form or plain mapping)."""
    conv = Conversion()
    config = split_config(document, conv)
    conv.set("model", "name", "bagel", "(BAGEL config)")
    conv.set("loss", "components", ["ce", "flow_mse"], "(BAGEL trains text CE and flow-matching MSE)")
    convert_top(conv, config.top)
    convert_dataset(conv, config.dataset)
    convert_model(conv, config.model)
    convert_trainer_args(conv, config.trainer_args, config.trainer_prefix, config.model)
    tokenizer = conv.sections.get("model", {}).get("tokenizer_path")
    if tokenizer is not None and tokenizer.value == conv.get("model", "pretrained_path"):
        del conv.sections["model"]["tokenizer_path"]
        conv.skip(
            tokenizer.source,
            tokenizer.value,
            "the tokenizer is read from [model] pretrained_path, the same folder",
        )
    if conv.validation_datasets and conv.get("validation", "enable") is None:
        conv.set("validation", "enable", False, 'eval_strategy (HF default "no")')
    return conv
