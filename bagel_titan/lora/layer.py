"""The LoRA linear: a frozen `nn.Linear` plus a trainable low-rank update `scaling * B A`.

Our own module rather than peft's wrapper: peft moves the base weight to `<name>.base_layer.weight`,
which would rename every adapted tensor away from the model's official key that pretrained loading,
DCP checkpoints and the export rely on. `LoRALinear` keeps `weight`/`bias` where `nn.Linear` has
them and adds `lora_A` [rank, in] and `lora_B` [out, rank] (the shapes of peft's `lora_A.weight` and
`lora_B.weight`), plain parameters that FSDP2 shards beside the frozen base.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """`y = x W^T + b + scaling * dropout(x) A^T B^T`, `scaling = alpha / rank`.

    B starts at zero, so a fresh adapter leaves the output bitwise unchanged.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    @staticmethod
    def initial_adapters(
        rank: int, in_features: int, out_features: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full fp32 (A, B): A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform(a=sqrt(5))), B = 0."""
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        return a, torch.zeros(out_features, rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def merge_lora_weight(
    base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The merged weight `base + scaling * B @ A` of one adapted linear, computed in fp32 and
    returned in the dtype of `base`. Full (gathered) tensors in, one tensor out: an export loop
    calls it per official key."""
    merged = base.float() + scaling * (lora_b.float() @ lora_a.float())
    return merged.to(base.dtype)
