"""Which submodules are the per-block units that FSDP, activation checkpointing and compile use.

The model spec names them (`ModelSpec.sharding_units`); `[parallelism]
transformer_layer_cls_to_wrap` can name classes instead (HF-style), and then every module of
those classes is a unit, in module order.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def resolve_units(
    model: nn.Module, spec_units: Sequence[nn.Module], class_names: Sequence[str] = ()
) -> list[nn.Module]:
    """`spec_units`, or the modules whose class name is in `class_names` when that is non-empty.

    Raises if a named class does not occur in the model (listing the classes that do), or if
    a unit is not a submodule of `model`.
    """
    if class_names:
        wanted = set(class_names)
        units = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
        found = {type(m).__name__ for m in units}
        missing = sorted(wanted - found)
        if missing:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"[parallelism] transformer_layer_cls_to_wrap names {missing} but the model has "
                f"no module of that class; classes in the model: {', '.join(present)}"
            )
        return units
    members = {id(m) for m in model.modules()}
    for unit in spec_units:
        if id(unit) not in members or unit is model:
            raise ValueError(f"sharding unit {type(unit).__name__} is not a proper submodule of the model")
    return list(spec_units)
