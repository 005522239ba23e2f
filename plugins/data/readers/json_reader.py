"""JSON readers: a file holding one list of records, and JSON Lines (streamed line by line)."""

from __future__ import annotations

import codecs
import json
from typing import Iterator

from bagel_titan.protocols import DatasetReader, RawSample, ReadPass

from ..bad_samples import DataError, bad_record
from .base import list_files


def _record(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad_record("bad_json", f"{where}: {exc}")
    if not isinstance(record, dict):
        return bad_record("bad_json", f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _decode(raw: bytes, where: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad_record("bad_utf8", f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
    return _record(text, where)


class JsonlReader(DatasetReader):
    """`.jsonl` files (or a folder of them), one record per line, streamed; line i of the
    concatenated files (blank lines excluded) belongs to shard i % num_shards."""

    format = "jsonl"
    extensions = (".jsonl",)

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Only the lines of this shard are parsed; a line that does not parse, or is not valid
        UTF-8, is a bad record. A UTF-8 byte-order mark at the start of a file is accepted."""
        index = 0
        owned = 0
        for file in list_files(path, self.extensions, "jsonl"):
            with open(file, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw = raw[len(codecs.BOM_UTF8) :]
                    if not raw.strip():
                        continue
                    mine = index % num_shards == shard_index
                    if mine:
                        if owned >= start:
                            yield RawSample(path, index, _decode(raw, f"{file}:{line_no}"))
                        owned += 1
                    index += 1


class JsonListReader(DatasetReader):
    """`.json` files holding a list of records (loaded whole: use jsonl or parquet for big data)."""

    format = "json"
    extensions = (".json",)

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Record i of the concatenated lists belongs to shard i % num_shards."""
        index = 0
        for file in list_files(path, self.extensions, "json"):
            with open(file, encoding="utf-8-sig") as f:  # a byte-order mark is accepted
                try:
                    records = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(
                        f"json dataset file {file!r} does not parse ({exc}); a `json` "
                        f"dataset is one list of records (use `jsonl` for one per line)"
                    ) from exc
            if not isinstance(records, list):
                raise DataError(
                    f"json dataset file {file!r} holds a {type(records).__name__}, not a "
                    f"list of records; use `jsonl` for one record per line"
                )
            first = (shard_index - index) % num_shards
            for local in range(first, len(records), num_shards):
                position = (index + local) // num_shards  # this shard's running count
                if position >= start:
                    record = records[local]
                    data = (
                        record
                        if isinstance(record, dict)
                        else bad_record(
                            "bad_json", f"{file}[{local}]: expected an object, got {type(record).__name__}"
                        )
                    )
                    yield RawSample(path, index + local, data)
            index += len(records)
