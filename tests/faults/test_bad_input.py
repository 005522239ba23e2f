"""Issue 19 items 4, 10 and 11 (data side): usable data is decided over the whole dataset;
images are capped from their header, bombs and huge non-images never decoded, 16-bit kept,
float skipped; invalid UTF-8 is a counted skip, a BOM is accepted; a truncated parquet file in a
folder is skipped and counted, alone it is one clear error."""

from __future__ import annotations

import json
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bagel_titan.plugins import get_plugin_manager
from bagel_titan.protocols import RawSample
from bagel_titan_plugins.data.bad_samples import BadSampleError, DataError, as_bad_record
from bagel_titan_plugins.data.images import load_rgb, open_image
from bagel_titan_plugins.data.loader import check_usable
from bagel_titan_plugins.data.mixture import Source
from bagel_titan_plugins.data.pipeline import PackedIterable, PipelineOptions
from bagel_titan_plugins.data.readers.json_reader import JsonListReader, JsonlReader
from bagel_titan_plugins.data.readers.parquet import ParquetReader


def _reason(call) -> str:
    with pytest.raises(BadSampleError) as info:
        call()
    return info.value.reason


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims `width` x `height` (valid chunk CRCs)."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_images_too_large_from_the_header_and_bombs(tmp_path: Path) -> None:
    large = _png_claiming(tmp_path / "large.png", 10_000, 10_000)  # 100 MP, under PIL's bomb limit
    assert _reason(lambda: load_rgb(str(large), "", min_side=1, max_pixels=40_000_000)) == "image_too_large"
    bomb = _png_claiming(tmp_path / "bomb.png", 30_000, 30_000)  # 900 MP: PIL's bomb error
    assert _reason(lambda: load_rgb(str(bomb), "", min_side=1, max_pixels=10**12)) == "image_too_large"


def test_a_huge_non_image_file_is_not_read_whole(tmp_path: Path) -> None:
    fake = tmp_path / "movie.png"
    with open(fake, "wb") as f:  # sparse: 3 GB long, no disk used
        f.write(b"not an image")
        f.truncate(3 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert _reason(lambda: open_image(str(fake), "")) == "image_corrupt"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, f"reading the header grew the process by {grown_kib} KiB"


def test_sixteen_bit_images_keep_their_content_and_float_images_are_skipped(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "deep.png"), "", min_side=1, max_pixels=10**8))
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1  # before: 255 (white) almost everywhere
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() >= 254

    Image.fromarray(np.random.rand(32, 32).astype(np.float32)).save(tmp_path / "float.tiff")
    reason = _reason(lambda: load_rgb(str(tmp_path / "float.tiff"), "", min_side=1, max_pixels=10**8))
    assert reason == "image_unsupported_mode"


def _records(reader, path: Path) -> list[dict]:
    return [s.data for s in reader.iter_samples(str(path), shard_index=0, num_shards=1, start=0)]


def test_jsonl_invalid_utf8_is_a_counted_skip_and_a_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "third"}\n')
    records = _records(JsonlReader(), path)
    assert records[0] == {"text": "first"}
    assert as_bad_record(records[1]).reason == "bad_utf8"
    assert records[2] == {"text": "third"}
    listing = tmp_path / "list.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "a"}]).encode())
    assert _records(JsonListReader(), listing) == [{"text": "a"}]


def test_truncated_parquet_file_is_skipped_in_a_folder_and_an_error_alone(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a1", "a2"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": ["b1", "b2"]}), folder / "b.parquet")
    data = (folder / "b.parquet").read_bytes()
    (folder / "b.parquet").write_bytes(data[: len(data) // 2])
    records = _records(ParquetReader(), folder)
    good = [r for r in records if as_bad_record(r) is None]
    bad = [as_bad_record(r) for r in records if as_bad_record(r) is not None]
    assert good == [{"text": "a1"}, {"text": "a2"}]
    assert len(bad) == 1 and bad[0].reason == "unreadable_record" and "b.parquet" in bad[0].detail
    with pytest.raises(DataError, match=r"b\.parquet.*no file reads|no file reads.*b\.parquet"):
        ParquetReader().units(str(folder / "b.parquet"))


class Text:
    def __init__(self, tokens):
        self.tokens = tokens

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def _process(sample: RawSample) -> Text:
    if not sample.data.get("text"):
        raise BadSampleError("no_target", "empty")
    return Text(list(sample.data["text"].encode()))


class Batch(list):
    num_samples = property(len)
    num_tokens = property(lambda self: sum(s.num_tokens for s in self))


def _source(tmp_path: Path, texts: list[str]) -> Source:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return Source("d", str(path), JsonlReader(), 1.0)


def test_usable_data_is_decided_over_the_whole_dataset(tmp_path: Path) -> None:
    # One good record among bad ones: shard 1 of 2 holds only bad records, yet trains.
    source = _source(tmp_path, ["", "good text", "", ""])
    check_usable([source], _process)  # the dataset as a whole is usable
    options = PipelineOptions(
        packing_length=64,
        strategy=get_plugin_manager().packing_strategies.get("first_fit"),
        window=4,
        oversize_policy="skip",
        seed=0,
        infinite=True,
        shuffle=False,
        shuffle_window=1,
        packer_options={},
        max_sample_tokens=64,
        max_sample_key="[data] packing_length",
    )
    shard1 = PackedIterable([source], _process, Batch, options, dp_rank=1, dp_world_size=2)
    stream = iter(shard1)
    batches = [next(stream).batch for _ in range(2)]
    assert all(b.num_samples >= 1 for b in batches)
    assert {bytes(s.tokens).decode() for b in batches for s in b} == {"good text"}

    # One row in all: shard 1 of 2 is empty, yet trains (before: "no samples for shard 1 of 2").
    (tmp_path / "one").mkdir()
    one = _source(tmp_path / "one", ["only row"])
    stream = iter(PackedIterable([one], _process, Batch, options, dp_rank=1, dp_world_size=2))
    assert {bytes(s.tokens).decode() for s in next(stream).batch} == {"only row"}

    with pytest.raises(
        DataError, match=r"dataset 'd' has no usable sample: all 2 records were skipped .*no_target"
    ):
        check_usable([_source(tmp_path, ["", ""])], _process)
