"""First-party data plugin: dataset readers, packing strategies and the "packed" dataloader."""

from __future__ import annotations

from bagel_titan.hookspec import hookimpl

from .loader import PackedDataloaderBuilder
from .packing import STRATEGIES, ReleasePackingConfig
from .readers import READERS


@hookimpl
def bagel_titan_dataset_readers():
    return list(READERS)


@hookimpl
def bagel_titan_packing_strategies():
    return list(STRATEGIES)


@hookimpl
def bagel_titan_config_sections():
    return {"data.release_packing": ReleasePackingConfig}


@hookimpl
def bagel_titan_dataloaders():
    return [PackedDataloaderBuilder()]
