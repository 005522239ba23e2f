"""Turn a backend's options (the `[attention.<backend>]` table as a dict) into its config dataclass.

The model builds each attention layer with ``backend.build(spec, options)`` where `options` is
``dataclasses.asdict(job_config.section("attention.<backend>"))`` or ``{}``. Backends validate
it here so a misspelt key fails with the list of keys that exist, wherever the dict came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def config_from_options(config_type: type[C], options: Mapping[str, Any] | C | None, section: str) -> C:
    """An instance of `config_type` from a dict of its fields (or the instance itself).

    `section` names the TOML table ("attention.sdpa") in the error for an unknown key.
    """
    if options is None:
        return config_type()
    if isinstance(options, config_type):
        return options
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} in [{section}]; known options: {sorted(known)}"
        )
    return config_type(**dict(options))
