"""`flow_mse`: flow-matching velocity MSE as a (sum, count) pair for global normalisation."""

from __future__ import annotations

from typing import Any, Mapping

from bagel_titan.protocols import Batch, LossTerm, ModelOutputs

from bagel_titan.config.fields import section_from_options

from .options import FlowMSEOptions


class FlowMSELoss:
    """Sum over noised tokens of the channel-mean squared velocity error; count = noised tokens.

    The model has already applied the timestep shift and built the target (noise - x0)."""

    name = "flow_mse"

    def __init__(self, options: FlowMSEOptions):
        self.options = options

    def count(self, batch: Batch) -> int:
        return int(batch.mse_loss_indexes.shape[0])

    def __call__(self, outputs: ModelOutputs, batch: Batch) -> LossTerm:
        count = self.count(batch)
        if outputs.pred_velocity is None or outputs.target_velocity is None:
            if count:
                raise ValueError("loss component 'flow_mse' needs ModelOutputs.pred_velocity and .target_velocity")
            return LossTerm(sum=_zero_like_outputs(outputs), count=0)
        sq_NP = (outputs.pred_velocity.float() - outputs.target_velocity.float()) ** 2
        per_token = sq_NP.mean(-1) if self.options.channel_reduction == "mean" else sq_NP.sum(-1)
        return LossTerm(sum=per_token.sum(), count=count)


def _zero_like_outputs(outputs: ModelOutputs):
    """A zero that stays in the autograd graph when possible (no generated image in the pack)."""
    ref = outputs.logits if outputs.logits is not None else next(iter(outputs.extras.values()), None)
    if ref is None:
        raise ValueError("flow_mse: the model produced no tensor to anchor a zero loss to")
    return ref.sum() * 0.0


class FlowMSEFactory:
    name = "flow_mse"

    def __call__(self, options: Mapping[str, Any]) -> FlowMSELoss:
        return FlowMSELoss(section_from_options(FlowMSEOptions, options, "loss.flow_mse"))
