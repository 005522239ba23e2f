"""`flex`: compiled FlexAttention with a BlockMask built once per batch from BAGEL's mask rule.

The pack is padded up to a bucketed length so that the compiled kernel sees only a handful of
shapes over a run (the padding tokens belong to no document: they see nothing and their output
is zero). The BlockMask skips every 128x128 tile that the rule hides (other documents, later
segments, hidden noise), so the work follows the visible pairs rather than T^2.

FlexAttention has no backward on CPU: training with it needs a GPU (its forward runs on CPU,
compiled through the C++ inductor backend).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from bagel_titan.protocols import AttentionBackend, AttentionLayerSpec, AttentionModule

from .meta import AttentionMeta, mask_rule


@dataclass
class FlexConfig:
    """Options of the `flex` backend, the TOML table ``[attention.flex]``."""

    block_size: int = 128
    """BlockMask tile size (tokens); padded lengths are multiples of it."""
    buckets_per_octave: int = 4
    """Padded lengths lie on a grid of this many steps per doubling (multiples of `block_size`):
    4 wastes at most ~19% on padding and gives ~4 compiled shapes per doubling of the pack
    length; 1 pads to powers of two. 0 disables bucketing (pad to `block_size` only)."""
    compile: bool = True
    """Run flex_attention and the BlockMask construction through torch.compile (the fused
    kernel; the mask built tile by tile). False runs both unfused, materialising the scores and
    the whole mask: for debugging only."""
    compile_mode: str = ""
    """torch.compile mode for the kernel ("" for the default; e.g. "max-autotune-no-cudagraphs")."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 16:
            raise ValueError(
                f"[attention.flex] block_size must be a positive multiple of 16, got {self.block_size}"
            )
        if self.buckets_per_octave < 0:
            raise ValueError(
                f"[attention.flex] buckets_per_octave must be >= 0, got {self.buckets_per_octave}"
            )


def bucketed_length(num_tokens: int, block_size: int, buckets_per_octave: int) -> int:
    """The padded length for a pack of `num_tokens`: a multiple of `block_size`, at least
    `num_tokens`, on a grid of `buckets_per_octave` steps per doubling (few distinct shapes)."""
    blocks = max(1, math.ceil(num_tokens / block_size))
    if buckets_per_octave > 0 and blocks > 1:
        octave = 2 ** math.floor(math.log2(blocks))
        step = max(1, octave // buckets_per_octave)
        blocks = math.ceil(blocks / step) * step
    return blocks * block_size


def _padded_tables(meta: AttentionMeta, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The metadata's per-token tables extended to `length` with padding (document -1)."""
    pad = length - meta.num_tokens
    return (
        F.pad(meta.doc_ids, (0, pad), value=-1),
        F.pad(meta.segment_ids, (0, pad), value=int(meta.segment_ids.max()) + 1 if meta.num_tokens else 0),
        F.pad(meta.token_modes, (0, pad), value=0),
    )


def rule_mask_mod(doc_ids: torch.Tensor, segment_ids: torch.Tensor, token_modes: torch.Tensor) -> Callable:
    """A flex `mask_mod` applying BAGEL's rule over per-token tables."""

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_rule(doc_ids, segment_ids, token_modes, q_idx, kv_idx)

    return mask_mod


@functools.lru_cache(maxsize=None)
def _compiled_create_block_mask() -> Callable:
    return torch.compile(create_block_mask, dynamic=False)


@torch.compiler.disable
def flex_block_mask(meta: AttentionMeta, length: int, block_size: int, compiled: bool = True) -> BlockMask:
    """The batch's BlockMask over `length` (padded) tokens, built once and cached on `meta`.

    Kept out of a compiled layer's graph: it is per-batch work, not per-layer math. It is
    compiled on its own, because eager `create_block_mask` materialises the whole
    `length` x `length` mask and the rule's int64 temporaries: 10 GiB and 19 s at 32k tokens on
    CPU, against 0.35 GiB and 0.5 s compiled (benchmarks/RESULTS.md). It compiles once per
    bucketed length.
    """

    def build() -> BlockMask:
        mask_mod = rule_mask_mod(*_padded_tables(meta, length))
        make = _compiled_create_block_mask() if compiled else create_block_mask
        return make(mask_mod, None, None, length, length, device=meta.device, BLOCK_SIZE=block_size)

    return meta.cached(f"flex_block_mask:{length}:{block_size}", build)


@functools.lru_cache(maxsize=None)
def _compiled_flex(mode: str) -> Callable[..., Any]:
    return torch.compile(flex_attention, dynamic=False, mode=mode or None)


class FlexAttention(AttentionModule[AttentionMeta]):
    """Per-layer FlexAttention module (no parameters)."""

    def __init__(self, config: FlexConfig):
        super().__init__()
        self.config = config

    def prepare(self, meta: AttentionMeta) -> None:
        cfg = self.config
        flex_block_mask(
            meta,
            bucketed_length(meta.num_tokens, cfg.block_size, cfg.buckets_per_octave),
            cfg.block_size,
            cfg.compile,
        )

    def forward(
        self,
        q_THD: torch.Tensor,
        k_THD: torch.Tensor,
        v_THD: torch.Tensor,
        meta: AttentionMeta,
        hidden_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            q_THD.device.type == "cpu"
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q_THD, k_THD, v_THD))
        ):
            raise NotImplementedError(
                '[attention] backend = "flex" has no backward on CPU (FlexAttention limitation); '
                'train on a GPU, or select backend = "sdpa" or "eager" for CPU training'
            )
        cfg = self.config
        T = q_THD.shape[0]
        P = bucketed_length(T, cfg.block_size, cfg.buckets_per_octave)
        block_mask = flex_block_mask(meta, P, cfg.block_size, cfg.compile)

        def to_BHPD(x_THD: torch.Tensor) -> torch.Tensor:
            return F.pad(x_THD, (0, 0, 0, 0, 0, P - T)).transpose(0, 1).unsqueeze(0)

        attend: Callable[..., Any] = flex_attention
        if cfg.compile:
            attend = _compiled_flex(cfg.compile_mode)
        out_BHPD = attend(
            to_BHPD(q_THD),
            to_BHPD(k_THD),
            to_BHPD(v_THD),
            block_mask=block_mask,
            enable_gqa=q_THD.shape[1] != k_THD.shape[1],
        )
        return out_BHPD.squeeze(0).transpose(0, 1)[:T]

    def extra_repr(self) -> str:
        return f"block_size={self.config.block_size}, compile={self.config.compile}"


class FlexBackend(AttentionBackend):
    """The `flex` attention backend: compiled FlexAttention with a per-batch BlockMask."""

    name = "flex"
    trains_on_cpu = False
    """FlexAttention has no CPU backward: the config loader refuses a CPU training run with it."""
    config_section = "attention.flex"

    def build(self, spec: AttentionLayerSpec, config: FlexConfig | None) -> FlexAttention:
        return FlexAttention(config or FlexConfig())
