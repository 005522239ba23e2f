"""Job configuration: dataclass sections, TOML loading, command-line overrides."""

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.job_config import CORE_SECTIONS, JobConfig
from bagel_titan.config.manager import help_text, load_job_config, to_toml

__all__ = ["CORE_SECTIONS", "ConfigError", "JobConfig", "help_text", "load_job_config", "to_toml"]
