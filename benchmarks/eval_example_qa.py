"""Answer accuracy of models trained on the example data, on fresh scenes it never saw.

The three fixed questions that validation asks are too few to tell learning from luck. This
renders `--scenes` new coloured-shape scenes (seeded, at the example data's size), asks each of the three question kinds the
example data trains ("what colour is the shape ?", "what shape is in the image ?", "what colour is
the background ?") with greedy decoding, and counts exact answers. One row per exported folder
(`exports/final` of a run); the chance column is the accuracy of guessing uniformly.

    python benchmarks/eval_example_qa.py outputs/debug/exports/final [more exports ...] \\
        [--config train_configs/debug_model.toml] [--scenes 60] [-- --bagel.processor.vit_max_size 224]

The processor settings are the run's (its config.toml next to exports/, else `--config`); options
after `--` override config keys.
"""

from __future__ import annotations

import argparse
import io
import random
import sys

import torch
from PIL import Image

import common
from bagel_titan_plugins.bagel.generate import load_sampler, run_config_of
from bagel_titan_plugins.bagel.sampling import BagelSampler
from bagel_titan_plugins.data.example_data import (
    COLOURS,
    DEFAULT_IMAGE_SIZE,
    SHAPES,
    Scene,
    random_scene,
    render,
)

QUESTIONS = {
    "shape colour": ("what colour is the shape ?", lambda s: f"the shape is {s.colour} .", 1 / len(COLOURS)),
    "shape": ("what shape is in the image ?", lambda s: f"it is a {s.shape} .", 1 / len(SHAPES)),
    "background": (
        "what colour is the background ?",
        lambda s: f"the background is {s.background} .",
        1 / len(COLOURS),
    ),
}


def sampler_for(export: str, config_file: str, overrides: list[str]) -> BagelSampler:
    """A greedy answerer over the exported model, with the processor the run trained with (the
    run's config.toml next to exports/, else `config_file`)."""
    return load_sampler(export, run_config_of(export) or config_file, overrides, "cpu", max_new_tokens=16)


def write_scenes(count: int, seed: int) -> list[tuple[Image.Image, Scene]]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return [
        (Image.open(io.BytesIO(render(scene, *DEFAULT_IMAGE_SIZE))).convert("RGB"), scene) for scene in scenes
    ]


@torch.no_grad()
def accuracy(sampler: BagelSampler, scenes: list[tuple[Image.Image, Scene]]) -> dict[str, float]:
    right = dict.fromkeys(QUESTIONS, 0)
    for image, scene in scenes:
        for kind, (question, expected, _) in QUESTIONS.items():
            right[kind] += sampler.answer_image(image, question) == expected(scene)
    return {kind: count / len(scenes) for kind, count in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="exported model folders (a run's exports/final)")
    parser.add_argument(
        "--config", default="train_configs/debug_model.toml", help="the config the runs trained with"
    )
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=123, help="seed of the fresh scenes")
    common.add_results_option(parser)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split]), argv[split + 1 :]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    scenes = write_scenes(args.scenes, args.seed)
    for export in args.exports:
        scores = accuracy(sampler_for(export, args.config, overrides), scenes)
        rows.append([export, *(f"{scores[k]:.0%}" for k in QUESTIONS)])
    rows.append(["(chance)", *(f"{chance:.0%}" for _, _, chance in QUESTIONS.values())])
    table = common.markdown_table(["export", *QUESTIONS], rows)
    print(table)
    common.append_section(
        args.results,
        "eval_example_qa",
        common.device_description(),
        [
            f"{args.scenes} fresh scenes (seed {args.seed}), greedy answers, exact match; config {args.config}"
            + (f" with {' '.join(overrides)}" if overrides else ""),
        ],
        table,
    )


if __name__ == "__main__":
    main()
