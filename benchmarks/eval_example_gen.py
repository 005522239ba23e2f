"""Generated-image accuracy of models trained on the example data, on fresh prompts.

Draws `--prompts` new scenes (seeded), generates one image per caption with the exported model
(the validation's sampler, `bagel-titan-generate`'s loader) and reads each image with a simple,
non-learned checker (`bagel_titan_plugins.data.example_check`: background = the border pixels'
colour, shape colour = the largest blob's colour, shape = the blob's fill ratio and corner fill).
One row per exported folder (and per `--cfg` value); the chance column is a uniform guess.

    python benchmarks/eval_example_gen.py outputs/debug/exports/final [more exports ...] \\
        [--prompts 60] [--cfg 4.0 [2.0 ...]] [--steps 20] [--grid docs/first_run/samples.png] \\
        [--config RUN/config.toml] [-- --section.key value ...]

Sampler settings default to the `[bagel.sampling]` table of the run's config (the export's
`<run>/config.toml`, else `--config`); options after `--` override config keys.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
from bagel_titan_plugins.bagel.generate import load_sampler, run_config_of
from bagel_titan_plugins.bagel.sampling import BagelSampler
from bagel_titan_plugins.data.example_check import read_image
from bagel_titan_plugins.data.example_data import COLOURS, SHAPES, Scene, random_scene

ATTRIBUTES = {"background": 1 / len(COLOURS), "shape colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}


def grid(images: list[np.ndarray], captions: list[str], columns: int, scale: int) -> Image.Image:
    """Images upscaled `scale` times (nearest), `columns` a row, each with its caption below."""
    h, w = images[0].shape[:2]
    cell_w, cell_h = w * scale, h * scale + 24
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(Image.fromarray(image).resize((cell_w, h * scale), Image.Resampling.NEAREST), (x, y))
        words = caption.removeprefix("a ").replace(" background", "").split(" on a ")
        for j, line in enumerate(words):
            draw.text((x + 3, y + h * scale + 1 + 11 * j), line if j == 0 else f"on {line}", fill="black")
    return sheet


@torch.no_grad()
def evaluate(
    sampler: BagelSampler, scenes: Sequence[Scene], seed: int
) -> tuple[dict[str, float], list[np.ndarray]]:
    right = dict.fromkeys(ATTRIBUTES, 0)
    images = []
    for i, scene in enumerate(scenes):
        image = sampler.generate_image(scene.caption(), seed + i)
        reading = read_image(image)
        right["background"] += reading.background == scene.background
        right["shape colour"] += reading.colour == scene.colour
        right["shape"] += reading.shape == scene.shape
        images.append(image)
    return {k: v / len(scenes) for k, v in right.items()}, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="exported model folders (a run's exports/final)")
    parser.add_argument(
        "--config",
        default="train_configs/debug_model.toml",
        help="config when an export has no run config.toml next to it",
    )
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--seed", type=int, default=321, help="seed of the fresh scenes and of the noise")
    parser.add_argument(
        "--cfg", type=float, nargs="+", default=[None], help="guidance scales (default: the config's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's)")
    parser.add_argument(
        "--grid", help="write the first --grid-count images of the first row as a captioned PNG"
    )
    parser.add_argument("--grid-count", type=int, default=12)
    common.add_results_option(parser)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split]), argv[split + 1 :]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = random.Random(args.seed)
    scenes = [random_scene(rng) for _ in range(args.prompts)]
    rows, settings = [], []
    for export in args.exports:
        config = run_config_of(export) or args.config
        for cfg in args.cfg:
            sampler = load_sampler(export, config, overrides, "cpu", cfg_scale=cfg, num_steps=args.steps)
            settings.append(
                f"{export}: config {config}, cfg {sampler.config.cfg_scale}, "
                f"{sampler.config.num_steps} steps, shift {sampler.config.timestep_shift}, "
                f"{sampler.config.image_size[0]}x{sampler.config.image_size[1]} px"
            )
            scores, images = evaluate(sampler, scenes, args.seed)
            rows.append([export, f"{sampler.config.cfg_scale:g}", *(f"{scores[k]:.0%}" for k in ATTRIBUTES)])
            if args.grid and len(rows) == 1:
                count = min(args.grid_count, len(images))
                grid(images[:count], [s.caption() for s in scenes[:count]], columns=6, scale=3).save(
                    args.grid
                )
    rows.append(["(chance)", "", *(f"{chance:.0%}" for chance in ATTRIBUTES.values())])
    table = common.markdown_table(["export", "cfg", *ATTRIBUTES], rows)
    print(table)
    common.append_section(
        args.results,
        "eval_example_gen",
        common.device_description(),
        [
            f"{args.prompts} fresh prompts (seed {args.seed}), one image each, read by the non-learned checker "
            f"(bagel_titan_plugins.data.example_check)"
            + (f"; overrides {' '.join(overrides)}" if overrides else ""),
            *settings,
        ],
        table,
    )


if __name__ == "__main__":
    main()
