"""torch.compile per unit (in place) and of loss functions.

`module.compile()` swaps the module's call implementation for a compiled one without wrapping
it in an `OptimizedModule`, so parameter names and state-dict keys stay the same. Each unit is a
repeated block, so one compiled graph is reused across units of the same class.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable)


def apply_compile(units: Sequence[nn.Module], backend: str = "inductor") -> None:
    """Compile every unit in place (`backend`: "inductor", or "aot_eager" for debugging)."""
    for unit in units:
        unit.compile(backend=backend)


def compile_function(fn: F, backend: str = "inductor") -> F:
    """A compiled version of a loss (or any tensor function) for `[compile] components`."""
    return torch.compile(fn, backend=backend)  # type: ignore[return-value]
