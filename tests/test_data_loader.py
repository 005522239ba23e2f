"""The "packed" loader: exact resume batch by batch (0 and 2 workers, 1 and 2 ranks), shards
never overlap, exact bad-sample counts, and config errors that fail at start."""

from __future__ import annotations

import json

import pytest

from bagel_titan.config.job_config import DatasetEntry, JobConfig
from bagel_titan.plugins import PluginManager, UnknownNameError
from bagel_titan_plugins.bagel.collator import BagelCollator
from bagel_titan_plugins.bagel.processor import BagelProcessor
from bagel_titan_plugins.bagel.processor_config import ProcessorConfig
from bagel_titan_plugins.data.example_data import Scene, render, write_example_data
from conftest import small_bagel_options


class ExampleSpec:
    """The two ModelSpec members the loader uses, building the real BAGEL processor and collator."""

    def __init__(self, tokenizer: str):
        self.tokenizer = tokenizer

    def build_processor(self, job_config):
        return BagelProcessor(
            job_config, small_bagel_options(), self.tokenizer, vit_patch_size=4, vae_downsample=2
        )

    def build_collator(self, job_config):
        return BagelCollator(
            job_config,
            small_bagel_options(),
            vit_patch_size=4,
            vae_downsample=2,
            tokenizer_path=self.tokenizer,
        )


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_data(str(tmp_path_factory.mktemp("example")), num_samples=160, row_group_size=16)


@pytest.fixture(scope="module")
def small_example(tmp_path_factory):
    """Few rows, so that 24 packs run every shard through several epochs."""
    return write_example_data(str(tmp_path_factory.mktemp("small")), num_samples=48, row_group_size=5)


@pytest.fixture(scope="module")
def plugins():
    return PluginManager(load_entry_points=False, extra_modules=["bagel_titan_plugins.data.plugin"])


def job(
    datasets, *, workers=0, strategy="best_fit_decreasing", length=512, window=8, shuffle_window=7
) -> JobConfig:
    cfg = JobConfig()
    cfg.data.datasets = datasets
    cfg.data.shuffle_window = shuffle_window  # small: resume lands inside windows and units
    cfg.data.num_workers = workers
    cfg.data.packing_strategy = strategy
    cfg.data.packing_length = length
    cfg.data.packing_window = window
    cfg.data.prefetch_factor = 2
    cfg.plugin_sections["bagel.processor"] = ProcessorConfig(
        vit_min_size=16, vit_max_size=32, vae_min_size=16, vae_max_size=32, min_image_side=8
    )
    return cfg


def build(cfg, plugins, example, rank=0, world=1, **kwargs):
    builder = plugins.dataloaders.get("packed")
    return builder.build(
        cfg, plugins, ExampleSpec(example["tokenizer"]), dp_rank=rank, dp_world_size=world, **kwargs
    )


def fingerprint(batch) -> tuple:
    return (
        tuple(map(tuple, batch.sample_keys)),
        batch.packed_text_ids.tolist(),
        batch.split_lens,
        float(batch.packed_vit_tokens.sum()),
        None if batch.padded_images is None else float(batch.padded_images.sum()),
    )


