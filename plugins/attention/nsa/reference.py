"""Native sparse attention in plain PyTorch: any device, any dtype (softmax in fp32), slow.

It computes, for causal queries over one document (a causal key stream: query t sees keys
0..t), the three NSA branches of `native-sparse-attention-triton`:

- compressed: attention over compressed tokens whose whole window lies at or before t;
- selected: exact attention over the keys <= t of the top-k blocks, ranked by the compressed
  attention probabilities (summed over the query heads of a KV head) spread onto the blocks
  each compressed window overlaps, with the first `init_blocks` and the `local_blocks` ending
  at t's block always chosen;
- sliding: exact attention over keys t - window_size .. t.

Queries are processed `query_chunk` at a time so memory stays O(chunk * L). The top-k choice is
not differentiable (as in the paper); gradients reach the compression parameters through the
compressed branch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import NSAConfig


class NSABranches(NamedTuple):
    """The three branch outputs, each [L, Hq, D]."""

    compressed: torch.Tensor
    selected: torch.Tensor
    sliding: torch.Tensor


def _attend(
    q_KGRD: torch.Tensor, k_KSD: torch.Tensor, v_KSD: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention in fp32; `mask` broadcasts to [K, G, R, S]; empty rows give 0."""
    scores = torch.einsum("kgrd,ksd->kgrs", q_KGRD, k_KSD) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("kgrs,ksd->kgrd", probs, v_KSD)


def block_overlap_weights(
    num_cmp: int, num_blocks: int, cfg: NSAConfig, device: torch.device
) -> torch.Tensor:
    """[N, Nb] how many `kernel_stride` chunks of compressed window c fall in selection block j:
    the weight with which c's attention probability counts towards block j's score."""
    c_start = torch.arange(num_cmp, device=device) * cfg.kernel_stride
    j_start = torch.arange(num_blocks, device=device) * cfg.block_size
    lo = torch.maximum(c_start[:, None], j_start[None, :])
    hi = torch.minimum(c_start[:, None] + cfg.kernel_size, j_start[None, :] + cfg.block_size)
    return (hi - lo).clamp(min=0).float() / cfg.kernel_stride


def select_blocks(block_score_KRB: torch.Tensor, q_pos_R: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """[K, R, Nb] bool: the blocks each query (at positions `q_pos_R`) attends to per KV head."""
    num_blocks = block_score_KRB.shape[-1]
    block_B = torch.arange(num_blocks, device=q_pos_R.device)
    q_block_R1 = (q_pos_R // cfg.block_size)[:, None]
    forced_RB = (block_B[None, :] < cfg.init_blocks) | (
        (block_B[None, :] <= q_block_R1) & (block_B[None, :] > q_block_R1 - cfg.local_blocks)
    )
    score = block_score_KRB.masked_fill(forced_RB, float("inf"))
    score = score.masked_fill(block_B[None, :] > q_block_R1, float("-inf"))
    k = min(cfg.topk, num_blocks)
    selected = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return selected
    top_values, top_index = score.topk(k, dim=-1)
    return selected.scatter(-1, top_index, top_values > float("-inf"))


def nsa_document(
    q_LHD: torch.Tensor,
    k_LKD: torch.Tensor,
    v_LKD: torch.Tensor,
    k_cmp_NKD: torch.Tensor,
    v_cmp_NKD: torch.Tensor,
    cfg: NSAConfig,
) -> NSABranches:
    """The three NSA branches for the causal queries of one document (see the module doc)."""
    L, num_heads, head_dim = q_LHD.shape
    num_kv_heads = k_LKD.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    device = q_LHD.device
    out_dtype = q_LHD.dtype

    q_KGLD = q_LHD.float().view(L, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    k_KLD, v_KLD = k_LKD.float().transpose(0, 1), v_LKD.float().transpose(0, 1)
    kc_KND, vc_KND = k_cmp_NKD.float().transpose(0, 1), v_cmp_NKD.float().transpose(0, 1)
    num_cmp = kc_KND.shape[1]
    cmp_last_pos_N = torch.arange(num_cmp, device=device) * cfg.kernel_stride + cfg.kernel_size - 1

    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for r0 in range(0, L, cfg.query_chunk):
        r1 = min(L, r0 + cfg.query_chunk)
        q_pos_R = torch.arange(r0, r1, device=device)
        k_pos_S = torch.arange(r1, device=device)
        q_KGRD = q_KGLD[:, :, r0:r1]
        causal_RS = k_pos_S[None, :] <= q_pos_R[:, None]

        # compressed branch: windows that end at or before the query
        cmp_mask_RN = cmp_last_pos_N[None, :] <= q_pos_R[:, None]
        cmp_scores = torch.einsum("kgrd,knd->kgrn", q_KGRD, kc_KND) * scale
        cmp_probs = torch.softmax(cmp_scores.masked_fill(~cmp_mask_RN, float("-inf")), dim=-1).nan_to_num(0.0)
        o_cmp = torch.einsum("kgrn,knd->kgrd", cmp_probs, vc_KND)

        # selected branch: top-k blocks by the compressed probabilities
        with torch.no_grad():
            num_blocks = math.ceil(r1 / cfg.block_size)
            overlap_NB = block_overlap_weights(num_cmp, num_blocks, cfg, device)
            block_score_KRB = cmp_probs.detach().sum(dim=1) @ overlap_NB
            selected_KRB = select_blocks(block_score_KRB, q_pos_R, cfg)
            key_block_S = k_pos_S // cfg.block_size
            slc_mask_KRS = selected_KRB[:, :, key_block_S] & causal_RS
        o_slc = _attend(q_KGRD, k_KLD[:, :r1], v_KLD[:, :r1], slc_mask_KRS[:, None], scale)

        # sliding branch
        win_mask_RS = causal_RS & (k_pos_S[None, :] >= q_pos_R[:, None] - cfg.window_size)
        o_win = _attend(q_KGRD, k_KLD[:, :r1], v_KLD[:, :r1], win_mask_RS, scale)
        chunks.append((o_cmp, o_slc, o_win))

    def assemble(i: int) -> torch.Tensor:
        out_KGLD = torch.cat([c[i] for c in chunks], dim=2)
        return out_KGLD.permute(2, 0, 1, 3).reshape(L, num_heads, head_dim).to(out_dtype)

    return NSABranches(assemble(0), assemble(1), assemble(2))
