"""FSDP2 (`fully_shard`) per unit, then the root: FSDP over a 1-D mesh, HSDP over a 2-D one.

Mixed precision: parameters are gathered in `param_dtype` for compute, gradients reduced in
`reduce_dtype`; the sharded master weights (and so the optimizer) stay fp32.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from bagel_titan.config.job_config import Parallelism


def reshard_after_forward_for(policy: str, unit_index: int, num_units: int) -> bool:
    """Whether unit `unit_index` frees its gathered parameters after forward.

    "default" keeps the last unit gathered: backward starts with it, so resharding it would
    only gather it again immediately.
    """
    if policy == "always":
        return True
    if policy == "never":
        return False
    return unit_index < num_units - 1  # "default" (the config admits only these three)


def apply_fsdp(
    model: nn.Module,
    units: Sequence[nn.Module],
    mesh: DeviceMesh,
    parallelism_cfg: Parallelism,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    separate_modules: Sequence[nn.Module] = (),
) -> nn.Module:
    """`fully_shard` every unit, then each of `separate_modules`, then the root (which takes the
    remaining parameters).

    `separate_modules` (e.g. the token embedding and the output head) are large modules outside
    the units: sharded on their own, they are gathered only around their own use instead of
    through the whole step with the root. The first frees its gathered parameters after
    forward; the others (used last in forward, first in backward) keep them until backward.

    Returns `model` (sharded in place; parameters become DTensors, state-dict keys are
    unchanged).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory makes the copies to an accelerator asynchronous; a CPU job has none.
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
        if parallelism_cfg.cpu_offload
        else OffloadPolicy()
    )
    policy = parallelism_cfg.reshard_after_forward
    for index, unit in enumerate(units):
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward_for(policy, index, len(units)),
            mp_policy=mp_policy,
            offload_policy=offload,
        )
    for index, module in enumerate(separate_modules):
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=index == 0 and policy != "never",
            mp_policy=mp_policy,
            offload_policy=offload,
        )
    fully_shard(
        model,
        mesh=mesh,
        # FSDP keeps the root's parameters gathered after forward regardless (backward needs
        # them first); the flag only matters for its nested state.
        reshard_after_forward=policy != "never",
        mp_policy=mp_policy,
        offload_policy=offload,
    )
    return model
