"""The ``[attention.nsa]`` section: native sparse attention's knobs.

Names and defaults follow `native-sparse-attention-triton` so a config means the same thing on
its Triton kernels and on our PyTorch implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPRESS_TYPES = ("weightedpool", "linear", "avgpool")
IMPLEMENTATIONS = ("auto", "torch", "triton")


@dataclass
class NSAConfig:
    """Options of the `nsa` backend, the TOML table ``[attention.nsa]``.

    NSA serves the LLM's causal (text) queries with three branches over the keys BAGEL's rule
    lets them see: attention over compressed key/value blocks, exact attention over the top-k
    selected blocks, and exact attention over a sliding window; per-token, per-head sigmoid gates
    mix them. Queries in ``full`` and ``noise`` segments get exact attention.
    """

    block_size: int = 64
    """Selection block (tokens): the unit the top-k branch picks."""
    compress_type: str = "weightedpool"
    """How a window of `kernel_size` keys/values becomes one compressed token: "weightedpool"
    (a learned weight per position and KV head), "linear" (a learned [kernel_size*D, D] map per
    KV head) or "avgpool" (mean, no weights)."""
    kernel_size: int = 32
    """Tokens per compression window."""
    kernel_stride: int = 16
    """Step between compression windows (windows overlap when smaller than `kernel_size`)."""
    topk: int = 16
    """Blocks each query attends to per KV head, the forced init/local blocks included."""
    init_blocks: int = 1
    """First blocks of the document always selected (attention sinks)."""
    local_blocks: int = 2
    """Blocks ending at the query's own block always selected."""
    window_size: int = 512
    """Sliding branch: a query at position t sees keys t - window_size .. t."""
    gate_init_bias: float = 4.0
    """Initial gate logits: +value for the selected branch, -value for the compressed and sliding
    branches (gate projection weights start at zero). The selected branch is exact attention
    over the blocks that hold most of the attention mass, so with sigmoid(4) = 0.98 on it a
    pretrained dense model starts close to its dense outputs; larger values are closer but let
    the gates learn more slowly (sigmoid'(4) = 0.018)."""
    implementation: str = "auto"
    """"triton": the `native-sparse-attention-triton` kernels (CUDA, fp16/bf16); "torch": our
    PyTorch implementation (any device and dtype; memory grows with query_chunk * document
    length); "auto": triton when installed, on CUDA and in half precision, else torch."""
    query_chunk: int = 1024
    """PyTorch implementation: queries processed together (bounds the score matrices)."""

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"[attention.nsa] {message}")

        if self.compress_type not in COMPRESS_TYPES:
            fail(f"compress_type = {self.compress_type!r} is not one of {list(COMPRESS_TYPES)}")
        if self.implementation not in IMPLEMENTATIONS:
            fail(f"implementation = {self.implementation!r} is not one of {list(IMPLEMENTATIONS)}")
        for name in ("block_size", "kernel_size", "kernel_stride", "query_chunk"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("topk", "init_blocks", "local_blocks", "window_size"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kernel_size % self.kernel_stride:
            fail(
                f"kernel_size ({self.kernel_size}) must be a multiple of kernel_stride ({self.kernel_stride})"
            )
        if self.block_size % self.kernel_size:
            fail(f"block_size ({self.block_size}) must be a multiple of kernel_size ({self.kernel_size})")
        if self.topk < self.init_blocks + self.local_blocks:
            fail(
                f"topk ({self.topk}) must be >= init_blocks + local_blocks "
                f"({self.init_blocks} + {self.local_blocks}): the forced blocks count towards top-k"
            )
