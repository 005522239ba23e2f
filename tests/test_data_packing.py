"""Packing strategies: every item packed exactly once, capacity respected, first fit is a real
first fit, state round trips, and the look-ahead strategy fills >= 99% of a realistic mix."""

from __future__ import annotations


import pytest

from bagel_titan_plugins.data.packing import STRATEGIES
from bench_packing import realistic_lengths  # the mix the benchmark reports (benchmarks/ is on the path)

BY_NAME = {s.name: s for s in STRATEGIES}


def run(packer, lengths):
    packs = []
    for key, length in enumerate(lengths):
        packs.extend(packer.add(key, length))
    packs.extend(packer.flush())
    return packs


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_item_once_and_within_capacity(name):
    lengths = realistic_lengths(600, seed=1)
    packs = run(BY_NAME[name].new_packer(4096, {"window": 32}), lengths)
    keys = [k for p in packs for k in p]
    assert sorted(keys) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in p) <= 4096 for p in packs)
    assert all(p for p in packs)


def test_first_fit_is_a_real_first_fit():
    # Next fit would close the 900-bin when 400 arrives; first fit keeps it open for the 100.
    packer = BY_NAME["first_fit"].new_packer(1000, {"window": 4})
    assert packer.add("a", 900) == []
    assert packer.add("b", 400) == []
    assert packer.add("c", 100) == [["a", "c"]]  # goes to the FIRST bin with room, which is now full
    assert packer.add("d", 500) == []
    assert packer.flush() == [["b", "d"]]


def test_best_fit_picks_the_tightest_bin():
    packer = BY_NAME["best_fit"].new_packer(1000, {"window": 4})
    packer.add("a", 500)
    packer.add("b", 800)
    assert packer.add("c", 200) == [["b", "c"]]  # first fit would have put it with "a"


def test_open_bins_bounded_by_window():
    packer = BY_NAME["first_fit"].new_packer(100, {"window": 2})
    assert packer.add(0, 60) == [] and packer.add(1, 60) == []
    assert packer.add(2, 60) == [[0]]  # a third bin is needed: the oldest leaves


def test_oversize_items_are_refused():
    with pytest.raises(ValueError, match="outside"):
        BY_NAME["first_fit"].new_packer(100, {}).add(0, 101)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_state_dict_resumes_exactly(name):
    lengths = realistic_lengths(400, seed=2)
    reference = run(BY_NAME[name].new_packer(4096, {"window": 16}), lengths)
    packer = BY_NAME[name].new_packer(4096, {"window": 16})
    packs = []
    for key, length in enumerate(lengths[:173]):
        packs.extend(packer.add(key, length))
    restored = BY_NAME[name].new_packer(4096, {"window": 16})
    restored.load_state_dict(packer.state_dict())
    for key, length in enumerate(lengths[173:], start=173):
        packs.extend(restored.add(key, length))
    packs.extend(restored.flush())
    assert packs == reference


def test_look_ahead_fill_rate_on_realistic_mix():
    lengths = realistic_lengths(5000, seed=3)
    packer = BY_NAME["best_fit_decreasing"].new_packer(4096, {"window": 256})
    packs = []
    for key, length in enumerate(lengths):
        packs.extend(packer.add(key, length))  # steady state: the final flush is not counted
    fill = sum(lengths[k] for p in packs for k in p) / (len(packs) * 4096)
    assert fill >= 0.99, fill
