"""Data path throughput per loader worker: decode, transforms, tokenise, pack, collate.

Runs the real "packed" pipeline (parquet reader -> BAGEL processor -> best_fit_decreasing ->
BAGEL collator) in one process with one intra-op thread, i.e. what one loader worker does, on
(a) the bundled example data (64x48 px shapes) at debug-model image sizes and (b) 512-1024 px
JPEG images at the release's sizes (ViT 378-980 px / patch 14 / 70 patches per side, VAE
512-1024 px / stride 16 / 64 latent patches per side), and compares tokens/s with what one GPU
consumes in a BAGEL-7B step.

GPU consumption assumption: BAGEL-7B-MoT routes each token through one 7B expert set, so a
training token costs about 6 x 7e9 = 4.2e10 FLOPs (attention and the ViT add ~10-20% at 16k
packs, ignored: this overstates the need slightly); an H100 at 989 dense bf16 TFLOP/s and 40%
MFU then consumes about 9,400 tokens/s.

    python benchmarks/bench_dataloader.py [--samples 1024] [--large-samples 48]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import common
from bagel_titan.config.job_config import DatasetEntry, JobConfig
from bagel_titan.plugins import PluginManager
from bagel_titan.protocols import ModelSpec
from bagel_titan_plugins.bagel.collator import BagelCollator
from bagel_titan_plugins.bagel.config import BagelConfig
from bagel_titan_plugins.bagel.processor import BagelProcessor
from bagel_titan_plugins.bagel.processor_config import ProcessorConfig
from bagel_titan_plugins.data.example_data import random_scene, render, write_example_data

GPU_TOKENS_PER_S = 989e12 * 0.40 / (6 * 7e9)


@dataclass
class Setting:
    name: str
    section: BagelConfig
    vit_patch_size: int
    vae_downsample: int
    processor: ProcessorConfig
    packing_length: int


class Spec:
    """The processor/collator half of a model spec, for one setting."""

    def __init__(self, setting: Setting, tokenizer: str):
        self.setting, self.tokenizer = setting, tokenizer

    def build_processor(self, job_config: JobConfig) -> BagelProcessor:
        s = self.setting
        return BagelProcessor(
            job_config,
            s.section,
            self.tokenizer,
            vit_patch_size=s.vit_patch_size,
            vae_downsample=s.vae_downsample,
        )

    def build_collator(self, job_config: JobConfig) -> BagelCollator:
        s = self.setting
        return BagelCollator(
            job_config,
            s.section,
            vit_patch_size=s.vit_patch_size,
            vae_downsample=s.vae_downsample,
            tokenizer_path=self.tokenizer,
        )


def write_large_images(path: str, n: int, seed: int) -> None:
    """60% understanding, 30% text-to-image, 10% text; images 512-1024 px per side, noisy JPEG
    (about the entropy and decode cost of a photo)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        u = rng.random()
        if u < 0.1:
            rows.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "text", "text": "what colour is red ?", "image": None}],
                        },
                        {
                            "role": "assistant",
                            "content": [
                                {"type": "text", "text": "red . " * rng.randint(20, 300), "image": None}
                            ],
                        },
                    ]
                }
            )
            continue
        scene = random_scene(rng)
        w, h = rng.randint(512, 1024), rng.randint(512, 1024)
        shapes = np.asarray(Image.open(io.BytesIO(render(scene, w, h))).convert("RGB"), dtype=np.int16)
        noise = np_rng.integers(-40, 41, size=shapes.shape, dtype=np.int16)  # photo-like entropy
        out = io.BytesIO()
        Image.fromarray(np.clip(shapes + noise, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
        image = {"type": "image", "text": None, "image": {"bytes": out.getvalue(), "path": f"{i}.jpg"}}
        text = {"type": "text", "text": scene.caption(), "image": None}
        if u < 0.7:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": [image, {**text, "text": "describe the image ."}]},
                        {"role": "assistant", "content": [text]},
                    ]
                }
            )
        else:
            rows.append(
                {"messages": [{"role": "user", "content": [text]}, {"role": "assistant", "content": [image]}]}
            )
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)


