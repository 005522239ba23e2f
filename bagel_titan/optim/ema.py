"""Exponential moving average of the trainable parameters, kept in fp32 and sharded like them.

Under FSDP2 every parameter is a DTensor shard; the shadow of a parameter is a DTensor with the
same mesh and placements, so each rank only averages (and checkpoints) its own shard: the EMA is
created sharded from the sharded model, never from a full copy. The update runs on the local
shards with one fused `_foreach_lerp_`. With `device="cpu"` the shards live in host memory (as
FSDP2's CPU offload keeps parameters): the accelerator holds no EMA at all, and each update
copies the parameter shards to the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from bagel_titan.distributed.tensor_io import gather_full


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shadow_of(p: torch.Tensor, device: str) -> torch.Tensor:
    """An fp32 copy of `p` (a DTensor stays one, same mesh and placements) on `device`
    ("param": where the parameter's shard lives)."""
    local = _local(p.detach())
    local = local.to(device=local.device if device == "param" else device, dtype=torch.float32, copy=True)
    if isinstance(p, DTensor):
        return DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return local


class EMA:
    """`shadow <- decay * shadow + (1 - decay) * param` every `update_interval` steps.

    Before `start_step` the shadow copies the parameters (no averaging), so the average only
    starts once training has moved away from the initial weights. Keys are the model's parameter
    names, so `full_state_dict()` is in the model's own (official) layout.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        start_step: int = 0,
        update_interval: int = 1,
        device: str = "param",
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"[ema] decay must be in [0, 1], got {decay}")
        if update_interval < 1:
            raise ValueError(f"[ema] update_interval must be >= 1, got {update_interval}")
        if start_step < 0:
            raise ValueError(f"[ema] start_step must be >= 0, got {start_step}")
        self.decay = decay
        self.start_step = start_step
        self.update_interval = update_interval
        self._params: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
        if not self._params:
            raise ValueError("[ema] enable = true but the model has no trainable parameters")
        self.shadow: dict[str, torch.Tensor] = {
            name: _shadow_of(p, device) for name, p in self._params.items()
        }

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the current parameters in after optimizer step `step` (1-based); returns whether
        this step updated the shadow."""
        if step % self.update_interval:
            return False
        shadow_local = [_local(self.shadow[n]) for n in self._params]
        param_local = self._param_locals(shadow_local)
        if step <= self.start_step:
            torch._foreach_copy_(shadow_local, param_local)
        else:
            torch._foreach_lerp_(shadow_local, param_local, 1.0 - self.decay)
        return True

    def _param_locals(self, shadow_local: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters' local shards, as fp32 on the shadow's device (a no-op when they are
        already there)."""
        return [
            _local(p.detach()).to(device=s.device, dtype=torch.float32)
            for p, s in zip(self._params.values(), shadow_local)
        ]

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Reset the shadow to the current parameters (after loading pretrained weights)."""
        shadow_local = [_local(self.shadow[n]) for n in self._params]
        torch._foreach_copy_(shadow_local, self._param_locals(shadow_local))

    def state_dict(self) -> dict[str, Any]:
        """The shadow tensors themselves (DTensors under FSDP), so DCP saves each rank's shard
        and loads in place, resharding on a different world size."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the trainable parameters: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (was the freeze policy changed since the checkpoint?)"
            )
        for name, value in state.items():
            if value is not self.shadow[name]:
                _local(self.shadow[name]).copy_(_local(value))

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Unsharded fp32 CPU tensors by parameter name, for export.

        Collective: every rank must call it. With `rank0_only` other ranks get an empty dict
        (each tensor is gathered and dropped one at a time, so they never hold the full model).
        """
        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        full: dict[str, torch.Tensor] = {}
        for name, value in self.shadow.items():
            tensor = gather_full(value)
            if keep:
                full[name] = tensor if isinstance(value, DTensor) else tensor.clone()
        return full
