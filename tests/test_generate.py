"""`bagel-titan-generate` on the export of a real (short) debug run: images from prompts, answers
to questions, edits, the run's config found next to exports/, and one-line user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_titan_plugins.bagel.generate import load_sampler, main, run_config_of
from bagel_titan_plugins.data.example_data import ensure_example_data
from conftest import REPO, run_bagel_titan, subprocess_env

DEBUG_CONFIG = str(REPO / "train_configs" / "debug_model.toml")


@pytest.fixture(scope="module")
def debug_export(tmp_path_factory) -> Path:
    """exports/final of a 3-step run of the debug config (random VAE: fitting one takes a minute)."""
    root = tmp_path_factory.mktemp("generate")
    data = ensure_example_data(str(root / "data"), num_samples=64)
    run_bagel_titan([
        "--job.config_file", DEBUG_CONFIG, "--job.dump_folder", str(root), "--job.run_name", "run",
        "--model.tokenizer_path", data["tokenizer"], "--data.datasets", f'[{{path = "{data["data"]}"}}]',
        "--training.steps", "3", "--training.device", "cpu", "--data.num_workers", "0",
        "--bagel.vae_path", "", "--validation.enable", "false",
    ])
    export = root / "run" / "exports" / "final"
    assert (export / "ema.safetensors").is_file()
    return export


@pytest.mark.dist
def test_prompt_question_and_edit_from_the_debug_export(debug_export, tmp_path, capsys):
    assert run_config_of(str(debug_export)) == str(debug_export.parent.parent / "config.toml")
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(source)
    out = tmp_path / "out"
    code = main([str(debug_export), "--prompt", "a large red circle on a white background", "--num-images", "2",
                 "--image", str(source), "--question", "what colour is the shape ?", "--edit", "a blue one",
                 "--steps", "2", "--cfg", "2.0", "--size", "16", "24", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "config.toml" in printed and "what colour is the shape ? -> " in printed
    images = sorted(p.name for p in out.iterdir())
    assert images == ["a-large-red-circle-on-a-white-background-seed0.png",
                      "a-large-red-circle-on-a-white-background-seed1.png", "edit-a-blue-one-seed0.png",
                      "edit-a-blue-one-seed1.png"]
    generated = np.asarray(Image.open(out / images[0]))
    assert generated.shape == (16, 24, 3)
    assert not np.array_equal(generated, np.asarray(Image.open(out / images[1])))  # seeds differ
    assert np.asarray(Image.open(out / images[2])).shape == (32, 32, 3)  # an edit keeps the source's size


@pytest.mark.dist
def test_same_seed_same_image_and_the_validation_sampler(debug_export):
    sampler = load_sampler(str(debug_export), device="cpu", config_file=run_config_of(str(debug_export)),
                           num_steps=2, image_size=[16, 16])
    assert sampler.config.cfg_scale == 4.0  # the debug config's [bagel.sampling]
    first = sampler.generate_image("a small green triangle on a black background", 7)
    assert np.array_equal(first, sampler.generate_image("a small green triangle on a black background", 7))


@pytest.mark.dist
def test_user_errors_are_one_line(debug_export, tmp_path):
    def generate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bagel_titan_plugins.bagel.generate", *args],
                              capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)

    missing = generate(str(tmp_path / "nowhere"), "--prompt", "a red circle")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "export folder" in missing.stderr and "does not exist" in missing.stderr
    bad_size = generate(str(debug_export), "--prompt", "a red circle", "--size", "18", "24", "--device", "cpu")
    assert bad_size.returncode == 2 and "Traceback" not in bad_size.stderr and "multiples of 4" in bad_size.stderr
    no_image = generate(str(debug_export), "--question", "what shape ?")
    assert no_image.returncode == 2 and "--question and --edit need --image" in no_image.stderr
