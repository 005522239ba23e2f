"""First-party loss components: `ce` and `flow_mse`, with their `[loss.<name>]` option sections."""

from bagel_titan.hookspec import hookimpl

from .ce import CEFactory
from .flow_mse import FlowMSEFactory
from .options import CEOptions, FlowMSEOptions


@hookimpl
def bagel_titan_loss_components():
    return [CEFactory(), FlowMSEFactory()]


@hookimpl
def bagel_titan_config_sections():
    return {"loss.ce": CEOptions, "loss.flow_mse": FlowMSEOptions}
