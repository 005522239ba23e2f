"""Readers: every format streams each row exactly once across shards, `start` resumes a shard,
yaml mixtures expand, and unreadable records become bad records instead of errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel_titan_plugins.data.bad_samples import as_bad_record
from bagel_titan_plugins.data.readers import (
    ArrowReader,
    JsonListReader,
    JsonlReader,
    ParquetReader,
    YamlMixtureReader,
)

N = 23


def records(n: int = N, offset: int = 0) -> list[dict]:
    return [{"text": f"sample {i + offset}", "i": i + offset} for i in range(n)]


def write_parquet(path, rows, row_group_size=4):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def write_arrow_file(path, rows, batch=5):
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for b in table.to_batches(max_chunksize=batch):
            writer.write_batch(b)


def write_arrow_stream(path, rows, batch=5):
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        for b in table.to_batches(max_chunksize=batch):
            writer.write_batch(b)


def make(kind: str, tmp_path):
    """(reader, path) of a dataset of `N` records `{"i": 0..N-1}` in the given layout."""
    if kind == "parquet":
        write_parquet(tmp_path / "a.parquet", records())
        return ParquetReader(), str(tmp_path / "a.parquet")
    if kind == "parquet_folder":
        write_parquet(tmp_path / "part0.parquet", records(10))
        write_parquet(tmp_path / "part1.parquet", records(N - 10, offset=10), row_group_size=3)
        return ParquetReader(), str(tmp_path)
    if kind == "arrow_file":
        write_arrow_file(tmp_path / "a.arrow", records())
        return ArrowReader(), str(tmp_path / "a.arrow")
    if kind == "hf_save_to_disk":
        write_arrow_stream(tmp_path / "data-00000-of-00002.arrow", records(12))
        write_arrow_stream(tmp_path / "data-00001-of-00002.arrow", records(N - 12, offset=12))
        (tmp_path / "dataset_info.json").write_text("{}")
        (tmp_path / "state.json").write_text(
            json.dumps(
                {
                    "_data_files": [
                        {"filename": "data-00000-of-00002.arrow"},
                        {"filename": "data-00001-of-00002.arrow"},
                    ]
                }
            )
        )
        return ArrowReader(), str(tmp_path)
    if kind == "json":
        (tmp_path / "a.json").write_text(json.dumps(records()))
        return JsonListReader(), str(tmp_path / "a.json")
    if kind == "jsonl":
        (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records()) + "\n\n")
        return JsonlReader(), str(tmp_path / "a.jsonl")
    raise AssertionError(kind)


KINDS = ["parquet", "parquet_folder", "arrow_file", "hf_save_to_disk", "json", "jsonl"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_partition_the_rows(kind, num_shards, tmp_path):
    reader, path = make(kind, tmp_path)
    seen = []
    for shard in range(num_shards):
        for sample in reader.iter_samples(path, shard_index=shard, num_shards=num_shards, start=0):
            assert sample.data["i"] == sample.index  # the index is stable and global
            seen.append(sample.index)
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("kind", KINDS)
def test_start_skips_the_first_rows_of_a_shard(kind, tmp_path):
    reader, path = make(kind, tmp_path)
    full = [s.index for s in reader.iter_samples(path, shard_index=1, num_shards=3, start=0)]
    for start in range(len(full) + 1):
        rest = [s.index for s in reader.iter_samples(path, shard_index=1, num_shards=3, start=start)]
        assert rest == full[start:]


def test_bad_json_lines_are_bad_records(tmp_path):
    lines = ['{"text": "ok"}', "{not json", "[1, 2]", '{"text": "fine"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    samples = list(
        JsonlReader().iter_samples(str(tmp_path / "a.jsonl"), shard_index=0, num_shards=1, start=0)
    )
    bad = [as_bad_record(s.data) for s in samples]
    assert [b.reason if b else None for b in bad] == [None, "bad_json", "bad_json", None]
    assert "a.jsonl:2" in bad[1].detail


def test_corrupt_parquet_row_group_is_counted_not_raised(tmp_path):
    path = tmp_path / "a.parquet"
    write_parquet(path, records(8), row_group_size=4)
    reader = ParquetReader()
    units = reader.units(str(path))
    data = bytearray(path.read_bytes())
    # Scribble over the first row group's data pages (the footer stays valid).
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    samples = list(reader.iter_samples(str(path), shard_index=0, num_shards=1, start=0))
    assert len(samples) == 8 and len(units) == 2
    reasons = [as_bad_record(s.data).reason if as_bad_record(s.data) else None for s in samples]
    assert reasons[:4] == ["unreadable_record"] * 4 and reasons[4:] == [None] * 4


def test_yaml_mixture_expands_relative_paths(tmp_path):
    write_parquet(tmp_path / "a.parquet", records(5))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records(3)))
    (tmp_path / "mix.yaml").write_text(
        "- path: a.parquet\n  weight: 2\n  data_folder: images\n- path: b.jsonl\n  format: jsonl\n"
    )
    entries = YamlMixtureReader().expand(str(tmp_path / "mix.yaml"))
    assert [e.path for e in entries] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]
    assert [e.weight for e in entries] == [2.0, 1.0]
    assert entries[0].data_folder == str(tmp_path / "images")
    streamed = list(
        YamlMixtureReader().iter_samples(str(tmp_path / "mix.yaml"), shard_index=0, num_shards=1, start=2)
    )
    assert len(streamed) == 6


@pytest.mark.parametrize(
    "text, match",
    [
        ("{}", "non-empty list"),
        ("- weight: 1\n", "needs a `path`"),
        ("- path: a\n  wieght: 2\n", "unknown keys"),
    ],
)
def test_yaml_mixture_errors_name_the_problem(tmp_path, text, match):
    (tmp_path / "mix.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        YamlMixtureReader().expand(str(tmp_path / "mix.yaml"))


def test_missing_or_empty_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(
            ParquetReader().iter_samples(str(tmp_path / "nope.parquet"), shard_index=0, num_shards=1, start=0)
        )
    with pytest.raises(FileNotFoundError, match="holds no .parquet"):
        list(ParquetReader().iter_samples(str(tmp_path), shard_index=0, num_shards=1, start=0))
