"""YAML mixtures: a .yaml file listing datasets, each with its own weight and data_folder.

```yaml
- path: shapes/train.parquet     # relative to the yaml file
  weight: 3.0
  data_folder: shapes/images     # relative to the yaml file
- path: chat.jsonl
  format: jsonl
```
The loader expands such an entry into a weighted mixture (the entry's own weight multiplies
the listed weights). Read directly as a stream, the listed datasets follow one another.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import yaml

from bagel_titan.config.job_config import DatasetEntry
from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

_KEYS = {"path", "format", "data_folder", "weight", "name"}


def _resolve(base: str, value: str) -> str:
    return value if not value or os.path.isabs(value) else os.path.join(base, value)


class YamlMixtureReader(DatasetReader):
    format = "yaml"
    extensions = (".yaml", ".yml")

    def expand(self, path: str) -> list[DatasetEntry]:
        """The datasets a mixture file lists, paths resolved against the file's folder."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"yaml dataset list {path!r} does not exist; fix `path` in its [[data.datasets]] entry"
            )
        with open(path) as f:
            raw: Any = yaml.safe_load(f)
        if isinstance(raw, dict) and "datasets" in raw:
            raw = raw["datasets"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(
                f"yaml dataset list {path!r} must be a non-empty list of datasets "
                f"(each a mapping with `path`, optional `format`, `weight`, `data_folder`)"
            )
        base = os.path.dirname(os.path.abspath(path))
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "path" not in item:
                raise ValueError(f"entry {i} of yaml dataset list {path!r} needs a `path` key, got {item!r}")
            unknown = set(item) - _KEYS
            if unknown:
                raise ValueError(
                    f"entry {i} of yaml dataset list {path!r} has unknown keys "
                    f"{sorted(unknown)}; known: {sorted(_KEYS)}"
                )
            entries.append(
                DatasetEntry(
                    path=_resolve(base, str(item["path"])),
                    format=str(item.get("format", "")),
                    data_folder=_resolve(base, str(item.get("data_folder", ""))),
                    weight=float(item.get("weight", 1.0)),
                    name=str(item.get("name", "")),
                )
            )
        return entries

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """The listed datasets one after another (weights ignored; the loader mixes instead)."""
        from bagel_titan.plugins import PluginManager  # the readers of the listed formats

        manager = PluginManager()
        skipped = 0
        for entry in self.expand(path):
            reader = (
                manager.dataset_readers.get(entry.format)
                if entry.format
                else manager.reader_for_path(entry.path)
            )
            for sample in reader.iter_samples(
                entry.path, shard_index=shard_index, num_shards=num_shards, start=0, read_pass=read_pass
            ):
                if skipped < start:
                    skipped += 1
                    continue
                sample.data_folder = sample.data_folder or entry.data_folder
                yield sample
