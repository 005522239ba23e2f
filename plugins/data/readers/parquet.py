"""Parquet reader: streamed one row group at a time (never a whole-file load)."""

from __future__ import annotations

from typing import Iterator

import pyarrow.parquet as pq

from bagel_titan.protocols import RawSample, ReadPass

from .base import Unit, iter_units, list_files


class ParquetReader:
    """A parquet file or a folder of them; a row is a record (HF image structs included)."""

    format = "parquet"
    extensions = (".parquet",)

    def units(self, path: str) -> list[Unit]:
        units: list[Unit] = []
        first = 0
        for file in list_files(path, self.extensions, "parquet"):
            meta = pq.ParquetFile(file).metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                units.append(Unit(file, g, n, first))
                first += n
        return units

    @staticmethod
    def _load(unit: Unit) -> list[dict]:
        return pq.ParquetFile(unit.file).read_row_group(unit.part).to_pylist()

    def iter_samples(self, path: str, *, shard_index: int, num_shards: int, start: int,
                     read_pass: ReadPass = ReadPass()) -> Iterator[RawSample]:
        """Rows of one shard; row groups are the decoding (and, when enough, sharding) unit."""
        yield from iter_units(self.units(path), self._load, dataset=path,
                              shard_index=shard_index, num_shards=num_shards, start=start, read_pass=read_pass)
