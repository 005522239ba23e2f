"""NSA branches through the `native-sparse-attention-triton` kernels (CUDA, fp16/bf16).

The library's compression (torch), compressed attention and top-k sparse attention (Triton)
run on the batch's causal key streams as one varlen batch. Its module uses flash-attn for the
sliding branch; we use compiled FlexAttention with a per-stream sliding-window BlockMask
instead (no extra dependency, same result), built once per batch and cached on the metadata.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ..flex import _compiled_flex, bucketed_length
from ..meta import AttentionMeta
from .config import NSAConfig
from .plan import NSAPlan
from .reference import NSABranches

LIBRARY_MODULE = "native_sparse_attention"
KERNEL_SIZES = (16, 32, 64, 128)
"""Compression kernel sizes the library's ops accept."""


def triton_installed() -> bool:
    """Whether `native-sparse-attention-triton` can be imported."""
    return importlib.util.find_spec(LIBRARY_MODULE) is not None


def triton_unusable_reason(cfg: NSAConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton path cannot serve this call, or None when it can."""
    if not triton_installed():
        return f"the {LIBRARY_MODULE!r} package (native-sparse-attention-triton) is not installed"
    if device.type != "cuda":
        return f"it needs a CUDA device, the tensors are on {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16 or bfloat16 tensors, got {dtype}"
    if cfg.kernel_size not in KERNEL_SIZES:
        return f"it needs kernel_size in {KERNEL_SIZES}, got {cfg.kernel_size}"
    return None


def _sliding_block_mask(meta: AttentionMeta, plan: NSAPlan, length: int, window_size: int) -> BlockMask:
    def build():
        stream_doc = torch.repeat_interleave(
            torch.arange(len(plan.stream_lengths), device=meta.device),
            torch.tensor(plan.stream_lengths, device=meta.device),
        )
        stream_doc = F.pad(stream_doc, (0, length - stream_doc.shape[0]), value=-1)

        def mask_mod(b, h, q_idx, kv_idx):
            same = (stream_doc[q_idx] == stream_doc[kv_idx]) & (stream_doc[q_idx] >= 0)
            return same & (kv_idx <= q_idx) & (kv_idx >= q_idx - window_size)

        return create_block_mask(mask_mod, None, None, length, length, device=meta.device)

    return meta.cached(f"nsa_sliding_block_mask:{length}:{window_size}", build)


def nsa_streams_triton(
    q_SHD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    compress_key: torch.Tensor | None,
    compress_value: torch.Tensor | None,
    intra_block_pe: torch.Tensor,
    cfg: NSAConfig,
    plan: NSAPlan,
    meta: AttentionMeta,
) -> NSABranches:
    """The three branches over all causal streams of the batch at once (varlen)."""
    from native_sparse_attention.ops import (
        avgpool_compress,
        compressed_attention,
        linear_compress,
        topk_sparse_attention,
        weightedpool_compress,
    )

    compressors = {
        "avgpool": avgpool_compress,
        "weightedpool": weightedpool_compress,
        "linear": linear_compress,
    }
    compress_fn = compressors[cfg.compress_type]
    dtype = q_SHD.dtype

    def cast(weight: torch.Tensor | None) -> torch.Tensor | None:
        return None if weight is None else weight.to(dtype)

    cu_seqlens = plan.stream_cu_seqlens
    k_cmp, cmp_cu_seqlens = compress_fn(
        k_SKD, cast(compress_key), cu_seqlens, cfg.kernel_size, cfg.kernel_stride, cast(intra_block_pe)
    )
    v_cmp, _ = compress_fn(v_SKD, cast(compress_value), cu_seqlens, cfg.kernel_size, cfg.kernel_stride, None)
    cmp_lengths = (cmp_cu_seqlens[1:] - cmp_cu_seqlens[:-1]).tolist()
    o_cmp, topk_idx = compressed_attention(
        q_SHD,
        k_cmp,
        v_cmp,
        cfg.kernel_size,
        cfg.kernel_stride,
        cfg.block_size,
        cfg.topk,
        cu_seqlens,
        cmp_cu_seqlens,
        plan.max_stream_length,
        max(cmp_lengths, default=0),
        None,
        cfg.init_blocks,
        cfg.local_blocks,
    )
    o_slc = topk_sparse_attention(q_SHD, k_SKD, v_SKD, topk_idx, cfg.block_size, cu_seqlens, None)

    S = q_SHD.shape[0]
    P = bucketed_length(S, 128, 4)
    block_mask = _sliding_block_mask(meta, plan, P, cfg.window_size)

    def to_BHPD(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, P - S)).transpose(0, 1).unsqueeze(0)

    o_win = _compiled_flex("")(
        to_BHPD(q_SHD),
        to_BHPD(k_SKD),
        to_BHPD(v_SKD),
        block_mask=block_mask,
        enable_gqa=q_SHD.shape[1] != k_SKD.shape[1],
    )
    o_win = o_win.squeeze(0).transpose(0, 1)[:S]
    return NSABranches(o_cmp, o_slc, o_win)
