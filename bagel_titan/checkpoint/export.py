"""Export inference weights: every rank calls the model spec's streaming export (tensors are
gathered one at a time; rank 0 writes) into a temporary folder that rank 0 renames into place,
so a crash never leaves a half-written export under the final name."""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bagel_titan.optim.ema import EMA


def _release_free_host_memory() -> None:
    """Hand the pages the C allocator kept after the training step back to the OS (glibc keeps
    freed small blocks), so the export's one full tensor does not come on top of them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def export_weights(
    model_spec: Any,
    model: nn.Module,
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    ema: EMA | None = None,
) -> None:
    """`model_spec.export(model, tmp, dtype, state_dict=..., ema=...)`, then rename. Collective.

    With an EMA its (sharded) shadow replaces the trainable parameters and the spec names the
    file for EMA weights; without one the raw weights are written under the raw-weights name.
    Nothing is gathered here: the spec gathers each tensor as it writes it. An existing `path`
    is replaced.
    """
    _release_free_host_memory()
    distributed = dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    tmp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    if rank0:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        os.chmod(tmp, 0o755)
    model_spec.export(model, tmp, dtype, state_dict=ema.state_dict() if ema is not None else None,
                      ema=ema is not None)
    if rank0:
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()
