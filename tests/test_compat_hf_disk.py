"""The `hf_disk` reader on folders laid out as `datasets.Dataset.save_to_disk` writes them (arrow
stream files + dataset_info.json + state.json, written here with pyarrow): `Image` columns found
from the features, row layouts mapped to processor forms, sharding, exact resume, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from bagel_titan.protocols import RawSample
from bagel_titan_plugins.data.bad_samples import as_bad_record
from bagel_titan_plugins.data.example_data import Scene, render
from bagel_titan_plugins.data.readers.hf_disk import HFDiskReader

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
IMAGE_FEATURE = {"_type": "Image"}


def png(colour: str) -> dict:
    return {"bytes": render(Scene("circle", colour, "white", "large", 0.5, 0.5), 24, 16), "path": None}


def save_to_disk(
    folder: Path, rows: list[dict], schema: pa.Schema, features: dict, num_files: int = 2, batch_rows: int = 3
) -> str:
    """What `Dataset.save_to_disk` leaves: data-XXXXX-of-NNNNN.arrow (IPC stream format, several
    record batches), dataset_info.json with the features, state.json naming the files."""
    folder.mkdir(parents=True)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = schema.with_metadata(meta)
    per_file = -(-len(rows) // num_files)
    names = []
    for f in range(num_files):
        name = f"data-{f:05d}-of-{num_files:05d}.arrow"
        table = pa.Table.from_pylist(rows[f * per_file : (f + 1) * per_file], schema=schema)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    (folder / "dataset_info.json").write_text(
        json.dumps({"citation": "", "description": "", "features": features, "homepage": "", "license": ""})
    )
    (folder / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": n} for n in names],
                "_fingerprint": "0123456789abcdef",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": "train",
            }
        )
    )
    return str(folder)


def read_all(path, shard_index=0, num_shards=1, start=0) -> list[RawSample]:
    return list(
        HFDiskReader().iter_samples(path, shard_index=shard_index, num_shards=num_shards, start=start)
    )


def reason(sample: RawSample) -> str | None:
    bad = as_bad_record(sample.data)
    return None if bad is None else bad.reason


def caption_dataset(folder: Path, n: int = 20) -> str:
    rows = [
        {"image": png(["red", "green", "blue"][i % 3]), "caption": f"circle number {i}"} for i in range(n)
    ]
    rows[4]["image"] = None
    schema = pa.schema([("image", IMAGE), ("caption", pa.string())])
    features = {"image": IMAGE_FEATURE, "caption": {"dtype": "string", "_type": "Value"}}
    return save_to_disk(folder, rows, schema, features)


def test_image_caption_rows_become_text_to_image(tmp_path):
    path = caption_dataset(tmp_path / "t2i")
    samples = read_all(path)
    assert [s.index for s in samples] == list(range(20))
    assert {s.index: reason(s) for s in samples if reason(s)} == {4: "image_missing"}
    good = samples[5].data
    assert good["caption"] == "circle number 5" and good["image"]["bytes"].startswith(b"\x89PNG")


@pytest.mark.parametrize("num_shards", [2, 3, 5, 9])
def test_shards_partition_and_resume_is_exact(tmp_path, num_shards):
    path = caption_dataset(tmp_path / "t2i")
    full = read_all(path)
    parts = [read_all(path, k, num_shards) for k in range(num_shards)]
    assert sorted(s.index for p in parts for s in p) == list(range(20))
    for k, part in enumerate(parts):
        assert all(s.data == full[s.index].data for s in part)
        for start in (1, 3):
            assert [s.index for s in read_all(path, k, num_shards, start)] == [s.index for s in part[start:]]


def test_conversations_with_an_image_list_column(tmp_path):
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("images", pa.list_(IMAGE)), ("conversations", pa.list_(turn))])
    features = {
        "images": {"feature": IMAGE_FEATURE, "_type": "Sequence"},
        "conversations": [
            {"from": {"dtype": "string", "_type": "Value"}, "value": {"dtype": "string", "_type": "Value"}}
        ],
    }
    rows = [
        {
            "images": [png("red"), png("blue")],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>?"},
                {"from": "gpt", "value": "Red vs blue."},
            ],
        },
        {
            "images": [],
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
        {
            "images": [png("red")],
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "?"}],
        },
    ]
    samples = read_all(save_to_disk(tmp_path / "conv", rows, schema, features, num_files=1))
    first = samples[0].data["messages"]
    assert [item["type"] for item in first[0]["content"]] == ["image_url", "text", "image_url", "text"]
    assert first[0]["content"][2]["image_url"]["url"] == png("blue")
    assert samples[1].data["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello."}],
    }
    assert reason(samples[2]) == "unknown_content"


def test_messages_and_text_layouts_pass_through(tmp_path):
    item = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", IMAGE)])
    schema = pa.schema(
        [("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(item))])))]
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None, "image": png("red")}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red", "image": None}]},
            ]
        }
    ]
    samples = read_all(save_to_disk(tmp_path / "msg", rows, schema, {"messages": [{}]}, num_files=1))
    assert samples[0].data == {"messages": rows[0]["messages"]}
    text = save_to_disk(
        tmp_path / "text",
        [{"text": "hello"}],
        pa.schema([("text", pa.string())]),
        {"text": {"dtype": "string", "_type": "Value"}},
        num_files=1,
    )
    assert read_all(text)[0].data == {"text": "hello"}


def test_layout_errors_name_the_fix(tmp_path):
    odd = save_to_disk(
        tmp_path / "odd",
        [{"img": png("red"), "label": 3}],
        pa.schema([("img", IMAGE), ("label", pa.int64())]),
        {"img": IMAGE_FEATURE, "label": {"dtype": "int64", "_type": "Value"}},
        num_files=1,
    )
    with pytest.raises(ValueError, match=r"columns \['img', 'label'\].*rename_column"):
        read_all(odd)
    splits = tmp_path / "dict"
    caption_dataset(splits / "train")
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"DatasetDict.*dict/train"):
        read_all(str(splits))
    with pytest.raises(FileNotFoundError, match='format = "arrow"'):
        read_all(str(tmp_path / "odd" / "data-00000-of-00001.arrow"))