def run(
    setting: Setting, data: str, tokenizer: str, plugins: PluginManager, shuffle: bool = True
) -> dict[str, float]:
    cfg = JobConfig()
    cfg.data.datasets = [DatasetEntry(path=data)]
    cfg.data.shuffle = shuffle
    cfg.data.num_workers = 0
    cfg.data.packing_strategy = "best_fit_decreasing"
    cfg.data.packing_window = 64
    cfg.data.packing_length = setting.packing_length
    cfg.plugin_sections["bagel.processor"] = setting.processor
    # The packed loader reads only the processor/collator half of the spec (`Spec` above).
    spec = cast("ModelSpec[Any, Any]", Spec(setting, tokenizer))
    loader = plugins.dataloaders.get("packed").build(
        cfg, plugins, spec, dp_rank=0, dp_world_size=1, infinite=False
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - start
    stats = loader.data_stats()
    return {
        "samples": stats["data/samples"],
        "tokens": stats["data/tokens"],
        "seconds": seconds,
        "fill": stats.get("data/fill_rate", 0.0),
        "skipped": sum(v for k, v in stats.items() if k.startswith("data/skipped/")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--large-samples", type=int, default=96)
    common.add_results_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plugins = PluginManager(load_entry_points=False, extra_modules=["bagel_titan_plugins.data.plugin"])
    with tempfile.TemporaryDirectory() as tmp:
        example = write_example_data(os.path.join(tmp, "example"), num_samples=args.samples)
        large = os.path.join(tmp, "large.parquet")
        write_large_images(large, args.large_samples, seed=1)
        debug = Setting(
            "example data, debug sizes",
            BagelConfig(latent_patch_size=2, max_latent_size=16, vit_max_num_patch_per_side=16),
            4,
            2,
            ProcessorConfig(vit_min_size=32, vit_max_size=64, vae_min_size=32, vae_max_size=64),
            1024,
        )
        release = Setting(
            "512-1024 px, release sizes",
            BagelConfig(latent_patch_size=2, max_latent_size=64, vit_max_num_patch_per_side=70),
            14,
            8,
            ProcessorConfig(),
            32768,
        )
        run(debug, example["data"], example["tokenizer"], plugins)  # warm-up: first-use costs off the table
        rows = [
            (debug, False, run(debug, example["data"], example["tokenizer"], plugins, shuffle=False)),
            (debug, True, run(debug, example["data"], example["tokenizer"], plugins)),
            (release, False, run(release, large, example["tokenizer"], plugins, shuffle=False)),
            (release, True, run(release, large, example["tokenizer"], plugins)),
        ]
    lines = [
        "| data | shuffle | packing_length | samples | samples/s/worker | tokens/s/worker | fill | skipped | workers for one 7B GPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, shuffle, r in rows:
        tps = r["tokens"] / r["seconds"]
        lines.append(
            f"| {setting.name} | {'on' if shuffle else 'off'} | {setting.packing_length} | {int(r['samples'])} | "
            f"{r['samples'] / r['seconds']:.1f} | {tps:,.0f} | {r['fill']:.1%} | {int(r['skipped'])} | "
            f"{GPU_TOKENS_PER_S / tps:.2f} |"
        )
    ratios = [
        rows[i + 1][2]["samples"]
        / rows[i + 1][2]["seconds"]
        / (rows[i][2]["samples"] / rows[i][2]["seconds"])
        for i in (0, 2)
    ]
    table = "\n".join(lines) + (
        f"\n\nshuffled / file-order samples/s: {ratios[0]:.2f} (example data), "
        f"{ratios[1]:.2f} (release sizes)"
    )
    print(table)
    print(f"one GPU in a 7B step consumes about {GPU_TOKENS_PER_S:,.0f} tokens/s (see the docstring)")
    common.append_section(
        args.results,
        "bench_dataloader",
        common.device_description(),
        [
            "one process, torch 1 thread (= one loader worker); shared machine, so numbers are a lower bound",
            f"7B consumption assumption: 6 x 7e9 FLOPs/token, H100 989 TFLOP/s bf16 at 40% MFU = {GPU_TOKENS_PER_S:,.0f} tokens/s per GPU",
            "tokens = text + ViT + VAE tokens of the packs; fill includes the end-of-pass flush of a short one-pass run",
            "shuffle on = [data] shuffle (row groups permuted per epoch, then windows of 1024 samples), off = file order",
        ],
        table,
    )


if __name__ == "__main__":
    main()
