"""First-party bagel plugin: the "bagel" model spec and its `[bagel]` / `[bagel.processor]` sections."""

from bagel_titan.hookspec import hookimpl

from .config import BagelConfig
from .processor_config import ProcessorConfig
from .sampling_config import SamplingConfig
from .spec import BagelSpec


@hookimpl
def bagel_titan_model_specs():
    return [BagelSpec()]


@hookimpl
def bagel_titan_config_sections():
    return {"bagel": BagelConfig, "bagel.processor": ProcessorConfig, "bagel.sampling": SamplingConfig}
