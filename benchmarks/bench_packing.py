"""Fill rate and cost of every packing strategy on a realistic BAGEL mix.

Mix (issue 4): about 60% understanding samples of 300-3000 tokens, 30% text-to-image of 256-1100,
10% text of 50-1500, packed at `--packing-length` (4096). `first_fit` with a window of one open
bin is next fit (what some trainers call first fit). Reported per strategy and window: fill rate
(real tokens / (packs x capacity), the final flush excluded: steady state), dropped tokens (0:
every strategy packs every item that fits), microseconds per item, and how many items later than
its arrival the average / worst item leaves (latency of the look-ahead).

    python benchmarks/bench_packing.py [--samples 20000] [--packing-length 4096]
"""

from __future__ import annotations

import argparse
import random
import time

import common
from bagel_titan_plugins.data.packing import STRATEGIES


def realistic_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(rng.randint(300, 3000) if u < 0.6 else rng.randint(256, 1100) if u < 0.9 else rng.randint(50, 1500))
    return out


def measure(strategy, capacity: int, window: int, lengths: list[int]) -> dict[str, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--packing-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    common.add_results_option(parser)
    args = parser.parse_args()
    lengths = realistic_lengths(args.samples, args.seed)
    runs = [("none", 1), ("first_fit", 1), ("first_fit", 16), ("first_fit", 256), ("best_fit", 16),
            ("best_fit", 256), ("best_fit_decreasing", 64), ("best_fit_decreasing", 256)]
    by_name = {s.name: s for s in STRATEGIES}
    header = "| strategy | window | fill rate | dropped tokens | us/item | mean delay (items) | max delay (items) | packs |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, window in runs:
        r = measure(by_name[name], args.packing_length, window, lengths)
        label = f"{name} (= next fit)" if name == "first_fit" and window == 1 else name
        lines.append(f"| {label} | {window} | {r['fill']:.2%} | {r['dropped']:.1%} | {r['us_per_item']:.1f} | "
                     f"{r['mean_delay']:.1f} | {r['max_delay']} | {r['packs']} |")
    table = "\n".join(lines)
    print(table)
    common.append_section(args.results, "bench_packing", "CPU, pure Python (one core)", [
        f"mix: {args.samples} samples, 60% 300-3000 / 30% 256-1100 / 10% 50-1500 tokens, "
        f"packing_length {args.packing_length}, seed {args.seed}",
    ], table)


if __name__ == "__main__":
    main()
