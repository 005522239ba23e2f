"""Estimate of the memory one rank needs, from the model's parameters and the plan.

States are counted exactly: FSDP2 keeps fp32 master parameters sharded over `dp_shard` ranks,
plus fp32 gradients and two AdamW moments for the trainable ones. Activations are an estimate:
with activation checkpointing every unit keeps its input (tokens x hidden), and the unit being
recomputed holds the outputs of its linear layers once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

GIB = 2**30


@dataclass
class MemoryEstimate:
    params_total: int
    params_trainable: int
    dp_shard: int
    states_gib: float
    """Sharded fp32 parameters, gradients and AdamW moments on one rank."""
    gathered_units_gib: float
    """Two largest units all-gathered in the compute dtype (current + prefetched)."""
    activations_gib: float
    """Checkpointed unit inputs plus one unit's working set (rough)."""

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.gathered_units_gib + self.activations_gib

    def table(self) -> str:
        rows = [
            ("parameters", f"{self.params_total / 1e9:.3f} B ({self.params_trainable / 1e9:.3f} B trainable)"),
            (f"sharded states / rank (dp_shard={self.dp_shard})", f"{self.states_gib:.1f} GiB"),
            ("gathered units (bf16, 2 in flight)", f"{self.gathered_units_gib:.1f} GiB"),
            ("activations (estimate)", f"{self.activations_gib:.1f} GiB"),
            ("total per rank (estimate)", f"{self.total_gib:.1f} GiB"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def estimate_memory(
    model: nn.Module,
    units: Sequence[nn.Module],
    dp_shard: int,
    tokens_per_rank: int,
    hidden_size: int,
    compute_bytes: int = 2,
    activation_checkpointing: bool = True,
) -> MemoryEstimate:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # fp32 master copy of everything (frozen included: FSDP2 shards them alike), fp32 grad and
    # two fp32 moments for trainable parameters.
    states = (4 * total + 12 * trainable) / dp_shard
    unit_sizes = sorted((sum(p.numel() for p in u.parameters()) for u in units), reverse=True)
    gathered = compute_bytes * sum(unit_sizes[:2])
    linear_outputs = max(
        (sum(m.out_features for m in u.modules() if isinstance(m, nn.Linear)) for u in units), default=0
    )
    working_set = tokens_per_rank * linear_outputs * compute_bytes
    if activation_checkpointing:
        activations = tokens_per_rank * hidden_size * compute_bytes * len(units) + working_set
    else:
        activations = working_set * len(units)
    return MemoryEstimate(total, trainable, dp_shard, states / GIB, gathered / GIB, activations / GIB)
