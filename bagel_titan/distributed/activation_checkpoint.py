"""Activation checkpointing per unit: recompute a unit's activations in backward.

Uses the composable `torch.distributed._composable.checkpoint` (non-reentrant
`torch.utils.checkpoint` driven by module hooks): the unit is not wrapped, so parameter names
and state-dict keys do not change, and it composes with `fully_shard` and per-module compile.

Granularity of "selective":
- "layer": checkpoint every Nth unit whole (`selective_every`);
- "op": every unit, but the outputs of the expensive ops (matmuls, attention) are kept and only
  the cheap ones (norms, activations, elementwise) are recomputed.

A checkpointed unit must compute the same thing in its recomputation as in its forward: per-batch
state (masks, plans) is built before the units run, never cached on first call inside one. With
compile, such a cache is a guard: the recomputation then runs another graph that saves other
tensors, and backward fails with "CheckpointError: Recomputed values ... have different
metadata" (see tests/test_ac_compile_grid.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from bagel_titan.config.job_config import ActivationCheckpoint


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "mm",
        "bmm",
        "addmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_mm",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _op_policy(saved: frozenset[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_context():
    return create_selective_checkpoint_contexts(partial(_op_policy, _saved_ops()))


def checkpointed_unit_indices(
    num_units: int, ac_cfg: ActivationCheckpoint, granularity: str = "layer"
) -> list[int]:
    """Indices of the units to checkpoint: none, all, or every `selective_every`-th
    (1-based: with N = 2, units 1, 3, 5, ...; the same rule as torchtitan); all units with
    op-level selective checkpointing."""
    # The values are checked once, by the config ([activation_checkpoint] is a typed section).
    if ac_cfg.mode == "none":
        return []
    if ac_cfg.mode == "full" or (ac_cfg.mode == "selective" and granularity == "op"):
        return list(range(num_units))
    return [i for i in range(num_units) if (i + 1) % ac_cfg.selective_every == 0]


def apply_activation_checkpointing(
    model: nn.Module,
    units: Sequence[nn.Module],
    ac_cfg: ActivationCheckpoint,
    granularity: str = "layer",
) -> list[int]:
    """Checkpoint the units the config selects, in place. Returns their indices.

    `model` is accepted for symmetry with the other `apply_*` functions; only units change.
    """
    del model
    indices = checkpointed_unit_indices(len(units), ac_cfg, granularity)
    op_level = ac_cfg.mode == "selective" and granularity == "op"
    for index in indices:
        if op_level:
            checkpoint(units[index], context_fn=_op_level_context)
        else:
            checkpoint(units[index])
    return indices
