"""LR schedules (warm-up + constant / linear / cosine with a floor) and the optimizer choice."""

from __future__ import annotations

import math

import pytest
import torch

from bagel_titan.config.job_config import LRScheduler, Optimizer
from bagel_titan.optim.lr_scheduler import build_lr_scheduler
from bagel_titan.optim.optimizer import build_optimizer


def lrs(cfg: LRScheduler, steps: int, peak: float = 1.0) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, Optimizer(lr=peak), "cpu")
    sched = build_lr_scheduler(opt, cfg, steps, peak)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])  # the lr the next optimizer step uses
        opt.step()
        sched.step()
    return seen


def test_warmup_then_constant():
    assert lrs(LRScheduler(warmup_steps=4), 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_decay_to_min_lr():
    seen = lrs(LRScheduler(warmup_steps=2, decay_type="linear", min_lr=0.1), 12)
    assert seen[:2] == pytest.approx([0.5, 1.0])
    assert seen[-1] == pytest.approx(0.1 + 0.9 * (1 - 10 / 10))
    assert all(a >= b for a, b in zip(seen[1:], seen[2:]))


def test_cosine_decay_shape():
    seen = lrs(LRScheduler(warmup_steps=0, decay_type="cosine", min_lr=0.0), 11)
    expected = [0.5 * (1 + math.cos(math.pi * k / 11)) for k in range(1, 12)]
    assert seen == pytest.approx(expected)


def test_optimizer_implementation_and_frozen_params():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, Optimizer(lr=1e-3, betas=[0.9, 0.95], eps=1e-15, weight_decay=0.1), "cpu")
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.95)  # auto: fused on CPU
    foreach = build_optimizer(model, Optimizer(implementation="foreach"), "cpu")
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    model[1].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, Optimizer(), "cpu")
