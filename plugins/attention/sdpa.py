"""`sdpa`: `torch.nn.functional.scaled_dot_product_attention` over a packed batch.

Three settings of ``[attention.sdpa] strategy`` apply BAGEL's mask rule:

- ``dense``: one SDPA call over the whole pack with the [T, T] boolean mask, built once per batch
  and cached on the metadata. No Python loop; memory and work grow with T^2 (the kernel skips
  nothing), which is fine for packs of a few thousand tokens.
- ``per_document``: SDPA calls per document, unmasked wherever the rule allows: plain causal
  text is one ``is_causal`` call, a ``full`` or ``noise`` segment one call over its document's
  prefix, so a t2i sample (caption, then its noised image) is two unmasked calls and flash
  attention applies on a GPU. Only a document where a ``noise`` segment has later tokens keeps
  an [L, L] mask. Work grows with the sum over documents of at most L^2.
- ``auto`` (default): whichever costs less for the pack at hand. A dense call does T^2 pairs of
  work; the per-document calls do their queries x keys plus a fixed cost per call (launch,
  slicing), counted as ``document_call_tokens``^2 pairs. A pack of several documents goes per
  document (the anchors' 2k packs of 6-10 samples: 7-12x less attention work); only a pack of
  very many tiny documents stays dense.

Grouped-query attention uses ``enable_gqa=True`` (no repeated K/V) whenever a fused kernel
accepts it for the call at hand; on CUDA, masked calls whose only fused kernel lacks GQA support
get K/V repeated instead, which beats the unfused fallback by far. On a CPU, short bf16 calls
that will be differentiated compute in fp32 (`CPU_FP32_ATTENTION_TOKENS`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bagel_titan.protocols import AttentionBackend, AttentionLayerSpec, AttentionModule

from .meta import CAUSAL, NOISE, AttentionMeta

STRATEGIES = ("auto", "dense", "per_document")


@dataclass
class SDPAConfig:
    """Options of the `sdpa` backend, the TOML table ``[attention.sdpa]``."""

    strategy: str = "auto"
    """How the mask rule is applied: "dense" (one call, [T, T] mask), "per_document" (calls per
    document, unmasked wherever the rule allows) or "auto" (per pack, whichever does less work;
    see `document_call_tokens`)."""
    document_call_tokens: int = 64
    """The fixed cost of one per-document call (launch, slicing, concatenation), in tokens of a
    document whose attention would cost the same: "auto" goes dense when T^2 <= sum over the
    calls of (queries x keys + document_call_tokens^2). 64 is measured on a CPU (one fp32 call with its
    backward: about 0.07 ms, as much as the attention of a 45-token document). On a GPU a call's
    fixed cost is worth more attention work, so a larger value may fit there (not measured)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"[attention.sdpa] strategy = {self.strategy!r} is not one of {list(STRATEGIES)}"
            )
        if self.document_call_tokens < 0:
            raise ValueError(
                f"[attention.sdpa] document_call_tokens must be >= 0, got {self.document_call_tokens}"
            )


def prefers_dense(meta: AttentionMeta, document_call_tokens: int) -> bool:
    """Whether one dense call costs no more than the per-document calls (host-side figures only)."""
    plan = document_plan(meta)
    return meta.num_tokens**2 <= plan.work + len(plan.calls) * document_call_tokens**2


# ---------------------------------------------------------------------------------------------
# Grouped-query SDPA
# ---------------------------------------------------------------------------------------------


def _fused_kernel_accepts(params: Any) -> bool:
    checks = (
        torch.backends.cuda.can_use_flash_attention,
        torch.backends.cuda.can_use_efficient_attention,
        torch.backends.cuda.can_use_cudnn_attention,
    )
    return any(check(params, False) for check in checks)


@functools.lru_cache(maxsize=64)
def _native_gqa_is_fused(
    device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, causal: bool, grad: bool
) -> bool:
    """Whether a fused CUDA kernel runs SDPA with ``enable_gqa=True`` for calls of this kind,
    or no fused kernel runs it anyway (then native GQA costs nothing extra)."""
    device = torch.device(device_type)
    q = torch.zeros(1, 4, 128, head_dim, device=device, dtype=dtype, requires_grad=grad)
    kv = torch.zeros(1, 2, 128, head_dim, device=device, dtype=dtype, requires_grad=grad)
    kv_rep = torch.zeros(1, 4, 128, head_dim, device=device, dtype=dtype, requires_grad=grad)
    mask = torch.ones(128, 128, dtype=torch.bool, device=device) if masked else None
    SDPAParams = torch.backends.cuda.SDPAParams
    if _fused_kernel_accepts(SDPAParams(q, kv, kv, mask, 0.0, causal, True)):
        return True
    return not _fused_kernel_accepts(SDPAParams(q, kv_rep, kv_rep, mask, 0.0, causal, False))


