"""The conversion record as TOML (values written by tomli_w, with the converter's comments) and
as the stderr summary."""

from __future__ import annotations

import json
from typing import Any, Iterable

import tomli_w

from .record import Conversion, DatasetOut


SECTION_ORDER = (
    "job",
    "model",
    "training",
    "optimizer",
    "lr_scheduler",
    "parallelism",
    "activation_checkpoint",
    "compile",
    "checkpoint",
    "metrics",
    "data",
    "validation",
    "attention",
    "attention.nsa",
    "attention.sdpa",
    "attention.flex",
    "loss",
    "ema",
    "bagel",
    "bagel.processor",
)


def toml_line(key: str, value: Any) -> str:
    """`key = value` as tomli_w writes it (a list spans lines), without the final newline."""
    return tomli_w.dumps({key: value}).rstrip("\n")


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
    lines = [
        f"# bagel-titan config converted from the LMMS Engine config {source_file}",
        "# by bagel-titan-from-lmms. Each key names the LMMS key it came from; read every NOTE (a",
        "# translation that differs from the LMMS run) and the list of keys not converted at the end.",
        "",
    ]
    sections = sorted(conv.sections, key=lambda s: (SECTION_ORDER.index(s) if s in SECTION_ORDER else 99, s))
    for section in sections:
        lines.append(f"[{section}]")
        for key, item in conv.sections[section].items():
            if item.note:
                lines.extend(_comment_lines(item.note))
            lines.append(f"{toml_line(key, item.value)}  # {item.source}")
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
        for skipped in conv.skipped:
            lines.extend(
                _comment_lines(f"{skipped.key} = {_short(skipped.value)}: {skipped.reason}", prefix="# ")
            )
    return "\n".join(lines) + "\n"


def _datasets_toml(table: str, datasets: Iterable[DatasetOut]) -> list[str]:
    lines = []
    for dataset in datasets:
        for note in dataset.notes:
            lines.extend(_comment_lines(note))
        lines.append(f"[[{table}]]  # {dataset.source}")
        lines.extend(toml_line(key, value) for key, value in dataset.fields.items())
        lines.append("")
    return lines


def summary(conv: Conversion) -> str:
    """The stderr report: translations to review, then skipped keys grouped by reason."""
    mapped = sum(len(s) for s in conv.sections.values()) + len(conv.datasets) + len(conv.validation_datasets)
    out = [f"bagel-titan-from-lmms: {mapped} settings written, {len(conv.skipped)} LMMS keys not converted"]
    notes = [(f"[{s}] {k}", a.note) for s, items in conv.sections.items() for k, a in items.items() if a.note]
    notes += [
        (f"dataset {d.fields['path']}", n) for d in conv.datasets + conv.validation_datasets for n in d.notes
    ]
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
