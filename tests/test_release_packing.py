"""Release packing (`[data] packing_strategy = "release"`) reproduces the public BAGEL trainer's
`PackedDataset.__iter__` (data/dataset_base.py), and runs in the real loader with exact resume.

The release loop, as read there: at the start of a pack (curr == 0) one sample of every
`is_mandatory` group is packed. Then, each iteration: if curr < prefer_buffer_before and the
overflow buffer is not empty, take buffer[0], else draw from the weighted mixture. A sample longer
than max_num_tokens_per_sample is skipped. If curr + len > max_num_tokens: when the buffer has
room and the sample did not come from it, it joins the buffer; otherwise the pack is yielded
(and that sample is dropped: bagel-titan carries it into the next pack instead). Otherwise the
sample is packed, and the pack is yielded once curr >= expected_num_tokens.
"""

from __future__ import annotations

import pytest

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.job_config import DatasetEntry
from bagel_titan_plugins.data.packing import STRATEGIES, ReleasePackingConfig
from test_data_loader import build, job, plugins, small_example, take  # noqa: F401 (fixtures)

RELEASE = {s.name: s for s in STRATEGIES}["release"]


def drive(packer, stream: list[tuple[str, int]], mandatory: dict[int, list[tuple[str, int]]] | None = None):
    """Feed a packer as the pipeline does: from a mandatory source when it asks, else the stream."""
    mandatory = {i: list(items) for i, items in (mandatory or {}).items()}
    stream = list(stream)
    packs = []
    while stream:
        wanted = packer.wanted_source()
        key, length = mandatory[wanted].pop(0) if wanted is not None else stream.pop(0)
        packs += packer.add(key, length)
    return packs, packer


def config(**overrides):
    return ReleasePackingConfig(
        **{
            "expected_num_tokens": 80,
            "max_num_tokens_per_sample": 60,
            "prefer_buffer_before": 50,
            "max_buffer_size": 2,
            **overrides,
        }
    )


def test_pack_boundaries_are_the_releases():
    # max_num_tokens 100, expected 80, prefer_buffer_before 50, buffer of 2. Worked by hand:
    # a30 b40 -> 70 (>= prefer: draw), c50 would be 120 > 100: buffered; d20 -> 90 >= 80: [a b d].
    # New pack: 0 < 50 and c buffered: c -> 50 (not < 50: draw); e45 -> 95: [c e].
    # f35 -> 35 < 50, buffer empty: draw g60 -> 95: [f g].
    # h10 i55 -> 65; j40 and k45 overflow into the buffer (now full); l50 overflows with a full
    # buffer: [h i] leaves. The release drops l and packs [j k] next; bagel-titan carries l:
    # [l m] (m30 -> 80), then the buffer at 0 < 50: j40 k45 -> 85: [j k].
    stream = [
        ("a", 30),
        ("b", 40),
        ("c", 50),
        ("d", 20),
        ("e", 45),
        ("f", 35),
        ("g", 60),
        ("h", 10),
        ("i", 55),
        ("j", 40),
        ("k", 45),
        ("l", 50),
        ("m", 30),
        ("n", 30),
    ]
    packs, packer = drive(RELEASE.new_packer(100, {"release": config()}), stream)
    release = [["a", "b", "d"], ["c", "e"], ["f", "g"], ["h", "i"]]
    assert packs[:4] == release
    assert packs[4:] == [["l", "m"], ["j", "k"]]
    assert packer.flush() == [["n"]]


def test_mandatory_datasets_start_every_pack():
    # Source 0 is mandatory: each pack opens with its next sample, then the mixture fills it.
    # s0 20 + 30 + 40 = 90 >= 80; s0 25 + 50 + 10 = 85. A mandatory sample never waits in the
    # buffer and is not checked against expected_num_tokens (as in the release).
    packer = RELEASE.new_packer(
        100, {"release": config(prefer_buffer_before=0, max_buffer_size=50), "mandatory": [0]}
    )
    packs, _ = drive(
        packer, [("x1", 30), ("x2", 40), ("x3", 50), ("x4", 10)], {0: [("m1", 20), ("m2", 25), ("m3", 30)]}
    )
    assert packs == [["m1", "x1", "x2"], ["m2", "x3", "x4"]]
    assert packer.wanted_source() == 0  # the next pack asks for the mandatory source first


def test_state_round_trips_mid_buffer():
    stream = [
        (f"s{i}", n) for i, n in enumerate([30, 40, 50, 20, 45, 35, 60, 10, 55, 40, 45, 50, 30, 30, 25, 60])
    ]
    reference, _ = drive(RELEASE.new_packer(100, {"release": config()}), stream)
    head, packer = drive(RELEASE.new_packer(100, {"release": config()}), stream[:11])
    restored = RELEASE.new_packer(100, {"release": config()})
    restored.load_state_dict(packer.state_dict())
    tail, _ = drive(restored, stream[11:])
    assert head + tail == reference


def release_job(datasets, **overrides):
    cfg = job(datasets, strategy="release", length=400)
    cfg.plugin_sections["data.release_packing"] = ReleasePackingConfig(
        **{
            "expected_num_tokens": 300,
            "max_num_tokens_per_sample": 60,
            "prefer_buffer_before": 150,
            "max_buffer_size": 4,
            **overrides,
        }
    )
    return cfg


def test_the_loader_packs_like_the_release_and_resumes_exactly(small_example, plugins):  # noqa: F811
    datasets = [
        DatasetEntry(path=small_example["data"], weight=3.0, name="shapes"),
        DatasetEntry(path=small_example["data"], weight=1.0, name="anchor", is_mandatory=True),
    ]
    cfg = release_job(datasets)
    reference_loader = build(cfg, plugins, small_example)
    reference = take(iter(reference_loader), 12)
    for keys, _, split_lens, *_ in reference:
        assert keys[0][0] == "anchor"  # one mandatory sample opens every pack
        assert sum(split_lens) <= 400
    lengths = [sum(fp[2]) for fp in reference]
    assert sum(n >= 300 for n in lengths) >= len(lengths) // 2  # packs leave around expected_num_tokens
    stats = reference_loader.data_stats()
    assert stats["data/skipped/oversize"] > 0  # samples over max_num_tokens_per_sample: skipped, counted

    first = build(cfg, plugins, small_example)
    it = iter(first)
    head = take(it, 5)
    resumed = build(cfg, plugins, small_example)
    resumed.load_state_dict(first.state_dict())
    assert head + take(iter(resumed), 7) == reference


def test_release_sizes_are_checked_against_packing_length(small_example, plugins):  # noqa: F811
    with pytest.raises(ConfigError, match="max_num_tokens_per_sample = 500 exceeds .*packing_length = 400"):
        build(
            release_job([DatasetEntry(path=small_example["data"])], max_num_tokens_per_sample=500),
            plugins,
            small_example,
        )
    cfg = job([DatasetEntry(path=small_example["data"], is_mandatory=True)])  # best_fit_decreasing
    with pytest.raises(ConfigError, match="is_mandatory"):
        build(cfg, plugins, small_example)
    with pytest.raises(ConfigError, match="max_buffer_size"):
        ReleasePackingConfig(max_buffer_size=-1)
