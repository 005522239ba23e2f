"""Option sections of the first-party loss components (`[loss.ce]`, `[loss.flow_mse]`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, TypeVar

C = TypeVar("C")


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


def options_from(config_type: type[C], options: Mapping[str, Any] | C | None, section: str) -> C:
    """`config_type` from a TOML table (dict) or an instance; an unknown key lists the known ones."""
    if options is None:
        return config_type()
    if isinstance(options, config_type):
        return options
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in [{section}]; known options: {sorted(known)}")
    return config_type(**dict(options))