def take(iterator, n):
    return [fingerprint(next(iterator)) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(small_example, plugins, workers, world, shuffle):
    example = small_example
    datasets = [
        DatasetEntry(path=example["data"], weight=3.0, name="shapes"),
        DatasetEntry(path=example["data"], weight=1.0, name="shapes_again"),
    ]
    cfg = job(datasets, workers=workers)
    cfg.data.shuffle = shuffle
    total, cut = 24, 9
    keys_per_rank = []
    for rank in range(world):
        uninterrupted = build(cfg, plugins, example, rank, world)
        reference = take(iter(uninterrupted), total)
        first = build(cfg, plugins, example, rank, world)
        it = iter(first)
        head = take(it, cut)
        state = first.state_dict()
        resumed = build(cfg, plugins, example, rank, world)
        resumed.load_state_dict(state)
        tail = take(iter(resumed), total - cut)
        assert head + tail == reference
        assert resumed.data_stats() == uninterrupted.data_stats()  # counters resume too
        assert resumed.data_stats()["data/packs"] == total
        keys = [k for fp in reference for k in fp[0]]
        assert len(set(keys)) < len(keys)  # epochs repeated within the run
        keys_per_rank.append(set(keys))
        lengths = [sum(s) for s in (fp[2] for fp in reference)]
        assert max(lengths) <= cfg.data.packing_length
    if world == 2 and not shuffle:  # ranks read disjoint shards (shuffled: per epoch, tested below)
        assert not keys_per_rank[0] & keys_per_rank[1]


def test_one_pass_reads_every_sample_once_across_ranks_and_workers(example, plugins):
    cfg = job([DatasetEntry(path=example["data"])], workers=2, strategy="first_fit")
    seen = []
    for rank in range(2):
        loader = build(cfg, plugins, example, rank, 2, infinite=False)
        before = len(seen)
        for batch in loader:
            seen.extend(index for _, index in batch.sample_keys)
        assert loader.data_stats()["data/samples"] == len(seen) - before
    assert sorted(seen) == list(range(160))


def image(w, h):
    return {"bytes": render(Scene("square", "red", "blue", "large", 0.5, 0.5), w, h), "path": None}


def bad_jsonl(path):
    good = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what colour is red ?"}]},
            {"role": "assistant", "content": "red ."},
        ]
    }
    long_text = {"text": "red " * 600}
    rows = [json.dumps(good)] * 20 + [
        "{broken",
        "[1, 2]",  # bad_json x2
        json.dumps({"messages": []}),  # empty_messages
        json.dumps({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),  # unknown_content
        json.dumps({"caption": "a", "image": "missing/one.png"}),  # image_missing x3
        json.dumps({"caption": "a", "image": "missing/two.png"}),
        json.dumps({"caption": "a", "image": "/missing/three.png"}),
        json.dumps({"caption": "a", "image": "data:image/png;base64,AAAA"}),  # image_corrupt
        json.dumps(long_text),
        json.dumps(long_text),  # oversize x2
    ]
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(example, plugins, tmp_path, workers):
    bad_jsonl(tmp_path / "bad.jsonl")
    cfg = job([DatasetEntry(path=str(tmp_path / "bad.jsonl"), data_folder=str(tmp_path))], workers=workers)
    loader = build(cfg, plugins, example, infinite=False)
    samples = sum(batch.num_samples for batch in loader)
    stats = loader.data_stats()
    assert samples == 20 == stats["data/samples"]
    skipped = {k.removeprefix("data/skipped/"): v for k, v in stats.items() if k.startswith("data/skipped/")}
    assert skipped == {
        "bad_json": 2,
        "empty_messages": 1,
        "unknown_content": 1,
        "image_missing": 3,
        "image_corrupt": 1,
        "oversize": 2,
    }


def test_an_all_bad_dataset_fails_instead_of_spinning(example, plugins, tmp_path):
    (tmp_path / "bad.jsonl").write_text("{broken\n" * 7)
    with pytest.raises(ValueError, match="no usable sample"):  # decided at build, over the whole dataset
        build(job([DatasetEntry(path=str(tmp_path / "bad.jsonl"))]), plugins, example)


def test_truncate_policy_keeps_text_only_samples(example, plugins, tmp_path):
    bad_jsonl(tmp_path / "bad.jsonl")
    cfg = job([DatasetEntry(path=str(tmp_path / "bad.jsonl"), data_folder=str(tmp_path))])
    cfg.data.oversize_policy = "truncate"
    loader = build(cfg, plugins, example, infinite=False)
    assert sum(batch.num_samples for batch in loader) == 22
    assert loader.data_stats()["data/truncated"] == 2


def test_resume_with_another_worker_count_is_refused(small_example, plugins):
    cfg = job([DatasetEntry(path=small_example["data"])], workers=0)
    loader = build(cfg, plugins, small_example)
    next(iter(loader))
    other = build(job([DatasetEntry(path=small_example["data"])], workers=2), plugins, small_example)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(loader.state_dict())


def test_config_errors_fail_at_build(example, plugins, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(job([DatasetEntry(path=str(tmp_path / "nope.parquet"))]), plugins, example)
    with pytest.raises(UnknownNameError, match="unknown dataset reader 'csv'"):
        build(job([DatasetEntry(path=example["data"], format="csv")]), plugins, example)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no samples"):
        build(job([DatasetEntry(path=str(tmp_path / "empty.jsonl"))]), plugins, example)
    with pytest.raises(ValueError, match="no datasets configured"):
        build(job([]), plugins, example)


def test_mixture_follows_weights_and_repeats_epochs(tmp_path, plugins):
    from bagel_titan_plugins.data.loader import resolve_sources
    from bagel_titan_plugins.data.mixture import MixtureStream

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(10)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(5)))
    (tmp_path / "mix.yaml").write_text("- path: a.jsonl\n  weight: 3\n- path: b.jsonl\n  name: b\n")
    sources = resolve_sources([DatasetEntry(path=str(tmp_path / "mix.yaml"), weight=2.0)], plugins)
    assert [(s.name, s.weight) for s in sources] == [(str(tmp_path / "a.jsonl"), 6.0), ("b", 2.0)]
    stream = MixtureStream(sources, shard_index=0, num_shards=1, seed=7, infinite=True)
    drawn = [next(stream) for _ in range(800)]
    share = sum(d.source == 0 for d in drawn) / len(drawn)
    assert 0.7 < share < 0.8
    b_indexes = [d.sample.index for d in drawn if d.source == 1]
    assert b_indexes == [i % 5 for i in range(len(b_indexes))]  # epochs repeat in order
    assert max(d.epoch for d in drawn if d.source == 1) == (len(b_indexes) - 1) // 5
    again = MixtureStream(sources, shard_index=0, num_shards=1, seed=7, infinite=True)
    again.load_state_dict(
        MixtureStream(sources, shard_index=0, num_shards=1, seed=7, infinite=True).state_dict()
    )
    assert [next(again).key for _ in range(50)] == [d.key for d in drawn[:50]]  # deterministic
    other_seed = MixtureStream(sources, shard_index=0, num_shards=1, seed=8, infinite=True)
    assert [next(other_seed).source for _ in range(50)] != [d.source for d in drawn[:50]]


EXIT_SCRIPT = """
import sys
from bagel_titan.config.job_config import DatasetEntry
from test_data_loader import build, job
from bagel_titan.plugins import PluginManager

example = {"data": sys.argv[1], "tokenizer": sys.argv[2]}
manager = PluginManager(load_entry_points=False, extra_modules=["bagel_titan_plugins.data.plugin"])
loader = build(job([DatasetEntry(path=example["data"])], workers=1), manager, example)
first, second = iter(loader), iter(loader)  # two passes, both left open
next(first), next(second)
print("served", flush=True)
"""


@pytest.mark.dist
def test_a_process_with_open_loader_passes_exits(example, tmp_path):
    """Loader workers ignore SIGTERM (the main process decides how a run stops), and the
    interpreter's exit terminates daemonic children with SIGTERM before it waits for them: every
    pass over a loader, not only the last, must be closed at exit, or the process never ends."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, example["data"], example["tokenizer"]],
        env=subprocess_env(PYTHONPATH=tests),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "served" in proc.stdout, proc.stderr[-2000:]
