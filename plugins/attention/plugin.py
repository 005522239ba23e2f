"""First-party attention backends and their config sections."""

from bagel_titan.hookspec import hookimpl

from .eager import EagerBackend
from .flex import FlexBackend, FlexConfig
from .nsa import NSABackend, NSAConfig
from .sdpa import SDPABackend, SDPAConfig


@hookimpl
def bagel_titan_attention_backends():
    return [EagerBackend(), SDPABackend(), FlexBackend(), NSABackend()]


@hookimpl
def bagel_titan_config_sections():
    return {"attention.sdpa": SDPAConfig, "attention.flex": FlexConfig, "attention.nsa": NSAConfig}
