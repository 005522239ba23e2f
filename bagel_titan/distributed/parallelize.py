"""Apply the `[parallelism]`, `[activation_checkpoint]` and `[compile]` sections to a model.

Order matters: activation checkpointing first (so the compiled graph contains the recompute
boundaries), then compile, then FSDP (its hooks run outside the compiled graphs).
"""

from __future__ import annotations

from typing import Sequence

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


def parallelize(
    model: nn.Module,
    units: Sequence[nn.Module],
    job_config: JobConfig,
    mesh: DeviceMesh,
    ignored_modules: Sequence[nn.Module] = (),
    compile_backend: str = "inductor",
    separate_modules: Sequence[nn.Module] = (),
) -> list[nn.Module]:
    """AC -> compile -> FSDP on `model` in place; returns the units actually used (the spec's
    `units`, or those named by `[parallelism] transformer_layer_cls_to_wrap`).

    `ignored_modules` (frozen, e.g. the VAE) stay outside FSDP; `separate_modules` (embedding,
    output head) are sharded on their own, without AC.
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
    needs_fsdp = mesh.size() > 1 or job_config.training.dtype != "float32" or par.cpu_offload
    if par.fsdp and needs_fsdp:
        apply_fsdp(
            model,
            units,
            mesh,
            par,
            param_dtype=_DTYPES[job_config.training.dtype],
            reduce_dtype=torch.float32,
            ignored_modules=ignored_modules,
            separate_modules=separate_modules,
        )
    return units
