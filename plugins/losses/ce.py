"""`ce`: next-token cross-entropy as a (sum, count) pair for global normalisation."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F

from bagel_titan.protocols import Batch, LossTerm, ModelOutputs

from bagel_titan.config.fields import section_from_options

from .options import CEOptions


class CELoss:
    """Sum of per-label CE (times the label weight when `reweight`); count = labels (or the sum
    of label weights when `reweight`, so that sum/count is the release's weighted mean)."""

    name = "ce"

    def __init__(self, options: CEOptions):
        self.options = options

    def count(self, batch: Batch) -> float:
        if self.options.reweight:
            return float(batch.ce_loss_weights.sum())
        return int(batch.packed_label_ids.shape[0])

    def __call__(self, outputs: ModelOutputs, batch: Batch) -> LossTerm:
        if outputs.logits is None or outputs.labels is None:
            raise ValueError("loss component 'ce' needs ModelOutputs.logits and .labels; the model produced none")
        per_token = F.cross_entropy(outputs.logits.float(), outputs.labels, reduction="none")
        if self.options.reweight:
            if outputs.label_weights is None:
                raise ValueError("[loss.ce] reweight = true needs ModelOutputs.label_weights; the model produced none")
            per_token = per_token * outputs.label_weights.to(per_token.dtype)
        return LossTerm(sum=per_token.sum(), count=self.count(batch))


class CEFactory:
    name = "ce"

    def __call__(self, options: Mapping[str, Any]) -> CELoss:
        return CELoss(section_from_options(CEOptions, options, "loss.ce"))

