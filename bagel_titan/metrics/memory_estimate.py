"""Per-rank accelerator memory of one training step, from the model's shapes and the plan.

States are counted exactly from the parameters in their own dtypes: FSDP2 keeps the master
parameters (fp32, or a LoRA base frozen in bf16) sharded over `dp_shard` ranks, gradients and
two AdamW moments in the dtype of each trainable one, and the EMA's fp32 shadow sharded like them. `[parallelism] cpu_offload` moves parameters, gradients and optimizer
state to the host, `[ema] device = "cpu"` the EMA. The transient is what FSDP2 all-gathers in the
compute dtype: the root's own parameters (kept gathered through the step), the largest unit and
the prefetched next one, plus one unit's unsharded fp32 gradients before its reduce-scatter.
Activations come from the model spec (`activation_memory`), which knows what its packs contain;
without it, every unit is assumed to see every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

GIB = 2**30
_COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class ActivationEstimate:
    """Activation bytes of one microbatch on one rank (a model spec's estimate)."""

    saved: int
    """Kept from forward to backward: the units' inputs under full AC, everything without AC."""
    working: int
    """The largest unit's forward (re)computation and backward working set, alive at once."""
    outputs: int
    """Outside the units: embeddings, logits and the loss' fp32 copies and their gradients."""
    notes: str = ""
    """The assumptions (pack composition), printed with the plan."""

    @property
    def total(self) -> int:
        return self.saved + self.working + self.outputs


@dataclass
class MemoryPlan:
    """One rank's peak accelerator memory of a training step, by part, in bytes."""

    world_size: int
    dp_shard: int
    params_total: int
    params_trainable: int
    parameters: int
    gradients: int
    optimizer: int
    ema: int
    activations: ActivationEstimate
    transient: int
    host: int
    """What lives in host memory instead (offloaded states, a host EMA)."""

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.ema
            + self.activations.total
            + self.transient
        )

    def rows(self) -> list[tuple[str, str]]:
        gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
        rows = [
            (
                "parameters",
                f"{self.params_total / 1e9:.3f} B ({self.params_trainable / 1e9:.3f} B trainable)",
            ),
            (f"parameters (sharded over {self.dp_shard})", gib(self.parameters)),
            ("gradients", gib(self.gradients)),
            ("optimizer state (AdamW)", gib(self.optimizer)),
            ("EMA (fp32)", gib(self.ema)),
            ("activations", gib(self.activations.total)),
            ("largest transient (gathered params + unit grads)", gib(self.transient)),
            ("peak per rank", gib(self.total)),
            ("host memory per rank (offload / host EMA)", gib(self.host)),
        ]
        if self.activations.notes:
            rows.append(("assumes", self.activations.notes))
        return rows

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows())
        return "\n".join(f"{name:<{width}}  {value}" for name, value in self.rows())


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def generic_activations(
    units: Sequence[nn.Module],
    tokens: int,
    hidden_size: int,
    compute_bytes: int,
    activation_checkpointing: bool,
) -> ActivationEstimate:
    """Every unit sees every token: its input (AC) or its linear outputs (no AC) are kept."""
    linear_outputs = max(
        (sum(m.out_features for m in u.modules() if isinstance(m, nn.Linear)) for u in units), default=0
    )
    working = 2 * tokens * linear_outputs * compute_bytes
    per_unit = hidden_size if activation_checkpointing else linear_outputs
    return ActivationEstimate(
        tokens * per_unit * compute_bytes * len(units), working, 0, "every unit sees every token"
    )


def plan_memory(
    model: nn.Module,
    units: Sequence[nn.Module],
    *,
    world_size: int,
    dp_shard: int,
    dtype: str,
    cpu_offload: bool,
    ema: bool,
    ema_on_host: bool,
    activations: ActivationEstimate,
    separate: Sequence[nn.Module] = (),
) -> MemoryPlan:
    """The plan for `model` (on any device, meta included: only shapes are read); `separate`
    are the modules sharded on their own besides the units (see `apply_fsdp`)."""
    params = list(model.parameters())
    total = _numel(params)
    trainable = _numel(p for p in params if p.requires_grad)
    shard = lambda n: -(-n // dp_shard)  # noqa: E731
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    parameters = shard(sum(p.numel() * p.element_size() for p in params))
    gradients, optimizer = shard(trainable_bytes), 2 * shard(trainable_bytes)
    ema_bytes = 4 * shard(trainable) if ema else 0
    host = 0
    if cpu_offload:
        host += parameters + gradients + optimizer
        parameters = gradients = optimizer = 0
    if ema and (ema_on_host or cpu_offload):
        host, ema_bytes = host + ema_bytes, 0
    compute = _COMPUTE_BYTES[dtype]
    groups = list(units) + list(separate)
    in_groups = {id(p) for g in groups for p in g.parameters()}
    root = _numel(p for p in params if id(p) not in in_groups)
    unit_sizes = sorted((_numel(g.parameters()) for g in groups), reverse=True)
    unit_grads = max((_numel(p for p in g.parameters() if p.requires_grad) for g in groups), default=0)
    if dp_shard > 1 or dtype != "float32" or cpu_offload:  # FSDP2 is applied: gathers are transient
        transient = compute * (root + sum(unit_sizes[:2])) + 4 * unit_grads
    else:  # a plain module: the parameters are the fp32 master copy, nothing is gathered
        transient = 0
    return MemoryPlan(
        world_size,
        dp_shard,
        total,
        trainable,
        parameters,
        gradients,
        optimizer,
        ema_bytes,
        activations,
        transient,
        host,
    )


# -- kept for scripts that only want the sharded states -----------------------------------------


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
    """Activations (generic estimate: every unit sees every token)."""

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.gathered_units_gib + self.activations_gib

    def table(self) -> str:
        rows = [
            (
                "parameters",
                f"{self.params_total / 1e9:.3f} B ({self.params_trainable / 1e9:.3f} B trainable)",
            ),
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
    total = _numel(params)
    trainable = _numel(p for p in params if p.requires_grad)
    states = (4 * total + 12 * trainable) / dp_shard
    unit_sizes = sorted((_numel(u.parameters()) for u in units), reverse=True)
    gathered = compute_bytes * sum(unit_sizes[:2])
    acts = generic_activations(units, tokens_per_rank, hidden_size, compute_bytes, activation_checkpointing)
    return MemoryEstimate(total, trainable, dp_shard, states / GIB, gathered / GIB, acts.total / GIB)
