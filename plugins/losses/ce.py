"""`ce`: next-token cross-entropy as a (sum, count) pair for global normalisation."""

from __future__ import annotations

import torch.nn.functional as F

from bagel_titan.protocols import LossTerm, ModelOutputs

from .options import CEOptions


class CELoss:
    """Sum of per-label CE (times the label weight when `reweight`); count = labels (or the sum
    of label weights when `reweight`, so that sum/count is the release's weighted mean).

    Reads the model outputs `label_weights` ([N] float, aligned with the labels) when `reweight`;
    counts "labels" or "label_weight_sum"."""

    name = "ce"

    def __init__(self, options: CEOptions):
        self.options = options
        self.count_name = "label_weight_sum" if options.reweight else "labels"

    def __call__(self, outputs: ModelOutputs, count: float) -> LossTerm:
        if outputs.logits is None or outputs.labels is None:
            raise ValueError(
                "loss component 'ce' needs ModelOutputs.logits and .labels; the model produced none"
            )
        per_token = F.cross_entropy(outputs.logits.float(), outputs.labels, reduction="none")
        if self.options.reweight:
            per_token = per_token * outputs.extra("label_weights", "ce").to(per_token.dtype)
        return LossTerm(sum=per_token.sum(), count=count)


class CEFactory:
    name = "ce"

    def __call__(self, config: CEOptions | None) -> CELoss:
        return CELoss(config or CEOptions())
