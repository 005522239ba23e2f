"""`eager`: the exact reference. Dense [T, T] mask from the mask rule, softmax in fp32."""

from __future__ import annotations

import math

import torch

from bagel_titan.protocols import AttentionBackend, AttentionLayerSpec, AttentionModule

from .meta import AttentionMeta


def eager_attention(
    q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, mask_TT: torch.Tensor
) -> torch.Tensor:
    """Masked softmax attention with grouped-query K/V; rows with no visible key return zeros."""
    num_heads, num_kv_heads = q_THD.shape[1], k_THD.shape[1]
    group = num_heads // num_kv_heads
    k_THD = k_THD.repeat_interleave(group, dim=1)
    v_THD = v_THD.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q_THD.shape[-1])
    scores_HTT = torch.einsum("qhd,khd->hqk", q_THD.float(), k_THD.float()) * scale
    scores_HTT = scores_HTT.masked_fill(~mask_TT, float("-inf"))
    probs_HTT = torch.softmax(scores_HTT, dim=-1)
    # Padding rows see nothing: softmax of all -inf is NaN, and their output must be zero.
    probs_HTT = torch.nan_to_num(probs_HTT, nan=0.0)
    out_THD = torch.einsum("hqk,khd->qhd", probs_HTT, v_THD.float())
    return out_THD.to(q_THD.dtype)


class EagerAttention(AttentionModule[AttentionMeta]):
    def prepare(self, meta: AttentionMeta) -> None:
        meta.dense_mask()

    def forward(
        self,
        q_THD: torch.Tensor,
        k_THD: torch.Tensor,
        v_THD: torch.Tensor,
        meta: AttentionMeta,
        hidden_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return eager_attention(q_THD, k_THD, v_THD, meta.dense_mask())


class EagerBackend(AttentionBackend):
    name = "eager"

    def build(self, spec: AttentionLayerSpec, config: None = None) -> EagerAttention:
        return EagerAttention()
