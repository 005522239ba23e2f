"""Answer accuracy of models trained on the example data, on fresh scenes it never saw.

The three fixed questions that validation asks are too few to tell learning from luck. This
renders `--scenes` new coloured-shape scenes (seeded), asks each of the three question kinds the
example data trains ("what colour is the shape ?", "what shape is in the image ?", "what colour is
the background ?") with greedy decoding, and counts exact answers. One row per exported folder
(`exports/final` of a run); the chance column is the accuracy of guessing uniformly.

    python benchmarks/eval_example_qa.py outputs/debug/exports/final [more exports ...] \\
        [--config train_configs/debug_model.toml] [--scenes 60] [-- --bagel.processor.vit_max_size 224]

Options after `--` override the config the run was trained with (processor sizes must match).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import torch

import common
from bagel_titan.config.manager import load_job_config
from bagel_titan_plugins.bagel.sampling import BagelSampler
from bagel_titan_plugins.bagel.sampling_config import SamplingConfig, SamplingQuestion
from bagel_titan_plugins.bagel.spec import BagelSpec, build_bagel
from bagel_titan_plugins.bagel.weights import load_weights, read_architecture
from bagel_titan_plugins.data.example_data import COLOURS, SHAPES, Scene, random_scene, render

QUESTIONS = {
    "shape colour": ("what colour is the shape ?", lambda s: f"the shape is {s.colour} .", 1 / len(COLOURS)),
    "shape": ("what shape is in the image ?", lambda s: f"it is a {s.shape} .", 1 / len(SHAPES)),
    "background": ("what colour is the background ?", lambda s: f"the background is {s.background} .",
                   1 / len(COLOURS)),
}


def sampler_for(export: str, config_file: str, overrides: list[str], image_folder: str) -> BagelSampler:
    """A greedy answerer over the exported model, with the processor the run trained with."""
    cfg, _ = load_job_config(["--job.config_file", config_file, "--model.tokenizer_path", export,
                              "--bagel.vae_path", "", *overrides])
    spec = BagelSpec()
    arch, _ = read_architecture(export)
    model = build_bagel(arch, spec.bagel_config(cfg))
    model.init_weights()
    load_weights(model, export)
    model.eval()
    return spec.sampler(model, cfg, SamplingConfig(data_folder=image_folder, max_new_tokens=16))


def write_scenes(folder: str, count: int, seed: int) -> list[tuple[str, Scene]]:
    rng = random.Random(seed)
    scenes = []
    for i in range(count):
        scene = random_scene(rng)
        name = f"scene_{i:03d}.png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(render(scene, 64, 48))
        scenes.append((name, scene))
    return scenes


@torch.no_grad()
def accuracy(sampler: BagelSampler, scenes: list[tuple[str, Scene]]) -> dict[str, float]:
    right = dict.fromkeys(QUESTIONS, 0)
    for image, scene in scenes:
        for kind, (question, expected, _) in QUESTIONS.items():
            right[kind] += sampler.answer(SamplingQuestion(image=image, question=question)) == expected(scene)
    return {kind: count / len(scenes) for kind, count in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="exported model folders (a run's exports/final)")
    parser.add_argument("--config", default="train_configs/debug_model.toml", help="the config the runs trained with")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=123, help="seed of the fresh scenes")
    common.add_results_option(parser)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split]), argv[split + 1:]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scenes = write_scenes(folder, args.scenes, args.seed)
        for export in args.exports:
            scores = accuracy(sampler_for(export, args.config, overrides, folder), scenes)
            rows.append([export, *(f"{scores[k]:.0%}" for k in QUESTIONS)])
    rows.append(["(chance)", *(f"{chance:.0%}" for _, _, chance in QUESTIONS.values())])
    table = common.markdown_table(["export", *QUESTIONS], rows)
    print(table)
    common.append_section(args.results, "eval_example_qa", common.device_description(), [
        f"{args.scenes} fresh scenes (seed {args.seed}), greedy answers, exact match; config {args.config}"
        + (f" with {' '.join(overrides)}" if overrides else ""),
    ], table)


if __name__ == "__main__":
    main()
