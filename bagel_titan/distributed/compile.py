"""torch.compile per unit, in place.

`module.compile()` swaps the module's call implementation for a compiled one without wrapping
it in an `OptimizedModule`, so parameter names and state-dict keys stay the same. Each unit is a
repeated block, so one compiled graph is reused across units of the same class.

Packed batches change length every step, so the units are compiled with dynamic shapes from the
start: the token dimension is symbolic and a new pack length reuses the graph. (With dynamo's
default, the first graph is specialised to the first length and recompiled on the second.) Only
sizes 0 and 1 still get graphs of their own, e.g. a pack without any generation token.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def apply_compile(units: Sequence[nn.Module], backend: str = "inductor") -> None:
    """Compile every unit in place (`backend`: "inductor", or "aot_eager" for debugging)."""
    for unit in units:
        unit.compile(backend=backend, dynamic=True)
