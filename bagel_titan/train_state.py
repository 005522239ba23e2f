"""Counters of the training run that are checkpointed with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (including skipped non-finite ones)."""
    tokens_seen: int = 0
    """Real tokens consumed by all data-parallel ranks."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss or a gradient was not finite."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))
