"""Hook specifications: every way a plugin extends bagel-titan, documented where it is declared.

A plugin is a module (or object) with functions named like the specs below, decorated with
`bagel_titan.hookspec.hookimpl`. It is found either through the entry-point group ``bagel_titan`` of an
installed distribution::

    [project.entry-points.bagel_titan]
    my_plugin = "my_pkg.plugin"

or by naming its module in the TOML (``[job] plugins = ["my_pkg.plugin"]``).

Each registry hook returns a list of objects; the plugin manager files them by name and refuses
two objects of one kind with the same name, naming both plugins. (The bodies below never run:
pluggy calls the plugins' implementations.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from bagel_titan.protocols import (
        AttentionBackend,
        DataloaderBuilder,
        DatasetReader,
        LossComponentFactory,
        ModelSpec,
        PackingStrategy,
    )

PROJECT = "bagel_titan"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bagel_titan_model_specs() -> list["ModelSpec[Any, Any]"]:
    """Return the model specs this plugin provides.

    A model spec is selected with ``[model] name``; it builds the model, its processor and
    collator, loads and exports weights, names the sharding units and counts FLOPs.
    """
    raise NotImplementedError


@hookspec
def bagel_titan_attention_backends() -> list["AttentionBackend"]:
    """Return the attention backends this plugin provides, selected with ``[attention] backend``.

    A backend builds one module per attention layer that attends over a packed batch, following
    the segment rule carried by the batch's attention metadata.
    """
    raise NotImplementedError


@hookspec
def bagel_titan_dataset_readers() -> list["DatasetReader"]:
    """Return the dataset readers this plugin provides, selected per dataset with ``format``
    (or by file extension when ``format`` is omitted)."""
    raise NotImplementedError


@hookspec
def bagel_titan_packing_strategies() -> list["PackingStrategy"]:
    """Return the packing strategies this plugin provides, selected with
    ``[data] packing_strategy``."""
    raise NotImplementedError


@hookspec
def bagel_titan_loss_components() -> list["LossComponentFactory"]:
    """Return loss component factories, selected by the keys of ``[loss] components``.

    A factory is called with that component's section object (``[loss.<name>]``, None when the
    plugin registered none) and returns a loss component producing a (sum, count) pair per microbatch.
    """
    raise NotImplementedError


@hookspec
def bagel_titan_dataloaders() -> list["DataloaderBuilder"]:
    """Return dataloader builders, selected with ``[data] loader`` (the first-party one is
    ``packed``: reader -> processor -> packing strategy -> collator, stateful)."""
    raise NotImplementedError


@hookspec
def bagel_titan_config_sections() -> dict[str, type]:
    """Return extra config sections as ``{"dotted.name": dataclass_type}``.

    A section named ``"attention.nsa"`` becomes the TOML table ``[attention.nsa]`` and the CLI
    prefix ``--attention.nsa.<key>``; its fields are validated and documented like the core's.
    The resolved instance is available as ``job_config.section("attention.nsa")``.
    """
    raise NotImplementedError


@hookspec
def bagel_titan_on_train_start(trainer: Any) -> None:
    """Called once after the build phase, before the first step (the trainer is fully built)."""


@hookspec
def bagel_titan_on_step_end(trainer: Any, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with that step's logged metrics (may be empty when the
    step is not a logging step). Keep it cheap: it runs on the hot path."""


@hookspec
def bagel_titan_on_train_end(trainer: Any) -> None:
    """Called once when the loop ends (normally, or after a stop signal)."""
