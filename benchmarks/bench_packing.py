"""Fill rate and cost of every packing strategy on a realistic BAGEL mix.

Mix (issue 4): about 60% understanding samples of 300-3000 tokens, 30% text-to-image of 256-1100,
10% text of 50-1500, packed at `--packing-length` (4096). `first_fit` with a window of one open
bin is next fit (what some trainers call first fit). Reported per strategy and window: fill rate
(real tokens / (packs x capacity), the final flush excluded: steady state), dropped tokens (0:
every strategy packs every item that fits), microseconds per item, and how many items later than
its arrival the average / worst item leaves (latency of the look-ahead).

    python benchmarks/bench_packing.py [--samples 20000] [--packing-length 4096]

`--modes` compares the two packing modes instead: fixed `packing_length` bins
(best_fit_decreasing) against the release's packing (`packing_strategy = "release"`) with the
release's fine-tune and pre-training sizes, with and without mandatory groups (the
understanding and text-to-image groups, as in the release's example.yaml). Reported: fill (real
tokens over packs x hard cap), tokens per pack (= tokens per optimizer step and rank at one pack
per step) mean / std / min, and the samples the release would have dropped (carried here).

    python benchmarks/bench_packing.py --modes [--samples 20000]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any, Mapping

import common
from bagel_titan_plugins.data.packing import STRATEGIES, PackingStrategyEntry, ReleasePackingConfig


def realistic_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(
            rng.randint(300, 3000)
            if u < 0.6
            else rng.randint(256, 1100)
            if u < 0.9
            else rng.randint(50, 1500)
        )
    return out


def measure(
    strategy: PackingStrategyEntry, capacity: int, window: int, lengths: list[int]
) -> dict[str, float]:
    packer = strategy.new_packer(capacity, {"window": window})
    packs = []
    leave_at: dict[int, int] = {}
    start = time.perf_counter()
    for key, length in enumerate(lengths):
        for pack in packer.add(key, length):
            packs.append(pack)
            for k in pack:
                leave_at[k] = key
    seconds = time.perf_counter() - start
    packed = sum(lengths[k] for p in packs for k in p)
    delays = [leave_at[k] - k for k in leave_at]
    return {
        "fill": packed / (len(packs) * capacity),
        "dropped": 0.0,
        "us_per_item": seconds / len(lengths) * 1e6,
        "mean_delay": sum(delays) / len(delays),
        "max_delay": max(delays),
        "packs": len(packs),
    }


GROUPS = (("und", 0.6, 300, 3000), ("t2i", 0.3, 256, 1100), ("text", 0.1, 50, 1500))
"""The realistic mix as three dataset groups: (name, weight, min tokens, max tokens)."""


def run_mode(
    name: str, capacity: int, options: Mapping[str, Any], samples: int, seed: int
) -> dict[str, float]:
    """Feed `samples` items of the grouped mix (mandatory groups drawn when the packer asks)."""
    rng = random.Random(seed)
    group_rngs = [random.Random(f"{seed}:{g[0]}") for g in GROUPS]
    packer = {s.name: s for s in STRATEGIES}[name].new_packer(capacity, options)
    lengths: dict[int, int] = {}
    packs = []
    start = time.perf_counter()
    for key in range(samples):
        wanted = packer.wanted_source() if hasattr(packer, "wanted_source") else None
        if wanted is None:
            u, wanted = rng.random(), 0
            while u >= sum(g[1] for g in GROUPS[: wanted + 1]):
                wanted += 1
        _, _, low, high = GROUPS[wanted]
        lengths[key] = group_rngs[wanted].randint(low, high)
        packs += packer.add(key, lengths[key])
    seconds = time.perf_counter() - start
    sizes = [sum(lengths[k] for k in p) for p in packs]
    mean = sum(sizes) / len(sizes)
    carried = getattr(packer, "carried_count", 0)
    return {
        "fill": sum(sizes) / (len(sizes) * capacity),
        "mean": mean,
        "std": (sum((x - mean) ** 2 for x in sizes) / len(sizes)) ** 0.5,
        "min": min(sizes),
        "packs": len(packs),
        "carried": carried,
        "us_per_item": seconds / samples * 1e6,
    }


def modes(args: argparse.Namespace) -> None:
    finetune = ReleasePackingConfig(
        expected_num_tokens=10240,
        max_num_tokens_per_sample=10240,
        prefer_buffer_before=16384,
        max_buffer_size=50,
    )
    pretrain = ReleasePackingConfig(
        expected_num_tokens=32768,
        max_num_tokens_per_sample=16384,
        prefer_buffer_before=16384,
        max_buffer_size=50,
    )
    runs: list[tuple[str, str, int, dict[str, Any]]] = [
        ("best_fit_decreasing, window 256", "best_fit_decreasing", 11520, {"window": 256}),
        ("best_fit_decreasing, window 256", "best_fit_decreasing", 16384, {"window": 256}),
        ("best_fit_decreasing, window 256", "best_fit_decreasing", 36864, {"window": 256}),
        ("release, fine-tune sizes (expected 10240)", "release", 11520, {"release": finetune}),
        (
            "release, fine-tune sizes, und + t2i mandatory",
            "release",
            11520,
            {"release": finetune, "mandatory": [0, 1]},
        ),
        ("release, pre-training sizes (expected 32768)", "release", 36864, {"release": pretrain}),
        (
            "release, pre-training sizes, und + t2i mandatory",
            "release",
            36864,
            {"release": pretrain, "mandatory": [0, 1]},
        ),
    ]
    lines = [
        "| mode | hard cap (packing_length) | fill | tokens/pack mean | std | min | packs | "
        "samples the release drops (carried) | us/item |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, name, capacity, options in runs:
        r = run_mode(name, capacity, options, args.samples, args.seed)
        lines.append(
            f"| {label} | {capacity} | {r['fill']:.2%} | {r['mean']:.0f} | {r['std']:.0f} | {r['min']} | "
            f"{r['packs']} | {r['carried']} | {r['us_per_item']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    common.append_section(
        args.results,
        "bench_packing --modes",
        "CPU, pure Python (one core)",
        [
            f"mix: {args.samples} samples in three groups: und 60% (300-3000 tokens), t2i 30% (256-1100), "
            f"text 10% (50-1500), seed {args.seed}; final flush excluded",
            "tokens/pack is tokens per optimizer step and rank with one pack per step; fill = tokens / "
            "(packs x hard cap)",
        ],
        table,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--packing-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", action="store_true", help="compare fixed bins with the release's packing")
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.modes:
        modes(args)
        return
    lengths = realistic_lengths(args.samples, args.seed)
    runs = [
        ("none", 1),
        ("first_fit", 1),
        ("first_fit", 16),
        ("first_fit", 256),
        ("best_fit", 16),
        ("best_fit", 256),
        ("best_fit_decreasing", 64),
        ("best_fit_decreasing", 256),
    ]
    by_name = {s.name: s for s in STRATEGIES}
    header = "| strategy | window | fill rate | dropped tokens | us/item | mean delay (items) | max delay (items) | packs |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, window in runs:
        r = measure(by_name[name], args.packing_length, window, lengths)
        label = f"{name} (= next fit)" if name == "first_fit" and window == 1 else name
        lines.append(
            f"| {label} | {window} | {r['fill']:.2%} | {r['dropped']:.1%} | {r['us_per_item']:.1f} | "
            f"{r['mean_delay']:.1f} | {r['max_delay']} | {r['packs']} |"
        )
    table = "\n".join(lines)
    print(table)
    common.append_section(
        args.results,
        "bench_packing",
        "CPU, pure Python (one core)",
        [
            f"mix: {args.samples} samples, 60% 300-3000 / 30% 256-1100 / 10% 50-1500 tokens, "
            f"packing_length {args.packing_length}, seed {args.seed}",
        ],
        table,
    )


if __name__ == "__main__":
    main()
