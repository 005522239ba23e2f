"""`bagel-titan-generate` on the export of a real (short) debug run: images from prompts, answers
to questions, edits, the run's config found next to exports/, and one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_titan_plugins.bagel.generate import load_sampler, main, run_config_of
from bagel_titan_plugins.bagel.modeling import flow_timesteps, patchify_latents
from bagel_titan_plugins.bagel.processor import BagelSample, TextSegment, VaeSegment
from bagel_titan_plugins.data.example_data import ensure_example_data
from conftest import REPO, subprocess_env, train_in_process

DEBUG_CONFIG = str(REPO / "train_configs" / "debug_model.toml")


@pytest.fixture(scope="module")
def debug_export(tmp_path_factory) -> Path:
    """exports/final of a 3-step run of the debug config (random VAE: fitting one takes a minute),
    with the Trainer in this process (`train_in_process`)."""
    root = tmp_path_factory.mktemp("generate")
    data = ensure_example_data(str(root / "data"), num_samples=64)
    train_in_process(
        [
            "--job.config_file",
            DEBUG_CONFIG,
            "--job.dump_folder",
            str(root),
            "--job.run_name",
            "run",
            "--model.tokenizer_path",
            data["tokenizer"],
            "--data.datasets",
            f'[{{path = "{data["data"]}"}}]',
            "--training.steps",
            "3",
            "--training.device",
            "cpu",
            "--data.num_workers",
            "0",
            "--bagel.vae_path",
            "",
            "--validation.enable",
            "false",
        ]
    )
    export = root / "run" / "exports" / "final"
    assert (export / "ema.safetensors").is_file()
    return export


@pytest.mark.dist
def test_prompt_question_and_edit_from_the_debug_export(debug_export, tmp_path, capsys):
    assert run_config_of(str(debug_export)) == str(debug_export.parent.parent / "config.toml")
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(source)
    out = tmp_path / "out"
    code = main(
        [
            str(debug_export),
            "--prompt",
            "a large red circle on a white background",
            "--num-images",
            "2",
            "--image",
            str(source),
            "--question",
            "what colour is the shape ?",
            "--edit",
            "a blue one",
            "--steps",
            "2",
            "--cfg",
            "2.0",
            "--size",
            "16",
            "24",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "config.toml" in printed and "what colour is the shape ? -> " in printed
    images = sorted(p.name for p in out.iterdir())
    assert images == [
        "a-large-red-circle-on-a-white-background-seed0.png",
        "a-large-red-circle-on-a-white-background-seed1.png",
        "edit-a-blue-one-seed0.png",
        "edit-a-blue-one-seed1.png",
    ]
    generated = np.asarray(Image.open(out / images[0]))
    assert generated.shape == (16, 24, 3)
    assert not np.array_equal(generated, np.asarray(Image.open(out / images[1])))  # seeds differ
    assert np.asarray(Image.open(out / images[2])).shape == (32, 32, 3)  # an edit keeps the source's size


@pytest.mark.dist
def test_same_seed_same_image(debug_export):
    sampler = load_sampler(
        str(debug_export),
        device="cpu",
        config_file=run_config_of(str(debug_export)),
        num_steps=2,
        image_size=[16, 16],
    )
    assert sampler.config.cfg_scale == 4.0  # the debug config's [bagel.sampling]
    first = sampler.generate_image("a small green triangle on a black background", 7)
    assert np.array_equal(first, sampler.generate_image("a small green triangle on a black background", 7))
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    assert np.array_equal(
        sampler.edit_image(red, "make it green", 3), sampler.edit_image(red, "make it green", 3)
    )


@pytest.mark.dist
def test_edit_velocity_is_the_training_forward_of_an_editing_sample(debug_export):
    """The sampler's forward of an edit (source latents given at t = 0 before the target) equals
    the training forward of the same editing sample at the same x_t."""
    sampler = load_sampler(str(debug_export), device="cpu", config_file=run_config_of(str(debug_export)))
    model, processor = sampler.model, sampler.processor
    image = Image.new("RGB", (32, 32), (40, 80, 220))
    source = processor.vae_segment(image, noised=False)
    target = VaeSegment(torch.zeros(3, 32, 32), processor.vae_stride, noised=True)
    sample = BagelSample(
        [
            source,
            processor.vit_segment(image),
            TextSegment(processor.encode("make it red"), loss=False),
            target,
        ]
    )
    batch = sampler.collator([sample])
    clean = model.vae.encode(source.image[None], eps=torch.zeros(()))
    batch.padded_latent = torch.cat([clean, clean])  # the target's x0 is irrelevant: x_t is given below
    n = source.grid[0] * source.grid[1]
    gen = torch.Generator().manual_seed(0)
    batch.noise = torch.randn(2 * n, model.patch_latent_dim, generator=gen)
    batch.packed_timesteps = torch.cat([torch.full((n,), float("-inf")), torch.full((n,), 0.4)])
    with torch.no_grad():
        trained = model(batch)
        t = float(flow_timesteps(torch.tensor(0.4), model.options.timestep_shift))
        x0 = patchify_latents(batch.padded_latent, [source.grid, target.grid], 2)
        x_t = (1 - t) * x0[n:] + t * batch.noise[n:]
        sampled = sampler._velocity(batch, x_t, t, [sampler._clean_latents([source])])
    torch.testing.assert_close(sampled, trained.pred_velocity, atol=1e-5, rtol=1e-5)


@pytest.mark.dist
def test_user_errors_are_one_line(debug_export, tmp_path, capsys):
    """The command in its own process once (exit status 2, no traceback); the other mistakes
    through its `main` in this process, where a traceback would be an exception that fails the
    test."""
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "bagel_titan_plugins.bagel.generate",
            str(tmp_path / "nowhere"),
            "--prompt",
            "a red circle",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "export folder" in missing.stderr and "does not exist" in missing.stderr

    def generate(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        return code, capsys.readouterr().err

    code, err = generate(
        str(debug_export), "--prompt", "a red circle", "--size", "18", "24", "--device", "cpu"
    )
    assert code == 2 and "multiples of 4" in err and len(err.strip().splitlines()) == 1, err
    code, err = generate(str(debug_export), "--question", "what shape ?")
    assert code == 2 and "--question and --edit need --image" in err, err
