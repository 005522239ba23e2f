"""How a packed multimodal batch maps onto NSA: built once per batch, cached on the metadata.

NSA is a causal algorithm; BAGEL's rule is not. The mapping that keeps the rule exact:

- A causal (text) query at position p sees exactly the non-noise tokens of its document up to
  p (earlier ``full`` segments whole, its own segment causally; earlier ``noise`` segments are
  hidden). So each document's tokens outside ``noise`` segments, in order, form a *causal key
  stream* on which plain causal NSA (compression, selection, window) is exactly the rule's
  visibility, and noised latents can reach no compressed token, block or window.
- Queries in ``full`` and ``noise`` segments get exact attention over the keys the rule allows
  (per document, one masked SDPA call over that document's keys).

Documents never mix: streams and exact calls are per document, offsets cumulative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..meta import CAUSAL, NOISE, AttentionMeta


@dataclass(frozen=True)
class ExactCall:
    """Exact attention for the non-causal queries of one document."""

    rows: torch.Tensor
    """[R] pack positions of the queries (tokens of ``full``/``noise`` segments)."""
    start: int
    end: int
    """The document's key range [start, end) in the pack."""
    mask_RL: torch.Tensor
    """[R, end - start] the rule's mask for those queries."""


@dataclass(frozen=True)
class NSAPlan:
    """Index tables of one packed batch for the NSA backend."""

    stream_index: torch.Tensor
    """[S] pack positions of the causal key streams, document after document."""
    stream_lengths: list[int]
    """Length of each (non-empty) document stream; their sum is S."""
    stream_cu_seqlens: torch.Tensor
    """[num_streams + 1] int32 cumulative stream offsets (for varlen kernels)."""
    causal_rows: torch.Tensor
    """[C] pack positions of the causal queries."""
    causal_in_stream: torch.Tensor
    """[C] where each causal query sits in the stream."""
    exact_calls: list[ExactCall]
    """One per document that has non-causal queries."""

    @property
    def max_stream_length(self) -> int:
        return max(self.stream_lengths, default=0)


@torch.compiler.disable
def nsa_plan(meta: AttentionMeta) -> NSAPlan:
    """The batch's NSA plan (cached on `meta`; built eagerly even inside a compiled layer)."""
    return meta.cached("nsa_plan", lambda: _build_plan(meta))


def _build_plan(meta: AttentionMeta) -> NSAPlan:
    device = meta.device
    segments_by_doc: dict[int, list[tuple[int, int, int]]] = {}
    for start, end, mode, doc in meta.segment_bounds:
        segments_by_doc.setdefault(doc, []).append((start, end, mode))

    stream_ranges: list[range] = []
    stream_lengths: list[int] = []
    causal_rows: list[range] = []
    causal_in_stream: list[range] = []
    exact_calls: list[ExactCall] = []
    stream_pos = 0
    for doc in sorted(segments_by_doc):
        segments = segments_by_doc[doc]
        doc_start, doc_end = segments[0][0], segments[-1][1]
        doc_stream = 0
        exact_rows: list[range] = []
        for start, end, mode in segments:
            if mode == CAUSAL:
                causal_rows.append(range(start, end))
                causal_in_stream.append(range(stream_pos + doc_stream, stream_pos + doc_stream + end - start))
            else:
                exact_rows.append(range(start, end))
            if mode != NOISE:
                stream_ranges.append(range(start, end))
                doc_stream += end - start
        if doc_stream:
            stream_lengths.append(doc_stream)
            stream_pos += doc_stream
        if exact_rows:
            rows = _index(exact_rows, device)
            cols = torch.arange(doc_start, doc_end, device=device)
            exact_calls.append(
                ExactCall(rows, doc_start, doc_end, meta.allowed(rows[:, None], cols[None, :]))
            )

    cu = [0]
    for n in stream_lengths:
        cu.append(cu[-1] + n)
    return NSAPlan(
        stream_index=_index(stream_ranges, device),
        stream_lengths=stream_lengths,
        stream_cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        causal_rows=_index(causal_rows, device),
        causal_in_stream=_index(causal_in_stream, device),
        exact_calls=exact_calls,
    )


def _index(ranges: list[range], device: torch.device) -> torch.Tensor:
    values = [i for r in ranges for i in r]
    return torch.tensor(values, dtype=torch.long, device=device)
