"""Learning-rate schedules from `[lr_scheduler]`: linear warm-up, then constant/linear/cosine."""

from __future__ import annotations

import math

import torch

from bagel_titan.config.job_config import LRScheduler as LRSchedulerConfig


def lr_factor(step: int, total_steps: int, cfg: LRSchedulerConfig, peak_lr: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based: the first step is 1).

    The warm-up gives step k the factor k / warmup_steps, so the first step already learns and
    the peak is reached at step warmup_steps. The release's LambdaLR evaluates step / warmup
    before its first `scheduler.step()`: its first optimizer step runs at lr 0 and it peaks one
    step later (docs/differences_from_release.md)."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    if cfg.decay_type == "constant":
        return 1.0
    min_factor = cfg.min_lr / peak_lr if peak_lr > 0 else 0.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_factor + (1.0 - min_factor) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig, total_steps: int, peak_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR calls the lambda with the number of `scheduler.step()` calls so far (0 at build);
    # the lr used by optimizer step k is lr_factor(k), so shift by one.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda last: lr_factor(last + 1, total_steps, cfg, peak_lr)
    )
