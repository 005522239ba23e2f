"""Activation checkpointing per unit: recompute a unit's activations in backward.

Uses the composable `torch.distributed._composable.checkpoint` (non-reentrant
`torch.utils.checkpoint` driven by module hooks): the unit is not wrapped, so parameter names
and state-dict keys do not change, and it composes with `fully_shard` and per-module compile.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.distributed._composable import checkpoint

from bagel_titan.config.job_config import ActivationCheckpoint

_MODES = ("none", "full", "selective")


def checkpointed_unit_indices(num_units: int, ac_cfg: ActivationCheckpoint) -> list[int]:
    """Indices of the units to checkpoint: none, all, or every `selective_every`-th
    (1-based: with N = 2, units 1, 3, 5, ...; the same rule as torchtitan)."""
    if ac_cfg.mode == "none":
        return []
    if ac_cfg.mode == "full":
        return list(range(num_units))
    if ac_cfg.mode == "selective":
        every = ac_cfg.selective_every
        if every < 1:
            raise ValueError(
                f"[activation_checkpoint] selective_every must be >= 1, got {every}"
            )
        return [i for i in range(num_units) if (i + 1) % every == 0]
    raise ValueError(
        f"[activation_checkpoint] mode must be one of {', '.join(_MODES)}, got {ac_cfg.mode!r}"
    )


def apply_activation_checkpointing(
    model: nn.Module, units: Sequence[nn.Module], ac_cfg: ActivationCheckpoint
) -> list[int]:
    """Checkpoint the units the config selects, in place. Returns their indices.

    `model` is accepted for symmetry with the other `apply_*` functions; only units change.
    """
    del model
    indices = checkpointed_unit_indices(len(units), ac_cfg)
    for index in indices:
        checkpoint(units[index])
    return indices
