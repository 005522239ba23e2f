"""Attention metadata of one packed batch: built once, shared by every layer and every backend.

A packed sequence of T tokens holds several documents (samples); a document is a run of
segments, each with a mode:

- ``causal``: text; a token sees earlier tokens of its own segment and itself.
- ``full``: a ViT image or a clean VAE condition; every token sees the whole segment.
- ``noise``: noised VAE latents being generated; bidirectional inside, hidden from later segments.

BAGEL's rule, inside one document: a query in segment a sees a key in segment b iff
``(b < a and mode_b != noise) or (b == a and (mode_a != causal or k <= q))``.
Documents never see each other. Padding tokens (document id -1) see nothing and are seen by
nothing; their output is zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

from bagel_titan.protocols import AttentionModule

T = TypeVar("T")

SEGMENT_MODES = ("causal", "full", "noise")
CAUSAL, FULL, NOISE = 0, 1, 2


def mask_rule(
    doc_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    token_modes: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
) -> torch.Tensor:
    """BAGEL's mask rule on per-token [T] tables for (broadcastable) query and key indices.

    The single definition every backend derives its mask from (dense, flex mask_mod, NSA);
    tensor ops only, so it traces inside flex attention.
    """
    doc_q, doc_k = doc_ids[q_idx], doc_ids[kv_idx]
    seg_q, seg_k = segment_ids[q_idx], segment_ids[kv_idx]
    mode_q, mode_k = token_modes[q_idx], token_modes[kv_idx]
    same_doc = (doc_q == doc_k) & (doc_q >= 0)
    earlier_visible = (seg_k < seg_q) & (mode_k != NOISE)
    same_segment = (seg_k == seg_q) & ((mode_q != CAUSAL) | (kv_idx <= q_idx))
    return same_doc & (earlier_visible | same_segment)


@dataclass
class AttentionMeta:
    """Per-batch attention metadata (all tensors on the batch's device).

    Segment ids are global and increase along the sequence, so "segment b comes before
    segment a" is ``segment_id_b < segment_id_a`` once both are known to be in one document.
    """

    doc_ids: torch.Tensor
    """[T] int64 document (sample) of every token; -1 for padding."""
    segment_ids: torch.Tensor
    """[T] int64 global segment index of every token (non-decreasing)."""
    token_modes: torch.Tensor
    """[T] int64 mode of the token's segment (CAUSAL, FULL or NOISE)."""
    cu_seqlens: torch.Tensor
    """[num_docs + 1] int32 cumulative document offsets (padding excluded)."""
    segment_bounds: list[tuple[int, int, int, int]]
    """Per segment: (start, end, mode, doc) on the host, for backends that loop over segments."""
    doc_lengths: list[int]
    """Host copy of the document lengths."""
    position_ids: torch.Tensor | None = None
    """[T] RoPE positions, when the caller has them."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def has_padding(self) -> bool:
        """Whether tokens outside every document follow the documents (known on the host)."""
        return self.num_tokens > sum(self.doc_lengths)

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """Return `build()` computed once per batch under `key` (masks, block masks, ...)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- the mask rule -----------------------------------------------------------------------

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """BAGEL's mask rule for (broadcastable) query and key indices; True = may attend.

        Written with tensor ops only so it also serves as a flex-attention mask_mod.
        """
        return mask_rule(self.doc_ids, self.segment_ids, self.token_modes, q_idx, kv_idx)

    def dense_mask(self) -> torch.Tensor:
        """[T, T] bool mask (True = may attend), cached."""

        def build():
            idx = torch.arange(self.num_tokens, device=self.device)
            return self.allowed(idx[:, None], idx[None, :])

        return self.cached("dense_mask", build)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_segments(
        cls,
        doc_segments: Sequence[Sequence[tuple[int, str]]],
        *,
        pad_to: int | None = None,
        device: torch.device | str = "cpu",
        position_ids: torch.Tensor | None = None,
    ) -> "AttentionMeta":
        """Build from a list of documents, each a list of (length, mode) segments.

        `pad_to` appends padding tokens (document -1) up to that length.
        """
        lengths: list[int] = []
        modes: list[int] = []
        docs: list[int] = []
        bounds: list[tuple[int, int, int, int]] = []
        doc_lengths: list[int] = []
        pos = 0
        for doc, segments in enumerate(doc_segments):
            doc_len = 0
            for length, mode in segments:
                if mode not in SEGMENT_MODES:
                    raise ValueError(f"unknown segment mode {mode!r}; expected one of {SEGMENT_MODES}")
                if length <= 0:
                    continue
                m = SEGMENT_MODES.index(mode)
                lengths.append(length)
                modes.append(m)
                docs.append(doc)
                bounds.append((pos, pos + length, m, doc))
                pos += length
                doc_len += length
            doc_lengths.append(doc_len)
        pad = pad_to - pos if pad_to is not None and pad_to > pos else 0
        if pad:  # padding: one more segment, document -1
            lengths.append(pad)
            modes.append(CAUSAL)
            docs.append(-1)
        # Per-token tables by repeating per-segment values: no Python loop over tokens.
        repeats = torch.tensor(lengths, dtype=torch.long)
        cu = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(doc_lengths, dtype=torch.int32), 0, out=cu[1:])
        dev = torch.device(device)
        return cls(
            doc_ids=torch.repeat_interleave(torch.tensor(docs, dtype=torch.long), repeats).to(dev),
            segment_ids=torch.repeat_interleave(torch.arange(len(lengths)), repeats).to(dev),
            token_modes=torch.repeat_interleave(torch.tensor(modes, dtype=torch.long), repeats).to(dev),
            cu_seqlens=cu.to(dev),
            segment_bounds=bounds,
            doc_lengths=doc_lengths,
            position_ids=position_ids,
        )

    @classmethod
    def full_documents(cls, lengths: Sequence[int], device: torch.device | str = "cpu") -> "AttentionMeta":
        """Every document is one `full` segment: the ViT's per-image attention."""
        return cls.from_segments([[(n, "full")] for n in lengths], device=device)

    def prepare_for(self, attention_module: AttentionModule[AttentionMeta]) -> None:
        """Build what `attention_module` needs for this batch (masks, plans) now, once, outside
        the layers: built lazily inside a checkpointed or compiled layer, a cache would differ
        between the forward and its recomputation."""
        attention_module.prepare(self)

    def to(self, device: torch.device | str) -> "AttentionMeta":
        """The same metadata on `device` (non-blocking copies); the cache stays behind: what
        `prepare` builds is per device."""
        device = torch.device(device)
        if self.device == device:
            return self
        return AttentionMeta(
            doc_ids=self.doc_ids.to(device, non_blocking=True),
            segment_ids=self.segment_ids.to(device, non_blocking=True),
            token_modes=self.token_modes.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            segment_bounds=self.segment_bounds,
            doc_lengths=self.doc_lengths,
            position_ids=None
            if self.position_ids is None
            else self.position_ids.to(device, non_blocking=True),
        )
