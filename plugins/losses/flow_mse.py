"""`flow_mse`: flow-matching velocity MSE as a (sum, count) pair for global normalisation."""

from __future__ import annotations

import torch

from bagel_titan.protocols import LossTerm, ModelOutputs

from .options import FlowMSEOptions


class FlowMSELoss:
    """Sum over noised tokens of the channel-mean squared velocity error; count = noised tokens.

    Reads the model outputs `pred_velocity` and `target_velocity` ([M, P], the model has already
    applied the timestep shift and built the target noise - x0); counts "noised_tokens"."""

    name = "flow_mse"

    def __init__(self, options: FlowMSEOptions):
        self.options = options
        self.count_name = "noised_tokens"

    def __call__(self, outputs: ModelOutputs, count: float) -> LossTerm:
        if not count and not {"pred_velocity", "target_velocity"} <= outputs.extras.keys():
            return LossTerm(sum=_zero_like_outputs(outputs), count=0)
        pred_NP = outputs.extra("pred_velocity", "flow_mse")
        target_NP = outputs.extra("target_velocity", "flow_mse")
        sq_NP = (pred_NP.float() - target_NP.float()) ** 2
        per_token = sq_NP.mean(-1) if self.options.channel_reduction == "mean" else sq_NP.sum(-1)
        return LossTerm(sum=per_token.sum(), count=count)


def _zero_like_outputs(outputs: ModelOutputs) -> torch.Tensor:
    """A zero that stays in the autograd graph when possible (no generated image in the pack)."""
    ref = outputs.logits if outputs.logits is not None else next(iter(outputs.extras.values()), None)
    if ref is None:
        raise ValueError("flow_mse: the model produced no tensor to anchor a zero loss to")
    return ref.sum() * 0.0


class FlowMSEFactory:
    name = "flow_mse"

    def __call__(self, config: FlowMSEOptions | None) -> FlowMSELoss:
        return FlowMSELoss(config or FlowMSEOptions())
