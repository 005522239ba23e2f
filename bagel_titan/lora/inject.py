"""Adding adapters to a model on the meta device, before parallelisation.

The model spec names what can be adapted (`ModelSpec.lora_groups`): module groups, each with its
projections and the `nn.Linear` modules behind them, and the groups that `train_also` can train
in full. The core resolves `[lora] targets` / `train_also` against that catalogue, swaps the
targeted linears for `LoRALinear` (same parameter names, two more each), freezes everything
else, and later initialises the adapters on the materialised, possibly sharded model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bagel_titan.config.job_config import LoRA as LoRAConfig
from bagel_titan.distributed.tensor_io import assign_full
from bagel_titan.errors import UserError
from bagel_titan.lora.layer import LoRALinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoRAGroups:
    """What a model spec offers to LoRA, by module name (names as in `model.named_modules()`)."""

    targets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Target group -> projection -> the `nn.Linear` modules of that projection. `[lora] targets`
    entries are "group" (every projection of it) or "group.projection"."""
    full: dict[str, list[str]] = field(default_factory=dict)
    """`[lora] train_also` group -> the modules trained in full beside the adapters."""
    default_targets: list[str] = field(default_factory=list)
    """The targets adapted when `[lora] targets` is empty (none: the config must name them)."""


def _valid_targets(groups: LoRAGroups) -> list[str]:
    """The target names that match at least one module of this model."""
    valid = []
    for group, projections in groups.targets.items():
        present = [p for p, names in projections.items() if names]
        if present:
            valid += [group] + [f"{group}.{p}" for p in present if p != group]
    return valid


def resolve_targets(targets: list[str], groups: LoRAGroups, model_name: str) -> list[str]:
    """Module names of the linears `targets` select (model order, no duplicates)."""
    valid = _valid_targets(groups)
    selected: set[str] = set()
    for target in targets:
        group, _, projection = target.partition(".")
        projections = groups.targets.get(group, {})
        names = [n for p, ns in projections.items() if not projection or p == projection for n in ns]
        if not names:
            raise UserError(
                f"[lora] targets: {target!r} matches no module of model {model_name!r}; valid targets: "
                f"{', '.join(valid)}"
            )
        selected.update(names)
    ordered = [n for projections in groups.targets.values() for ns in projections.values() for n in ns]
    return list(dict.fromkeys(n for n in ordered if n in selected))


def resolve_train_also(train_also: list[str], groups: LoRAGroups, model_name: str) -> list[str]:
    valid = [g for g, names in groups.full.items() if names]
    names: list[str] = []
    for group in train_also:
        if not groups.full.get(group):
            raise UserError(
                f"[lora] train_also: {group!r} matches no module group of model {model_name!r}; valid groups: "
                f"{', '.join(valid)}"
            )
        names += [n for n in groups.full[group] if n not in names]
    return names


def apply_lora(model: nn.Module, model_spec: Any, config: LoRAConfig) -> list[str]:
    """Swap the targeted linears of `model` (on the meta device) for `LoRALinear`, freeze every
    other parameter except the `train_also` groups, and cast: frozen parameters to
    `base_dtype`, adapters and `train_also` parameters to `dtype`. Returns the adapted module names."""
    groups = model_spec.lora_groups(model)
    if groups is None:
        raise UserError(
            f"[lora] enable = true but model spec {model_spec.name!r} does not support LoRA; "
            f"set [lora] enable = false"
        )
    wanted = config.targets or groups.default_targets
    if not wanted:
        raise UserError(
            f"[lora] targets is empty and model spec {model_spec.name!r} names no default targets; "
            f"name the module groups to adapt (valid: {', '.join(_valid_targets(groups))})"
        )
    targets = resolve_targets(wanted, groups, model_spec.name)
    full = resolve_train_also(config.train_also, groups, model_spec.name)
    for name in full:
        inside = [t for t in targets if t == name or t.startswith(name + ".")]
        if inside:
            raise UserError(
                f"[lora] train_also module {name!r} contains adapted linears ({inside[0]}, ...): a module is "
                f"trained in full or through adapters, not both; remove it from targets or train_also"
            )
    model.requires_grad_(False)
    trainable_dtype, base_dtype = DTYPES[config.dtype], DTYPES[config.base_dtype]
    for name in targets:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"LoRA target {name} is a {type(linear).__name__}, not an nn.Linear (model spec bug)"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, config.rank, config.alpha, config.dropout, trainable_dtype))
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    with torch.no_grad():
        for param in model.parameters():
            want = trainable_dtype if param.requires_grad else base_dtype
            if param.is_floating_point() and param.dtype != want:
                param.data = param.data.to(want)
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted linears of `model` by module name (empty without LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the adapters: not in a pretrained checkpoint, not in the merged export."""
    return {f"{name}.{p}" for name in lora_modules(model) for p in ("lora_A", "lora_B")}


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A random, B = 0 for every adapter. Each A is drawn in full from a generator seeded by `seed`
    and the module name, so the adapters are the same on any number of ranks."""
    for name, module in lora_modules(model).items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        a, b = LoRALinear.initial_adapters(module.rank, module.in_features, module.out_features, generator)
        assign_full(module.lora_A, a)
        assign_full(module.lora_B, b)
