"""Arrow reader: IPC files (file or stream format) and HF `save_to_disk` folders."""

from __future__ import annotations

import json
import os
from typing import Iterator

import pyarrow as pa

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from .base import Unit, iter_units, list_files


def _open_batches(file: str) -> list[pa.RecordBatch] | pa.ipc.RecordBatchFileReader:
    source = pa.memory_map(file, "r")
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:  # HF datasets writes the streaming format
        return list(pa.ipc.open_stream(pa.memory_map(file, "r")))


def _num_batches(opened: list[pa.RecordBatch] | pa.ipc.RecordBatchFileReader) -> int:
    return opened.num_record_batches if isinstance(opened, pa.ipc.RecordBatchFileReader) else len(opened)


def _batch(opened: list[pa.RecordBatch] | pa.ipc.RecordBatchFileReader, i: int) -> pa.RecordBatch:
    return opened.get_batch(i) if isinstance(opened, pa.ipc.RecordBatchFileReader) else opened[i]


class ArrowReader(DatasetReader):
    """`.arrow` files, or a folder of them; an HF `save_to_disk` folder is read in the order of
    its `state.json` data files. Record batches are the decoding unit (memory mapped)."""

    format = "arrow"
    extensions = (".arrow",)

    def files(self, path: str) -> list[str]:
        state = os.path.join(path, "state.json")
        if os.path.isdir(path) and os.path.isfile(state):
            with open(state) as f:
                data_files = json.load(f).get("_data_files", [])
            files = [os.path.join(path, d["filename"]) for d in data_files]
            if files:
                return files
        return list_files(path, self.extensions, "arrow")

    def units(self, path: str) -> list[Unit]:
        units: list[Unit] = []
        first = 0
        for file in self.files(path):
            opened = _open_batches(file)
            for b in range(_num_batches(opened)):
                n = _batch(opened, b).num_rows
                units.append(Unit(file, b, n, first))
                first += n
        return units

    @staticmethod
    def _load(unit: Unit) -> list[dict]:
        return _batch(_open_batches(unit.file), unit.part).to_pylist()

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Rows of one shard; record batches are the decoding (and, when enough, sharding) unit."""
        yield from iter_units(
            self.units(path),
            self._load,
            dataset=path,
            shard_index=shard_index,
            num_shards=num_shards,
            start=start,
            read_pass=read_pass,
        )
