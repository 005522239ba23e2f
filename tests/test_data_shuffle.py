"""Shuffled reading: every epoch is a new permutation of each shard, shards still partition the
dataset each epoch, any position is found again exactly (resume, packing-buffer re-reads), and
per-row random choices of the release readers change with the epoch."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.protocols import ReadPass
from bagel_titan_plugins.data.mixture import MixtureStream, Source
from bagel_titan_plugins.data.readers.bagel_release import BagelT2IReader
from bagel_titan_plugins.data.readers.parquet import ParquetReader

ROWS = 100


@pytest.fixture(scope="module")
def sorted_parquet(tmp_path_factory):
    """100 rows in index order over two files, row groups of 7 (15 units): the kind of
    sorted dataset that unshuffled reading would feed in order."""
    folder = tmp_path_factory.mktemp("sorted")
    for part, rows in enumerate((range(0, 60), range(60, ROWS))):
        table = pa.table({"text": [f"row {i}" for i in rows]})
        pq.write_table(table, folder / f"part{part}.parquet", row_group_size=7)
    return str(folder)


def stream(path, *, shard=0, shards=1, seed=0, shuffle=True, window=8):
    source = Source("sorted", path, ParquetReader(), 1.0)
    return MixtureStream(
        [source],
        shard_index=shard,
        num_shards=shards,
        seed=seed,
        infinite=True,
        shuffle=shuffle,
        shuffle_window=window,
    )


def epochs_of(mixture, count):
    """{epoch: [row index, ...]} for the first `count` epochs of a one-source stream."""
    out: dict[int, list[int]] = {}
    while True:
        drawn = next(mixture)
        if drawn.epoch == count:
            return out
        out.setdefault(drawn.epoch, []).append(drawn.sample.index)


def test_each_epoch_is_a_new_permutation_and_shards_partition_it(sorted_parquet):
    per_shard = [epochs_of(stream(sorted_parquet, shard=s, shards=3), 3) for s in range(3)]
    for epoch in range(3):
        parts = [per_shard[s][epoch] for s in range(3)]
        together = [i for part in parts for i in part]
        assert sorted(together) == list(range(ROWS)), "every row once per epoch across the shards"
    orders = [per_shard[0][e] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert all(order != sorted(order) for order in orders)
    # Unit order is permuted, not only neighbours swapped: a sorted dataset's first quarter
    # reaches into its second half (the window alone cannot carry a row that far). The
    # permutation is keyed by the dataset's path (a new tmp folder each run), and for about 3% of
    # keys the first units all come from the first half, so the claim is made over five seeds.
    firsts = [epochs_of(stream(sorted_parquet, seed=seed), 1)[0][: ROWS // 4] for seed in range(5)]
    assert any(max(first) >= ROWS // 2 for first in firsts)


def test_order_is_a_function_of_the_seed(sorted_parquet):
    assert epochs_of(stream(sorted_parquet, seed=3), 2) == epochs_of(stream(sorted_parquet, seed=3), 2)
    assert epochs_of(stream(sorted_parquet, seed=3), 1) != epochs_of(stream(sorted_parquet, seed=4), 1)


def test_unshuffled_reading_keeps_file_order(sorted_parquet):
    assert epochs_of(stream(sorted_parquet, shuffle=False), 2) == {0: list(range(ROWS)), 1: list(range(ROWS))}


@pytest.mark.parametrize("window", [1, 8, 1024])
def test_resume_and_refetch_find_every_position_again(sorted_parquet, window):
    reference = stream(sorted_parquet, shards=2, window=window)
    drawn = [next(reference) for _ in range(130)]  # into the second epoch of this shard
    for cut in (0, 1, 7, 8, 9, 49, 50, 51, 99):
        first = stream(sorted_parquet, shards=2, window=window)
        for _ in range(cut):
            next(first)
        resumed = stream(sorted_parquet, shards=2, window=window)
        resumed.load_state_dict(first.state_dict())
        assert [(d.key, d.sample.index) for d in (next(resumed) for _ in range(130 - cut))] == [
            (d.key, d.sample.index) for d in drawn[cut:]
        ]
    refetched = stream(sorted_parquet, shards=2, window=window).fetch([d.key for d in drawn[::3]])
    assert {k: s.index for k, s in refetched.items()} == {d.key: d.sample.index for d in drawn[::3]}


def test_resuming_with_another_order_is_refused(sorted_parquet):
    saved = stream(sorted_parquet, shuffle=False)
    next(saved)
    with pytest.raises(ValueError, match=r"resume with \[data\] shuffle = false"):
        stream(sorted_parquet).load_state_dict(saved.state_dict())
    saved = stream(sorted_parquet, window=8)
    with pytest.raises(ValueError, match="shuffle_window = 8"):
        stream(sorted_parquet, window=16).load_state_dict(saved.state_dict())


def test_reader_permutes_units_identically_on_every_shard(sorted_parquet):
    reader = ParquetReader()
    for epoch in range(2):
        read_pass = ReadPass(epoch=epoch, seed=1, shuffle=True)
        shards = [
            [
                s.index
                for s in reader.iter_samples(
                    sorted_parquet, shard_index=k, num_shards=4, start=0, read_pass=read_pass
                )
            ]
            for k in range(4)
        ]
        assert sorted(i for shard in shards for i in shard) == list(range(ROWS))
        # rows of one unit stay together and in order: units are permuted, rows are not
        assert all(
            b - a == 1
            for shard in shards
            for a, b in zip(shard, shard[1:])
            if a // 7 == b // 7 and (a < 60) == (b < 60)
        )
        skipped = list(
            reader.iter_samples(sorted_parquet, shard_index=1, num_shards=4, start=5, read_pass=read_pass)
        )
        assert [s.index for s in skipped] == shards[1][5:]


def test_release_caption_choice_changes_with_the_epoch(tmp_path):
    captions = {f"c{i}": f"caption number {i}" for i in range(6)}
    pq.write_table(
        pa.table({"image": [b"not decoded here"], "captions": [json.dumps(captions)]}),
        tmp_path / "t2i.parquet",
    )
    reader = BagelT2IReader()

    def caption(epoch):
        sample = next(
            reader.iter_samples(
                str(tmp_path),
                shard_index=0,
                num_shards=1,
                start=0,
                read_pass=ReadPass(epoch=epoch, seed=0, shuffle=True),
            )
        )
        return sample.data["caption"]

    assert caption(2) == caption(2)
    assert len({caption(epoch) for epoch in range(12)}) > 1


def test_shuffle_window_must_be_positive():
    with pytest.raises(ConfigError, match="data.shuffle_window"):
        load_job_config(["--data.shuffle_window", "0"])
