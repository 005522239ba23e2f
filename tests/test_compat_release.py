"""The BAGEL release's parquet layouts (`bagel_t2i`, `bagel_edit`): rows become the processor's
forms as the release builds them, shards never overlap, resume is exact, bad rows are counted."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel_titan.config.job_config import DatasetEntry, JobConfig
from bagel_titan.plugins import PluginManager
from bagel_titan.protocols import RawSample
from bagel_titan_plugins.bagel.processor import BagelProcessor, TextSegment, VaeSegment, VitSegment
from bagel_titan_plugins.bagel.processor_config import ProcessorConfig
from bagel_titan_plugins.data.bad_samples import as_bad_record
from bagel_titan_plugins.data.example_data import COLOURS, Scene, build_tokenizer, render
from bagel_titan_plugins.data.readers.bagel_release import BagelEditReader, BagelT2IReader, edit_messages
from conftest import small_bagel_options


def png(colour: str, width: int = 24, height: int = 16) -> bytes:
    return render(
        Scene("square", colour, "white" if colour != "white" else "black", "large", 0.5, 0.5), width, height
    )


def t2i_rows(n: int, seed: int = 0) -> list[dict]:
    """Good rows with two or three named captions, plus one bad row of each kind at fixed places."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        captions = {"short": f"a {colour} square", "long": f"a large {colour} square on a plain background"}
        if i % 2:
            captions["tags"] = f"{colour}, square"
        rows.append({"image": png(colour), "captions": json.dumps(captions)})
    rows[3] = {"image": png("red"), "captions": json.dumps({})}  # no caption
    rows[7] = {"image": png("red"), "captions": json.dumps({"a": "  ", "b": ""})}  # only empty captions
    rows[11] = {"image": png("red"), "captions": "{not json"}  # bad JSON
    rows[13] = {"image": b"not an image", "captions": json.dumps({"a": "broken"})}  # decoded by the processor
    return rows


def write_t2i(folder, n_files=2, rows_per_file=12, row_group_size=4) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = t2i_rows(n_files * rows_per_file)
    schema = pa.schema([("image", pa.binary()), ("captions", pa.string())])
    for f in range(n_files):
        part = rows[f * rows_per_file : (f + 1) * rows_per_file]
        pq.write_table(
            pa.Table.from_pylist(part, schema=schema),
            folder / f"part-{f:05d}.parquet",
            row_group_size=row_group_size,
        )
    return str(folder)


def edit_rows(n: int) -> list[dict]:
    rows = []
    colours = sorted(COLOURS)
    for i in range(n):
        length = 2 + i % 3  # chains of 2, 3 and 4 images
        chain = [colours[(i + k) % len(colours)] for k in range(length)]
        rows.append(
            {
                "image_list": [png(c) for c in chain],
                "instruction_list": [[f"make it {c}", f"turn the square {c}"] for c in chain[1:]],
            }
        )
    rows[5] = {"image_list": [png("red")], "instruction_list": []}  # too short
    rows[9] = {"image_list": [png("red"), png("blue")], "instruction_list": [["", "  "]]}  # no instruction
    return rows


def write_edit(folder, n=18, row_group_size=3) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [("image_list", pa.list_(pa.binary())), ("instruction_list", pa.list_(pa.list_(pa.string())))]
    )
    pq.write_table(
        pa.Table.from_pylist(edit_rows(n), schema=schema),
        folder / "edit.parquet",
        row_group_size=row_group_size,
    )
    return str(folder)


def read_all(reader, path, shard_index=0, num_shards=1, start=0) -> list[RawSample]:
    return list(reader.iter_samples(path, shard_index=shard_index, num_shards=num_shards, start=start))


def reason(sample: RawSample) -> str | None:
    bad = as_bad_record(sample.data)
    return None if bad is None else bad.reason


# -- bagel_t2i ------------------------------------------------------------------------------------


def test_t2i_rows_become_caption_and_image(tmp_path):
    path = write_t2i(tmp_path / "t2i")
    samples = read_all(BagelT2IReader(), path)
    assert [s.index for s in samples] == list(range(24))
    rows = t2i_rows(24)
    assert {s.index: reason(s) for s in samples if reason(s)} == {
        3: "no_caption",
        7: "no_caption",
        11: "bad_json",
    }
    for s in samples:
        if reason(s) is None:
            assert s.data["image"] == rows[s.index]["image"]
            assert s.data["caption"] in json.loads(rows[s.index]["captions"]).values()
    # one caption drawn at random per row, the same on every read (exact resume), not always the first
    again = read_all(BagelT2IReader(), path)
    assert [s.data for s in samples] == [s.data for s in again]
    keys = Counter(
        next(k for k, v in json.loads(rows[s.index]["captions"]).items() if v == s.data["caption"])
        for s in samples
        if reason(s) is None
    )
    assert len(keys) >= 2


