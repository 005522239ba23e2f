"""Readers for data people already have: the BAGEL release's parquet layouts, LLaVA
conversations and HF `save_to_disk` folders (selected per dataset with `format`)."""

from __future__ import annotations

from bagel_titan.hookspec import hookimpl

from .readers.bagel_release import BagelEditReader, BagelT2IReader
from .readers.hf_disk import HFDiskReader
from .readers.llava import LlavaReader


@hookimpl
def bagel_titan_dataset_readers():
    return [BagelT2IReader(), BagelEditReader(), LlavaReader(), HFDiskReader()]
