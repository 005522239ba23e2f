"""`Stateful` adapters for what goes into a checkpoint besides plain objects.

Model and optimizer go through `torch.distributed.checkpoint.state_dict` so that FSDP2
DTensor shards are saved per rank under the model's own parameter names and resharded on load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class ModelState:
    """The model's (sharded) state dict, keyed by parameter/buffer name.

    `exclude_frozen` leaves parameters with `requires_grad=False` (a frozen VAE or LLM) out of
    checkpoints: they never change, so the run restores them from the pretrained weights it
    loads before resuming, and checkpoints hold only the trained state.
    """

    def __init__(self, model: nn.Module, exclude_frozen: bool = False):
        self.model = model
        self.options = StateDictOptions(ignore_frozen_params=exclude_frozen, strict=not exclude_frozen)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        result = set_model_state_dict(self.model, state, options=self.options)
        if result.unexpected_keys:
            raise KeyError(f"checkpoint has unknown model keys: {result.unexpected_keys[:10]}")


class OptimizerState:
    """The optimizer's state keyed by parameter name (not index), so it survives resharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
