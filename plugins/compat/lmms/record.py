"""The conversion record: every TOML key the converter set, and every LMMS key it did not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


SCALARS = (bool, int, float, str)


def is_toml_value(value: Any) -> bool:
    """A scalar or a list of scalars: what one converted key may hold."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, SCALARS) for v in value)
    return isinstance(value, SCALARS)


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
        if not is_toml_value(value):
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
