"""Tokens/s and MFU over the steps between two logging points."""

from __future__ import annotations

import time


class ThroughputMeter:
    """Accumulates tokens and FLOPs of this rank between two logged steps."""

    def __init__(self, peak_flops: float | None):
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def read(self) -> dict[str, float]:
        """Per-rank tokens/s and MFU (percent) since the last reset; resets."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"tokens_per_s": self.tokens / elapsed, "tflops": self.flops / elapsed / 1e12}
        if self.peak_flops:
            out["mfu_pct"] = 100.0 * self.flops / elapsed / self.peak_flops
        self.reset()
        return out