@pytest.mark.parametrize("num_shards", [2, 3, 8, 13])
def test_t2i_shards_partition_the_rows(tmp_path, num_shards):
    path = write_t2i(tmp_path / "t2i")
    full = {s.index: s.data for s in read_all(BagelT2IReader(), path)}
    seen = []
    for shard in range(num_shards):
        part = read_all(BagelT2IReader(), path, shard, num_shards)
        seen += [s.index for s in part]
        assert all(s.data == full[s.index] for s in part)
    assert sorted(seen) == sorted(full)


@pytest.mark.parametrize("num_shards,start", [(1, 0), (1, 5), (1, 13), (2, 4), (3, 7), (2, 12)])
def test_t2i_resume_at_a_position_is_the_tail(tmp_path, num_shards, start):
    path = write_t2i(tmp_path / "t2i")
    for shard in range(num_shards):
        whole = read_all(BagelT2IReader(), path, shard, num_shards)
        tail = read_all(BagelT2IReader(), path, shard, num_shards, start)
        assert [(s.index, s.data) for s in tail] == [(s.index, s.data) for s in whole[start:]]


def test_t2i_missing_columns_fail_at_start_with_the_fix(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [b"x"], "text": ["a"]}), path)
    with pytest.raises(ValueError, match=r"no column\(s\) \['captions'\].*Fix `format`"):
        read_all(BagelT2IReader(), str(path))


# -- bagel_edit -----------------------------------------------------------------------------------


def roles_and_kinds(messages: list[dict]) -> list[tuple[str, list[str]]]:
    return [(m["role"], [item["type"] for item in m["content"]]) for m in messages]


def test_edit_messages_follow_the_release_draws():
    images = ["img0", "img1", "img2", "img3"]
    instructions = [["i1a", "i1b"], ["i2a"], ["i3a"]]
    shapes = Counter()
    for seed in range(400):
        messages = edit_messages(images, instructions, random.Random(seed))
        first = messages[0]["content"][0]["image"]
        start = images.index(first)
        generated = [m["content"][0]["image"] for m in messages if m["role"] == "assistant"]
        end = images.index(generated[-1])
        assert 1 <= end - start <= 2 and messages[0]["role"] == "user"
        kinds = roles_and_kinds(messages)
        if len(generated) == 1:
            assert kinds == [("user", ["image", "text"]), ("assistant", ["image"])]
            text = messages[0]["content"][1]["text"]
            if text.endswith("."):  # joined instructions ("a. b.")
                shapes["joined"] += 1
                if end - start == 1:  # the release shortens a join that reached the last image
                    assert end == len(images) - 2 and text.count(".") == 1
                else:
                    assert text.count(".") == 2
            else:
                assert end - start == 1
                shapes["single"] += 1
        else:  # two steps: the intermediate image is generated, then conditions the next step
            assert kinds == [
                ("user", ["image", "text"]),
                ("assistant", ["image"]),
                ("user", ["image", "text"]),
                ("assistant", ["image"]),
            ]
            assert messages[2]["content"][0]["image"] == generated[0] == images[start + 1]
            shapes["two_steps"] += 1
    assert set(shapes) == {"joined", "single", "two_steps"}


def test_edit_reader_converts_and_counts_bad_chains(tmp_path):
    path = write_edit(tmp_path / "edit")
    samples = read_all(BagelEditReader(), path)
    assert {s.index: reason(s) for s in samples if reason(s)} == {5: "bad_edit_chain", 9: "bad_edit_chain"}
    rows = edit_rows(18)
    checked = 0
    for s in samples:
        if reason(s) is None:
            chain = rows[s.index]["image_list"]
            images = [
                item["image"] for m in s.data["messages"] for item in m["content"] if item["type"] == "image"
            ]
            assert images and all(image in chain for image in images), s.index
            checked += 1
    assert checked == 16
    assert [s.data for s in samples] == [s.data for s in read_all(BagelEditReader(), path)]
    for num_shards in (2, 4, 7):
        parts = [read_all(BagelEditReader(), path, k, num_shards) for k in range(num_shards)]
        assert sorted(s.index for p in parts for s in p) == list(range(18))
        tail = read_all(BagelEditReader(), path, 1, num_shards, start=2)
        assert [s.index for s in tail] == [s.index for s in parts[1][2:]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    build_tokenizer(["make it turn the square a large on plain background"], out)
    return out


def processor(tokenizer: str, **overrides) -> BagelProcessor:
    job = JobConfig()
    options = dict(
        vit_min_size=16,
        vit_max_size=32,
        vae_min_size=16,
        vae_max_size=32,
        min_image_side=8,
        text_dropout_prob=0.0,
        vit_dropout_prob=0.0,
        vae_dropout_prob=0.0,
    )
    job.plugin_sections["bagel.processor"] = ProcessorConfig(**{**options, **overrides})
    return BagelProcessor(job, small_bagel_options(), tokenizer, vit_patch_size=4, vae_downsample=2)


def test_edit_samples_process_as_the_release_sequence_plan(tmp_path, tokenizer):
    """Source image: clean VAE + ViT; instruction: text without loss; target: noised VAE; an
    intermediate target is followed by its clean VAE + ViT copy."""
    proc = processor(tokenizer)
    plans = set()
    for s in read_all(BagelEditReader(), write_edit(tmp_path / "edit", n=60)):
        if reason(s):
            continue
        segments = proc(s).segments
        plan = []
        for seg in segments:
            if isinstance(seg, TextSegment):
                assert not seg.loss
                plan.append("text")
            elif isinstance(seg, VaeSegment):
                plan.append("vae_noised" if seg.noised else "vae_clean")
            else:
                assert isinstance(seg, VitSegment)
                plan.append("vit")
        plans.add(tuple(plan))
    assert plans <= {
        ("vae_clean", "vit", "text", "vae_noised"),
        ("vae_clean", "vit", "text", "vae_noised", "vae_clean", "vit", "text", "vae_noised"),
    }
    assert len(plans) == 2


def test_t2i_samples_process_as_text_then_generated_image(tmp_path, tokenizer):
    proc = processor(tokenizer)
    sample = next(s for s in read_all(BagelT2IReader(), write_t2i(tmp_path / "t2i")) if not reason(s))
    segments = proc(sample).segments
    assert [type(s) for s in segments] == [TextSegment, VaeSegment]
    assert not segments[0].loss and segments[1].noised


@dataclass
class Pack:
    """A stand-in batch: the processed samples of one pack (the loader needs only these counts)."""

    samples: list

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)


