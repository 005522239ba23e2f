"""Option sections of the first-party loss components (`[loss.ce]`, `[loss.flow_mse]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class CEOptions:
    """`[loss.ce]`: next-token cross-entropy."""

    reweight: bool = False
    """Multiply each label's CE by its label weight (1/sqrt(text length), from the collator) and
    normalise by the global sum of weights instead of the token count (the release's
    `ce_loss_reweighting`)."""


@dataclass
class FlowMSEOptions:
    """`[loss.flow_mse]`: flow-matching velocity regression on noised VAE tokens."""

    channel_reduction: Literal["mean", "sum"] = "mean"
    """How a token's squared errors over its latent channels combine: "mean" (the release) or
    "sum"; tokens are then summed and divided by the global count of noised tokens."""
