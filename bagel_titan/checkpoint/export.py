"""Export inference weights: gather full (unsharded) state dicts, rank 0 writes through the
model spec, into a temporary folder renamed into place, so a crash never leaves a half-written
export under the final name."""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bagel_titan.config.job_config import LoRA
from bagel_titan.lora import LoRAExport
from bagel_titan.optim.ema import EMA


def export_weights(
    model_spec: Any,
    model: nn.Module,
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    ema: EMA | None = None,
    lora: LoRA | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write `model_spec.export(model, path, dtype, state_dict=...)` atomically. Collective.

    The state dict is the model's full weights, with the EMA shadow (when given) replacing the
    trainable parameters: so `path` then holds the EMA weights in the official layout. A model
    with LoRA adapters is exported merged (base + alpha/rank * B A under the official keys) with
    the adapters alone in peft's format under `path/adapter/`. An existing `path` is replaced.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    full: dict[str, torch.Tensor] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if ema is not None:
        full.update(ema.full_state_dict(rank0_only=True))
    lora_export = LoRAExport.of(model, lora, base_model_name_or_path) if lora is not None else None
    if rank0:
        _write_atomically(model_spec, model, path, dtype, full, lora_export)
    if dist.is_initialized():
        dist.barrier()


def _write_atomically(
    model_spec: Any, model: nn.Module, path: str, dtype: torch.dtype, state: Mapping[str, torch.Tensor],
    lora_export: LoRAExport | None = None,
) -> None:
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp")
    old = os.path.join(parent, f".{name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora_export is not None:
        full_of = state.__getitem__
        lora_export.write_adapter(os.path.join(tmp, "adapter"), full_of)
        state = {k: lora_export.merged(k, v, full_of) for k, v in state.items() if not lora_export.skip(k)}
    model_spec.export(model, tmp, dtype, state_dict=state)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