CPU_FP32_ATTENTION_TOKENS = 256
"""On a CPU, a bf16 call with a backward and at most this many query tokens computes in fp32:
there PyTorch's bf16 flash attention (forward + backward) takes about twice the fp32 time up to
128 tokens and as long at 256, casts included, and less beyond, where calls stay in bf16
(`benchmarks/bench_sdpa_cpu_precision.py`, torch 2.13). The fp32 result is the more accurate."""


def _computes_in_fp32_on_cpu(q_BHTD: torch.Tensor) -> bool:
    return (
        q_BHTD.device.type == "cpu"
        and q_BHTD.dtype == torch.bfloat16
        and q_BHTD.shape[2] <= CPU_FP32_ATTENTION_TOKENS
        and torch.is_grad_enabled()
        and q_BHTD.requires_grad
        and not torch.compiler.is_compiling()
    )


def sdpa_gqa(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA with Hq a multiple of Hkv, without repeating K/V where a fused kernel allows it."""
    if _computes_in_fp32_on_cpu(q_BHTD):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            out_BHTD = sdpa_gqa(q_BHTD.float(), k_BHTD.float(), v_BHTD.float(), attn_mask, is_causal)
        return out_BHTD.to(q_BHTD.dtype)
    num_heads, num_kv_heads = q_BHTD.shape[1], k_BHTD.shape[1]
    if num_heads == num_kv_heads:
        return F.scaled_dot_product_attention(
            q_BHTD, k_BHTD, v_BHTD, attn_mask=attn_mask, is_causal=is_causal
        )
    # Under torch.compile the choice is left to the compiler's own SDPA lowering.
    native = (
        q_BHTD.device.type != "cuda"
        or torch.compiler.is_compiling()
        or _native_gqa_is_fused(
            q_BHTD.device.type,
            q_BHTD.dtype,
            q_BHTD.shape[-1],
            attn_mask is not None,
            is_causal,
            torch.is_grad_enabled(),
        )
    )
    if not native:
        group = num_heads // num_kv_heads
        k_BHTD = k_BHTD.repeat_interleave(group, dim=1)
        v_BHTD = v_BHTD.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q_BHTD, k_BHTD, v_BHTD, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=native
    )


def _to_BHTD(x_THD: torch.Tensor) -> torch.Tensor:
    return x_THD.transpose(0, 1).unsqueeze(0)


def _from_BHTD(x_BHTD: torch.Tensor) -> torch.Tensor:
    return x_BHTD.squeeze(0).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Per-batch plans, cached on the metadata
# ---------------------------------------------------------------------------------------------


@torch.compiler.disable
def sdpa_dense_mask(meta: AttentionMeta) -> torch.Tensor:
    """[T, T] bool: the mask rule, plus the diagonal for padding tokens.

    A padding row with no visible key would make SDPA produce NaN (and NaN gradients); letting
    it see itself keeps everything finite, and its output is zeroed afterwards.
    """

    def build() -> torch.Tensor:
        mask_TT = meta.dense_mask()
        if meta.has_padding:
            mask_TT = mask_TT | torch.diag(meta.doc_ids < 0)
        return mask_TT

    return meta.cached("sdpa_dense_mask", build)


@torch.compiler.disable
def valid_token_mask(meta: AttentionMeta) -> torch.Tensor | None:
    """[T, 1, 1] 1.0 for real tokens and 0.0 for padding, or None when there is no padding."""

    def build() -> torch.Tensor | None:
        return (meta.doc_ids >= 0)[:, None, None] if meta.has_padding else None

    return meta.cached("valid_token_mask", build)


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call of the per-document strategy: queries [q_start, q_end) of the pack over keys
    [kv_start, kv_end), causal (upper-left aligned) or not, masked only when `mask` is set."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    is_causal: bool = False
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class DocumentPlan:
    """The per-document calls of a batch, the pieces their inputs are cut into and how their
    outputs make up the pack's rows."""

    calls: list[AttentionCall]
    rows: list[tuple[int, int, int]]
    """The output in pack order: (call, first row of that call's output, number of rows); call
    -1 stands for rows outside every document (padding), which give zeros."""
    q_sizes: list[int]
    """Sizes of the pieces the queries are split into (at every call's query bounds)."""
    kv_sizes: list[int]
    """Sizes of the pieces the keys and values are split into (at every call's key bounds)."""
    q_pieces: list[range]
    """Per call: the query pieces it concatenates."""
    kv_pieces: list[range]
    """Per call: the key/value pieces it concatenates."""

    @property
    def work(self) -> int:
        """Query-key pairs the calls compute (a causal call counts in full, as a masked one)."""
        return sum((c.q_end - c.q_start) * (c.kv_end - c.kv_start) for c in self.calls)


def _pieces(bounds: list[tuple[int, int]], num_tokens: int) -> tuple[list[int], list[range]]:
    """Split sizes cutting [0, num_tokens) at every bound, and per (start, end) its pieces."""
    cuts = sorted({0, num_tokens} | {b for pair in bounds for b in pair})
    index = {cut: i for i, cut in enumerate(cuts)}
    return [b - a for a, b in zip(cuts, cuts[1:])], [range(index[a], index[b]) for a, b in bounds]


def _document_calls(
    segments: list[tuple[int, int, int]], meta: AttentionMeta
) -> tuple[list[AttentionCall], list[tuple[int, int, int]]]:
    """The calls of one document (segments (start, end, mode) in order) and its output rows,
    call indices local to the document.

    BAGEL's rule lets a `full` or `noise` segment see every earlier visible token of its document
    and all of its own, so such a segment is one unmasked call over the document's prefix; causal
    rows come from one `is_causal` call over the prefix up to the last causal segment, whose
    rows of other segments are not used. Only a document where a `noise` segment has later tokens
    (which must not see it) needs its mask. A t2i sample (causal caption, noise image) becomes
    two unmasked calls with a fifth to a third less work than one masked call, and flash attention
    runs both on a GPU.
    """
    start, end = segments[0][0], segments[-1][1]
    if any(mode == NOISE for _, _, mode in segments[:-1]):
        idx = torch.arange(start, end, device=meta.device)
        mask = meta.allowed(idx[:, None], idx[None, :])
        return [AttentionCall(start, end, start, end, False, mask)], [(0, 0, end - start)]
    calls: list[AttentionCall] = []
    causal_end = max((e for _, e, mode in segments if mode == CAUSAL), default=None)
    if causal_end is not None:
        calls.append(AttentionCall(start, causal_end, start, causal_end, is_causal=True))
    rows: list[tuple[int, int, int]] = []
    for seg_start, seg_end, mode in segments:
        if mode == CAUSAL:
            piece = (0, seg_start - start, seg_end - seg_start)
        else:
            calls.append(AttentionCall(seg_start, seg_end, start, seg_end))
            piece = (len(calls) - 1, 0, seg_end - seg_start)
        last = rows[-1] if rows else None
        if last and last[0] == piece[0] and last[1] + last[2] == piece[1]:
            rows[-1] = (last[0], last[1], last[2] + piece[2])  # consecutive causal segments
        else:
            rows.append(piece)
    return calls, rows


@torch.compiler.disable
def document_plan(meta: AttentionMeta) -> DocumentPlan:
    """The per-document calls of a batch (cached), unmasked wherever the mask rule allows."""

    def build() -> DocumentPlan:
        segments_by_doc: dict[int, list[tuple[int, int, int]]] = {}
        for start, end, mode, doc in meta.segment_bounds:
            segments_by_doc.setdefault(doc, []).append((start, end, mode))
        calls: list[AttentionCall] = []
        rows: list[tuple[int, int, int]] = []
        pos = 0
        for doc in sorted(segments_by_doc):
            segments = segments_by_doc[doc]
            if segments[0][0] > pos:
                rows.append((-1, 0, segments[0][0] - pos))
            doc_calls, doc_rows = _document_calls(segments, meta)
            rows.extend((len(calls) + call, first, n) for call, first, n in doc_rows)
            calls.extend(doc_calls)
            pos = segments[-1][1]
        if pos < meta.num_tokens:
            rows.append((-1, 0, meta.num_tokens - pos))
        q_sizes, q_pieces = _pieces([(c.q_start, c.q_end) for c in calls], meta.num_tokens)
        kv_sizes, kv_pieces = _pieces([(c.kv_start, c.kv_end) for c in calls], meta.num_tokens)
        return DocumentPlan(calls, rows, q_sizes, kv_sizes, q_pieces, kv_pieces)

    return meta.cached("sdpa_document_plan", build)


# ---------------------------------------------------------------------------------------------
# The strategies
# ---------------------------------------------------------------------------------------------


def sdpa_dense(
    q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """One SDPA call over the pack with the cached dense mask; padding rows give zeros."""
    out_THD = _from_BHTD(sdpa_gqa(_to_BHTD(q_THD), _to_BHTD(k_THD), _to_BHTD(v_THD), sdpa_dense_mask(meta)))
    valid_T11 = valid_token_mask(meta)
    return out_THD if valid_T11 is None else out_THD * valid_T11


def _joined(pieces: tuple[torch.Tensor, ...], which: range) -> torch.Tensor:
    return pieces[which.start] if len(which) == 1 else torch.cat(pieces[which.start : which.stop], dim=0)


@torch.compiler.disable
def sdpa_per_document(
    q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, meta: AttentionMeta
) -> torch.Tensor:
    """The calls of `document_plan`; tokens outside any document give zeros.

    Kept out of torch.compile: the document boundaries change every batch (a recompile each
    step) and each call is already a fused kernel.
    """
    plan = document_plan(meta)
    if not plan.calls:
        return torch.zeros_like(q_THD)
    # One split per input, not a slice per call: a slice's backward zero-fills a gradient of the
    # whole pack for every call; the split's concatenates the pieces once.
    q_split = q_THD.split(plan.q_sizes)
    k_split, v_split = k_THD.split(plan.kv_sizes), v_THD.split(plan.kv_sizes)
    outputs = []
    for call, q_which, kv_which in zip(plan.calls, plan.q_pieces, plan.kv_pieces):
        out_BHLD = sdpa_gqa(
            _to_BHTD(_joined(q_split, q_which)),
            _to_BHTD(_joined(k_split, kv_which)),
            _to_BHTD(_joined(v_split, kv_which)),
            call.mask,
            is_causal=call.is_causal,
        )
        outputs.append(_from_BHTD(out_BHLD))
    rows = []
    for call_index, first, n in plan.rows:
        if call_index < 0:
            rows.append(q_THD.new_zeros(n, *q_THD.shape[1:]))
        else:
            out = outputs[call_index]
            rows.append(out if n == out.shape[0] else out.narrow(0, first, n))
    return torch.cat(rows, dim=0)


class SDPAAttention(AttentionModule[AttentionMeta]):
    """Per-layer SDPA module (no parameters)."""

    def __init__(self, config: SDPAConfig):
        super().__init__()
        self.config = config

    def _strategy(self, meta: AttentionMeta) -> str:
        """The strategy for this batch, decided once (in `prepare`, outside any compiled layer)
        and cached: read inside a compiled layer, the document lengths would become guards and
        every new pack layout a recompile."""
        config = self.config

        def decide() -> str:
            if config.strategy != "auto":
                return config.strategy
            return "dense" if prefers_dense(meta, config.document_call_tokens) else "per_document"

        return meta.cached(f"sdpa_strategy:{config.strategy}:{config.document_call_tokens}", decide)

    def prepare(self, meta: AttentionMeta) -> None:
        if self._strategy(meta) == "dense":
            sdpa_dense_mask(meta)
            valid_token_mask(meta)
        else:
            document_plan(meta)

    def forward(
        self,
        q_THD: torch.Tensor,
        k_THD: torch.Tensor,
        v_THD: torch.Tensor,
        meta: AttentionMeta,
        hidden_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._strategy(meta) == "dense":
            return sdpa_dense(q_THD, k_THD, v_THD, meta)
        return sdpa_per_document(q_THD, k_THD, v_THD, meta)

    def extra_repr(self) -> str:
        return f"strategy={self.config.strategy!r}"


class SDPABackend(AttentionBackend):
    """The `sdpa` attention backend: PyTorch's fused attention kernels."""

    name = "sdpa"
    config_section = "attention.sdpa"

    def build(self, spec: AttentionLayerSpec, config: SDPAConfig | None) -> SDPAAttention:
        return SDPAAttention(config or SDPAConfig())
