"""BAGEL model step cost: forward+backward time of one packed batch, tokens/s and achieved
FLOP/s (from the spec's FLOP count), per attention backend; plus the 7b-mot FLOPs per token of a
release-sized pack next to the 6N rule of thumb.

    python benchmarks/bench_bagel_model.py [--flavor debug] [--tokens 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from bagel_titan.plugins import get_plugin_manager
from bagel_titan_plugins.bagel.batch import BagelPackedBatch
from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for
from bagel_titan_plugins.bagel.flops import llm_layer_linear_params, training_flops
from bagel_titan_plugins.bagel.modeling import Bagel
from bagel_titan_plugins.bagel.spec import build_bagel
from synthetic_bagel import Segment, Text, VaeImage, VitImage, synthetic_batch

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def mixed_pack(target_tokens: int, vit_side: int, vae_side: int) -> list[list[Segment]]:
    """Samples of the three kinds (text, understanding, generation) until ~target_tokens."""
    kinds: list[list[Segment]] = [
        [Text(40, loss=False), Text(120)],
        [VitImage(vit_side, vit_side), Text(30, loss=False), Text(60)],
        [Text(30, loss=False), VaeImage(vae_side, vae_side)],
    ]
    samples: list[list[Segment]] = []
    total, i = 0, 0
    while True:
        sample = kinds[i % 3]
        size = sum(s.num_ids + 2 if isinstance(s, Text) else s.h * s.w + 2 for s in sample)
        if total + size > target_tokens:
            return samples
        samples.append(sample)
        total += size
        i += 1


def time_step(model: Bagel, batch: BagelPackedBatch, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        r = model(batch, torch.Generator().manual_seed(0))
        loss = (
            torch.nn.functional.cross_entropy(r.ce_logits, batch.packed_label_ids)
            + ((r.pred_velocity - r.target_velocity) ** 2).mean()
        )
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first run warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="eager,sdpa")
    parser.add_argument("--results", default=RESULTS, help="markdown file the run's section is appended to")
    args = parser.parse_args()
    torch.manual_seed(0)
    arch, options = architecture_for(args.flavor), BagelConfig()
    batch = synthetic_batch(arch, options, mixed_pack(args.tokens, 12, 8))
    plugins = get_plugin_manager()
    rows = []
    for name in args.backends.split(","):
        model = build_bagel(arch, options, backend=plugins.attention_backends.get(name))
        model.init_weights()
        seconds = time_step(model, batch, args.repeats)
        flops = training_flops(batch, arch, options)
        rows.append(
            (
                name,
                batch.sequence_length,
                len(batch.sample_lens),
                seconds * 1e3,
                batch.sequence_length / seconds,
                flops / seconds / 1e9,
            )
        )

    big = architecture_for("7b-mot")
    release_pack = synthetic_batch(big, options, mixed_pack(16384, 32, 32))
    n_layer_weights = big.llm.num_layers * llm_layer_linear_params(big)
    per_token = training_flops(release_pack, big, options) / release_pack.sequence_length

    lines = [
        f"## bench_bagel_model ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; shared machine, so numbers are a lower bound",
        f"- command: `{' '.join(['python benchmarks/bench_bagel_model.py'] + sys.argv[1:])}`",
        f"- pack: flavor {args.flavor}, fp32, mixed text / understanding (12x12 ViT patches) / "
        f"generation (8x8 latent patches) samples; forward + backward, median of {args.repeats}",
        "",
        "| backend | tokens | samples | ms/step | tokens/s | achieved GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:,.0f} | {r[5]:.2f} |" for r in rows]
    lines += [
        "",
        f"7b-mot, {release_pack.sequence_length}-token mixed pack ({len(release_pack.sample_lens)} samples): "
        f"{per_token / 1e9:.1f} GFLOPs/token for training; 6 x {n_layer_weights / 1e9:.2f}B decoder-layer weights "
        f"per token = {6 * n_layer_weights / 1e9:.1f} (the rest: attention, lm_head on CE tokens, ViT, connector).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
