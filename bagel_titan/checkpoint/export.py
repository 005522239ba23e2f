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

from bagel_titan.config.job_config import LoRA
from bagel_titan.distributed.tensor_io import gather_full
from bagel_titan.lora import LoRAExport
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
    lora: LoRA | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """`model_spec.export(model, tmp, dtype, state_dict=..., ema=...)`, then rename. Collective.

    With an EMA its (sharded) shadow replaces the trainable parameters and the spec names the
    file for EMA weights; without one the raw weights are written under the raw-weights name.
    Nothing is gathered here: the spec gathers each tensor as it writes it. A model with LoRA
    adapters is exported merged (base + alpha/rank * B A under the official keys), with the
    adapters alone in peft's format under `path/adapter/`. An existing `path` is replaced.
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
    ema_state = ema.state_dict() if ema is not None else None
    lora_export = LoRAExport.of(model, lora, base_model_name_or_path) if lora is not None else None
    extra = {"lora": lora_export} if lora_export is not None else {}
    model_spec.export(model, tmp, dtype, state_dict=ema_state, ema=ema is not None, **extra)
    if lora_export is not None:
        tensors = {**model.state_dict(), **(ema_state or {})}
        lora_export.write_adapter(
            os.path.join(tmp, "adapter"), lambda key: gather_full(tensors[key]), write=rank0
        )
    if rank0:
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()
