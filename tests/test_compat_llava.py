"""The `llava` reader: LLaVA conversations (json lists streamed element by element, and jsonl)
become messages with images from `data_folder`; sharding, exact resume, counted bad records."""

from __future__ import annotations

import json

import pytest

from bagel_titan.config.job_config import JobConfig
from bagel_titan.protocols import RawSample
from bagel_titan_plugins.bagel.processor import BagelProcessor, TextSegment, VitSegment
from bagel_titan_plugins.bagel.processor_config import ProcessorConfig
from bagel_titan_plugins.data.bad_samples import as_bad_record
from bagel_titan_plugins.data.example_data import Scene, build_tokenizer, render
from bagel_titan_plugins.data.readers.llava import (
    JsonArrayError,
    LlavaReader,
    NotAJsonListError,
    iter_json_array,
    llava_record,
)
from conftest import small_bagel_options


def reason(sample: RawSample) -> str | None:
    bad = as_bad_record(sample.data)
    return None if bad is None else bad.reason


def read_all(path, shard_index=0, num_shards=1, start=0) -> list[RawSample]:
    return list(
        LlavaReader().iter_samples(str(path), shard_index=shard_index, num_shards=num_shards, start=start)
    )


def llava_records(n: int) -> list[dict]:
    """Single-image, two-image, text-only and placeholder-less records, plus bad ones (n >= 11)."""
    records = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            records.append(
                {
                    "id": str(i),
                    "image": f"imgs/{i % 3}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat shape is it?"},
                        {"from": "gpt", "value": "A square."},
                        {"from": "human", "value": "And its colour?"},
                        {"from": "gpt", "value": "Red."},
                    ],
                }
            )
        elif kind == 1:
            records.append(
                {
                    "id": str(i),
                    "image": ["imgs/0.png", "imgs/1.png"],
                    "conversations": [
                        {"from": "human", "value": "Compare <image> with <image> please."},
                        {"from": "gpt", "value": "The first is red."},
                    ],
                }
            )
        elif kind == 2:
            records.append(
                {
                    "id": str(i),
                    "conversations": [
                        {"from": "system", "value": "Be brief."},
                        {"from": "human", "value": "Name a colour."},
                        {"from": "gpt", "value": "Blue."},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": str(i),
                    "image": "imgs/2.png",
                    "conversations": [
                        {"from": "human", "value": "Describe the image."},
                        {"from": "gpt", "value": "A blue square."},
                    ],
                }
            )
    records[5] = {
        "id": "5",
        "image": "imgs/0.png",
        "conversations": [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}],
    }  # 2 placeholders, 1 image
    records[6] = {"id": "6", "conversations": [{"from": "robot", "value": "hi"}]}  # unknown role
    records[9] = {
        "id": "9",
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "A dog runs."},
        ],
    }
    records[10] = {
        "id": "10",
        "image": "imgs/missing.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "Nothing."},
        ],
    }  # processor: image_missing
    return records


BAD = {5: "unknown_content", 6: "unknown_content", 9: "unsupported_video"}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(
            render(Scene("square", colour, "white", "large", 0.5, 0.5), 24, 16)
        )
    return tmp_path


def test_conversion_places_images_at_their_placeholders():
    data = llava_record(llava_records(12)[1], "r1")
    assert data["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": "imgs/0.png"}},
                {"type": "text", "text": "with"},
                {"type": "image_url", "image_url": {"url": "imgs/1.png"}},
                {"type": "text", "text": "please."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
    ]
    no_placeholder = llava_record(llava_records(12)[3], "r3")["messages"]
    assert no_placeholder[0]["content"][0] == {"type": "image_url", "image_url": {"url": "imgs/2.png"}}
    text_only = llava_record(llava_records(12)[2], "r2")["messages"]
    assert [m["role"] for m in text_only] == ["system", "user", "assistant"]


@pytest.mark.parametrize("layout", ["json", "jsonl", "folder"])
def test_streaming_sharding_resume_and_bad_records(folder, layout):
    records = llava_records(30)
    if layout == "json":
        path = folder / "train.json"
        path.write_text(json.dumps(records, indent=1))
    elif layout == "jsonl":
        path = folder / "train.jsonl"
        lines = [json.dumps(r) for r in records]
        lines.insert(12, "")  # blank lines are not records
        lines[20] = "{broken"
        path.write_text("\n".join(lines) + "\n")
    else:  # a folder of both, read in name order
        path = folder / "parts"
        path.mkdir()
        (path / "a.json").write_text(json.dumps(records[:13]))
        (path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[13:]))
    samples = read_all(path)
    assert [s.index for s in samples] == list(range(30))
    expected = dict(BAD)
    if layout == "jsonl":
        expected[19] = "bad_json"  # line 21 is record 19 (the blank line is not counted)
    assert {s.index: reason(s) for s in samples if reason(s)} == expected
    for num_shards in (2, 3, 7):
        parts = [read_all(path, k, num_shards) for k in range(num_shards)]
        assert sorted(s.index for p in parts for s in p) == list(range(30))
        for k, part in enumerate(parts):
            assert [s.data for s in part] == [samples[s.index].data for s in part]
            assert [s.index for s in read_all(path, k, num_shards, start=2)] == [s.index for s in part[2:]]


def test_json_list_streams_in_small_chunks_and_reports_where_it_breaks(tmp_path):
    path = tmp_path / "list.json"
    records = [{"i": i, "text": "x" * (i * 7), "n": 12345678901234567890} for i in range(40)]
    path.write_text(json.dumps(records))
    assert list(iter_json_array(str(path), chunk_chars=16)) == records
    path.write_text(" [ ] ")
    assert list(iter_json_array(str(path), chunk_chars=2)) == []
    path.write_text(json.dumps(records[:3])[:-1] + ', {"i": oops}]')
    got = []
    with pytest.raises(JsonArrayError, match="list.json: invalid JSON"):
        for element in iter_json_array(str(path), chunk_chars=8):
            got.append(element)
    assert got == records[:3]
    # inside the reader a broken list costs one counted bad record, not the run
    samples = read_all(path)
    assert [reason(s) for s in samples] == ["empty_messages"] * 3 + ["bad_json"]
    # a file that is not a list at all is a config error, named with its fix
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(NotAJsonListError, match="use .jsonl for one record per line"):
        read_all(path)


def test_records_process_into_understanding_samples(folder, tmp_path):
    tokenizer = str(tmp_path / "tok")
    build_tokenizer(
        ["what shape is it and its colour a square red compare with please the first is"], tokenizer
    )
    job = JobConfig()
    job.plugin_sections["bagel.processor"] = ProcessorConfig(
        vit_min_size=16, vit_max_size=32, vae_min_size=16, vae_max_size=32, min_image_side=8
    )
    proc = BagelProcessor(job, small_bagel_options(), tokenizer, vit_patch_size=4, vae_downsample=2)
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in llava_records(12)[:4]))
    samples = read_all(path)
    for s in samples:
        s.data_folder = str(folder)  # what the loader sets from the dataset's `data_folder`
    first = proc(samples[0]).segments
    assert [type(s) for s in first] == [VitSegment, TextSegment, TextSegment, TextSegment, TextSegment]
    assert [s.loss for s in first[1:]] == [False, True, False, True]
    two_images = proc(samples[1]).segments
    assert sum(isinstance(s, VitSegment) for s in two_images) == 2
