"""Parquet reader: streamed one row group at a time (never a whole-file load)."""

from __future__ import annotations

from typing import Iterator

import pyarrow.parquet as pq

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from ..bad_samples import DataError
from .base import Unit, iter_units, list_files

_UNREADABLE = -1
"""The `part` of the one unit a damaged file becomes."""


class ParquetReader(DatasetReader):
    """A parquet file or a folder of them; a row is a record (HF image structs included)."""

    format = "parquet"
    extensions = (".parquet",)

    def units(self, path: str) -> list[Unit]:
        """Row groups of every file. A file whose footer does not read (truncated, not parquet)
        becomes one unit that fails to load, so it is skipped and counted ("unreadable_record",
        naming the file) while the other files train; if no file reads, the dataset is an error."""
        units: list[Unit] = []
        first = 0
        files = list_files(path, self.extensions, "parquet")
        broken = []
        for file in files:
            try:
                meta = pq.ParquetFile(file).metadata
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
                broken.append(f"{file} ({type(exc).__name__}: {exc})")
                units.append(Unit(file, _UNREADABLE, 1, first))
                first += 1
                continue
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                units.append(Unit(file, g, n, first))
                first += n
        if len(broken) == len(files):
            raise DataError(
                f"parquet dataset {path!r}: no file reads: {'; '.join(broken)}; replace the damaged "
                f"files or fix `path`"
            )
        return units

    @staticmethod
    def _load(unit: Unit) -> list[dict]:
        if unit.part == _UNREADABLE:
            raise DataError(
                f"{unit.file} is not a readable parquet file (truncated or damaged); file skipped"
            )
        return pq.ParquetFile(unit.file).read_row_group(unit.part).to_pylist()

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Rows of one shard; row groups are the decoding (and, when enough, sharding) unit."""
        yield from iter_units(
            self.units(path),
            self._load,
            dataset=path,
            shard_index=shard_index,
            num_shards=num_shards,
            start=start,
            read_pass=read_pass,
        )
