"""Loss metrics from globally reduced (sum, count) pairs, shared by training and validation."""

from __future__ import annotations

from typing import Sequence


def loss_means(
    names: Sequence[str],
    weights: Sequence[float],
    sums: Sequence[float],
    counts: Sequence[float],
    prefix: str = "loss",
) -> dict[str, float]:
    """`{prefix}/<name>`: each component's global mean (sum / count, 0 without elements), and
    `{prefix}`: their weighted total, which is what the optimiser minimises."""
    metrics: dict[str, float] = {}
    total = 0.0
    for name, weight, value, count in zip(names, weights, sums, counts, strict=True):
        mean = value / count if count else 0.0
        metrics[f"{prefix}/{name}"] = mean
        total += weight * mean
    metrics[prefix] = total
    return metrics
