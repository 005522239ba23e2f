"""torch.compile per unit, in place.

`module.compile()` swaps the module's call implementation for a compiled one without wrapping
it in an `OptimizedModule`, so parameter names and state-dict keys stay the same. Each unit is a
repeated block, so one compiled graph is reused across units of the same class.

Packed batches change length every step, so the units are compiled with dynamic shapes from the
start: the token dimension is symbolic and a new pack length reuses the graph. (With dynamo's
default, the first graph is specialised to the first length and recompiled on the second.) Only
sizes 0 and 1 still get graphs of their own, e.g. a pack without any generation token.

A few more graphs come from size thresholds the compiler bakes into the code it generates, not
from the length itself: inductor's CPU code sums a float32 reduction longer than 4096 elements
in chunks (`need_use_acc_helper`), so for every reduction over k x tokens a graph holds on one
side of 4096 / k tokens (debug shapes: 1024 and 2048 tokens of one MoT expert), and a pack on
the other side compiles once more. Bounded by the thresholds crossed, not by the steps: on the
anchor packs (1695-2027 tokens) 2 more layer graphs, plus 2 of the trainer's compiled loss (also
dynamic from the start: a batch with None where the first had a tensor, and a pack without CE
labels), all in the first four steps (`benchmarks/bench_anchor_step.py` counts them;
TORCH_LOGS=recompiles names each guard).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def apply_compile(units: Sequence[nn.Module], backend: str = "inductor") -> None:
    """Compile every unit in place (`backend`: "inductor", or "aot_eager" for debugging)."""
    for unit in units:
        unit.compile(backend=backend, dynamic=True)