class Spec:
    """The two ModelSpec members the loader calls: the real BAGEL processor, a listing collator."""

    def __init__(self, tokenizer: str, **processor_options):
        self.tokenizer = tokenizer
        self.processor_options = processor_options

    def build_processor(self, job_config):
        return processor(self.tokenizer, **self.processor_options)

    def build_collator(self, job_config):
        return Pack


def release_loader(tmp_path, tokenizer, *, infinite: bool, **processor_options):
    from bagel_titan_plugins.data.loader import PackedDataloaderBuilder

    plugins = PluginManager(
        load_entry_points=False,
        extra_modules=["bagel_titan_plugins.data.plugin", "bagel_titan_plugins.data.compat_plugin"],
    )
    cfg = JobConfig()
    t2i, edit = tmp_path / "t2i", tmp_path / "edit"
    cfg.data.datasets = [
        DatasetEntry(path=str(t2i) if t2i.exists() else write_t2i(t2i), format="bagel_t2i"),
        DatasetEntry(path=str(edit) if edit.exists() else write_edit(edit), format="bagel_edit"),
    ]
    cfg.data.num_workers = 0
    cfg.data.packing_strategy = "first_fit"
    cfg.data.packing_length = 1024
    cfg.data.packing_window = 4
    return PackedDataloaderBuilder().build(
        cfg, plugins, Spec(tokenizer, **processor_options), dp_rank=0, dp_world_size=1, infinite=infinite
    )


def pack_signature(batch: Pack) -> list:
    """What must match between a resumed and an uninterrupted run: keys, token ids, image sizes."""
    out = []
    for sample in batch.samples:
        parts = [
            tuple(seg.ids)
            if isinstance(seg, TextSegment)
            else (type(seg).__name__, tuple(seg.image.shape), float(seg.image.sum()))
            if hasattr(seg, "image")
            else type(seg).__name__
            for seg in sample.segments
        ]
        out.append((sample.key, tuple(parts)))
    return out


def test_resume_through_the_loader_gives_the_same_packs(tmp_path, tokenizer):
    """The random caption / edit-chain draws are a function of the row, so a packing buffer
    re-read on resume holds the same samples: the packs after a resume are the uninterrupted ones."""
    options = {"text_dropout_prob": 0.3, "vit_dropout_prob": 0.3, "vae_dropout_prob": 0.3}
    loader = release_loader(tmp_path, tokenizer, infinite=True, **options)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    expected = [pack_signature(next(stream)) for _ in range(5)]
    resumed = release_loader(tmp_path, tokenizer, infinite=True, **options)
    resumed.load_state_dict(state)
    stream = iter(resumed)
    assert [pack_signature(next(stream)) for _ in range(5)] == expected


def test_bad_rows_are_counted_exactly_by_the_loader(tmp_path, tokenizer):
    """One pass over both layouts through the packed loader: every good row is packed once and
    every bad row is counted under its reason."""
    loader = release_loader(tmp_path, tokenizer, infinite=False)
    packed = [sample.key for batch in loader for sample in batch.samples]
    stats = loader.data_stats()
    assert stats["data/skipped/no_caption"] == 2
    assert stats["data/skipped/bad_json"] == 1
    assert stats["data/skipped/image_corrupt"] == 1
    assert stats["data/skipped/bad_edit_chain"] == 2
    assert len(packed) == len(set(packed)) == 24 - 4 + 18 - 2
