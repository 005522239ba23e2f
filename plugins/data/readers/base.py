"""Sharding shared by the columnar readers: rows live in units (row groups, record batches).

Every row has a stable global index (files sorted by name, then units, then rows). A shard owns
whole units (unit i -> shard i % num_shards) when there are at least as many units as shards,
otherwise single rows (row i -> shard i % num_shards): either way every row belongs to exactly
one shard (no overlap, no loss) and only the units a shard needs are decoded. `start` skips rows
by metadata counts, so resuming never re-reads what was already consumed. With
`ReadPass.shuffle` the units are visited in a per-epoch permutation (the same on every shard),
and the assignment above applies to that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from bagel_titan.protocols import RawSample, ReadPass

from ..bad_samples import DataPathError, bad_record


@dataclass(frozen=True)
class Unit:
    """A block of rows that is decoded at once."""

    file: str
    part: int
    num_rows: int
    first_index: int


def list_files(path: str, extensions: Sequence[str], what: str) -> list[str]:
    """`path` itself, or the files under the folder `path` with one of `extensions`, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataPathError(
            f"{what} dataset path {path!r} does not exist; fix `path` in its [[data.datasets]] entry"
        )
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith(tuple(extensions))
    )
    if not files:
        raise DataPathError(
            f"{what} dataset folder {path!r} holds no {'/'.join(extensions)} "
            f"files; fix `path` or `format` in its [[data.datasets]] entry"
        )
    return files


def shard_rows(
    unit_index: int, unit: Unit, shard_index: int, num_shards: int, by_unit: bool
) -> range | list[int]:
    """Local row numbers of `unit` that belong to shard `shard_index`."""
    if by_unit:
        return range(unit.num_rows) if unit_index % num_shards == shard_index else range(0)
    first = (shard_index - unit.first_index) % num_shards
    return range(first, unit.num_rows, num_shards)


def iter_units(
    units: Sequence[Unit],
    load: Callable[[Unit], list[dict[str, Any]]],
    *,
    dataset: str,
    shard_index: int,
    num_shards: int,
    start: int,
    read_pass: ReadPass = ReadPass(),
) -> Iterator[RawSample]:
    """Yield the rows of one shard, skipping its first `start` rows without decoding them.

    A unit that fails to decode yields a bad record per row it owns ("unreadable_record"), so
    the skip is counted exactly and the stream goes on.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is outside [0, {num_shards})")
    by_unit = len(units) >= num_shards
    if read_pass.shuffle:
        units = list(units)
        read_pass.rng("units", dataset).shuffle(units)
    to_skip = start
    for i, unit in enumerate(units):
        rows = shard_rows(i, unit, shard_index, num_shards, by_unit)
        if len(rows) <= to_skip:
            to_skip -= len(rows)
            continue
        rows = rows[to_skip:]
        to_skip = 0
        try:
            records = load(unit)
        except Exception as exc:  # a corrupt row group must not stop the stream
            detail = f"{unit.file} part {unit.part}: {type(exc).__name__}: {exc}"
            for r in rows:
                yield RawSample(dataset, unit.first_index + r, bad_record("unreadable_record", detail))
            continue
        for r in rows:
            yield RawSample(dataset, unit.first_index + r, records[r])
