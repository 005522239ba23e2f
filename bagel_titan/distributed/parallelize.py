"""Apply the `[parallelism]`, `[activation_checkpoint]` and `[compile]` sections to a model.

Order matters: activation checkpointing first (so the compiled graph contains the recompute
boundaries), then compile, then FSDP (its hooks run outside the compiled graphs).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from bagel_titan.config.job_config import JobConfig
from bagel_titan.distributed.activation_checkpoint import apply_activation_checkpointing
from bagel_titan.distributed.compile import apply_compile
from bagel_titan.distributed.parallel_dims import ParallelismConfigError
from bagel_titan.distributed.fsdp import apply_fsdp
from bagel_titan.distributed.units import resolve_units

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def wraps_with_fsdp(job_config: JobConfig, world_size: int) -> bool:
    """Whether `parallelize` wraps the model with FSDP2: with data parallelism or CPU offload.

    A single rank without offload runs unwrapped, whatever its dtype: FSDP2 would shard nothing
    and still pay per-layer hooks and, in bf16, a cast copy of every parameter each step; the
    trainer computes in bf16 there under `torch.autocast` instead (see `compute_autocast`).
    """
    par = job_config.parallelism
    return par.fsdp and (world_size > 1 or par.cpu_offload)


def compute_autocast(job_config: JobConfig, world_size: int, device_type: str) -> ContextManager[Any]:
    """The context the forward and loss run in: bf16 autocast on an unwrapped rank that trains
    in bf16 (fp32 master weights, bf16 matmuls), else nothing (fp32, or FSDP2's mixed precision
    casts the parameters itself)."""
    if job_config.training.dtype == "float32" or wraps_with_fsdp(job_config, world_size):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[job_config.training.dtype])


def parallelize(
    model: nn.Module,
    units: Sequence[nn.Module],
    job_config: JobConfig,
    mesh: DeviceMesh,
    compile_backend: str = "inductor",
    separate_modules: Sequence[nn.Module] = (),
) -> list[nn.Module]:
    """AC -> compile -> FSDP on `model` in place; returns the units actually used (the spec's
    `units`, or those named by `[parallelism] transformer_layer_cls_to_wrap`).

    `separate_modules` (embedding, output head) are sharded on their own, without AC.
    """
    par = job_config.parallelism
    if not par.fsdp and mesh.size() > 1:
        raise ParallelismConfigError(
            f"[parallelism] fsdp = false only works on a single rank, but the mesh has "
            f"{mesh.size()}; set fsdp = true to train data-parallel"
        )
    units = resolve_units(model, units, par.transformer_layer_cls_to_wrap)
    ac = job_config.activation_checkpoint
    apply_activation_checkpointing(model, units, ac, ac.selective_granularity)
    if job_config.compile.enable and "model" in job_config.compile.components:
        apply_compile(units, backend=compile_backend)
    if wraps_with_fsdp(job_config, mesh.size()):
        apply_fsdp(
            model,
            units,
            mesh,
            par,
            param_dtype=_DTYPES[job_config.training.dtype],
            reduce_dtype=torch.float32,
            separate_modules=separate_modules,
        )
    return units
