"""The bundled example data: deterministic, readable by the parquet reader, a mix of sample
kinds, and a tokenizer `AutoTokenizer` loads with the Qwen2 special tokens and no <unk>."""

from __future__ import annotations

import hashlib
from collections import Counter

from transformers import AutoTokenizer

from bagel_titan_plugins.data.example_data import QWEN2_SPECIAL, ensure_example_data, write_example_data
from bagel_titan_plugins.data.example_data import main as example_data_main
from bagel_titan_plugins.data.readers import ParquetReader


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_example_data_is_deterministic_and_mixed(tmp_path):
    a = write_example_data(str(tmp_path / "a"), num_samples=200, seed=3)
    b = write_example_data(str(tmp_path / "b"), num_samples=200, seed=3)
    assert digest(a["data"]) == digest(b["data"])
    assert digest(a["tokenizer"] + "/tokenizer.json") == digest(b["tokenizer"] + "/tokenizer.json")
    rows = [s.data for s in ParquetReader().iter_samples(a["data"], shard_index=0, num_shards=1, start=0)]
    assert len(rows) == 200
    assert len(ParquetReader().units(a["data"])) > 1  # several row groups

    def kind(row):
        images = {m["role"] for m in row["messages"] for item in m["content"] if item["type"] == "image"}
        return "t2i" if "assistant" in images else "und" if images else "text"

    kinds = Counter(kind(r) for r in rows)
    assert set(kinds) == {"t2i", "und", "text"} and kinds["und"] > kinds["t2i"] > kinds["text"]


def test_tokenizer_loads_with_special_tokens_and_covers_the_texts(tmp_path):
    paths = write_example_data(str(tmp_path), num_samples=100)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    vocab = tokenizer.get_vocab()
    assert all(t in vocab for t in QWEN2_SPECIAL)
    assert len(vocab) < 512  # fits the debug model's vocabulary
    unk = vocab["<|endoftext|>"]
    texts = 0
    for row in ParquetReader().iter_samples(paths["data"], shard_index=0, num_shards=1, start=0):
        for message in row.data["messages"]:
            for item in message["content"]:
                if item["type"] == "text":
                    ids = tokenizer.encode(item["text"], add_special_tokens=False)
                    assert ids and unk not in ids, item["text"]
                    texts += 1
    assert texts > 0
    assert tokenizer.decode(tokenizer.encode("a red circle", add_special_tokens=False)) == "a red circle"


def test_command_writes_the_folder(tmp_path):
    out = tmp_path / "out"
    example_data_main([str(out), "--num-samples", "20"])
    assert (out / "train.parquet").is_file() and (out / "tokenizer" / "tokenizer_config.json").is_file()


def test_ensure_example_data_writes_once(tmp_path):
    out = tmp_path / "bundled"
    first = ensure_example_data(str(out), num_samples=16)
    stamp = (out / "train.parquet").stat().st_mtime_ns
    assert ensure_example_data(str(out), num_samples=16) == first
    assert (out / "train.parquet").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".example_data.")]
