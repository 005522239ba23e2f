"""The latent cache (`bagel-titan-encode-latents` + `[bagel] latent_cache`): training with the
cached moments is bitwise the training without them (same noise, same losses, same weights);
another VAE, another resolution, a missing or a damaged entry never trains on wrong latents.

Real pieces throughout: the example data (parquet) plus an editing dataset (jsonl + PNG files),
a debug-flavor VAE written to `ae.safetensors`, the CLI, the packed loader with a worker process,
the Trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_titan.config.manager import load_job_config
from bagel_titan_plugins.bagel.config import FLAVORS
from bagel_titan_plugins.bagel.latent_cache import LatentCacheMiss
from bagel_titan_plugins.bagel.vae import FrozenVAE

REPO = Path(__file__).resolve().parents[1]


def _write_vae(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    vae = FrozenVAE(FLAVORS["debug"].vae)
    save_file({k: v.contiguous() for k, v in vae.module.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Example data (t2i + questions), an editing jsonl (a condition image and a target of
    another size), and two VAEs."""
    from bagel_titan_plugins.data.example_data import write_example_data

    root = tmp_path_factory.mktemp("latent_cache")
    write_example_data(str(root / "example"), num_samples=64)
    _write_vae(root / "ae.safetensors", seed=1)
    _write_vae(root / "other_ae.safetensors", seed=2)
    samples = sorted((root / "example" / "samples").glob("*.png"))
    with open(root / "edit.jsonl", "w") as f:
        for i in range(6):
            src, dst = samples[i % len(samples)].name, samples[(i + 1) % len(samples)].name
            turns = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": src}, {"type": "text", "text": "red"}],
                },
                {"role": "assistant", "content": [{"type": "image", "image": dst}]},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return root


def _args(data: Path, run: Path, *extra: str, edit_size: int = 48) -> list[str]:
    datasets = (
        f'[{{path="{data}/example/train.parquet"}}, '
        f'{{path="{data}/edit.jsonl", data_folder="{data}/example/samples", weight=0.5, '
        f"processor={{vae_min_size={edit_size}, vae_max_size={edit_size}}}}}]"
    )
    return [
        "--job.config_file",
        str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder",
        str(run.parent),
        "--job.run_name",
        run.name,
        "--model.tokenizer_path",
        f"{data}/example/tokenizer",
        "--data.datasets",
        datasets,
        "--bagel.vae_path",
        f"{data}/ae.safetensors",
        "--bagel.processor.vae_dropout_prob",
        "0.3",
        "--training.device",
        "cpu",
        "--training.steps",
        "4",
        "--training.deterministic",
        "true",
        "--metrics.log_freq",
        "1",
        "--metrics.enable_tensorboard",
        "false",
        "--checkpoint.enable",
        "false",
        "--checkpoint.export_at_end",
        "false",
        "--validation.enable",
        "false",
        "--compile.enable",
        "false",
        *extra,
    ]


def _train(args: list[str]) -> tuple[list[dict], dict[str, torch.Tensor], int]:
    """Metrics per step, final weights, images encoded on a cache miss."""
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    cfg, plugins = load_job_config(args)
    trainer = Trainer(cfg, plugins)
    try:
        trainer.train()
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        encoded = trainer.model.latent_cache_encoded
    finally:
        trainer.close()
        destroy_distributed()
    run = Path(cfg.job.dump_folder) / cfg.job.run_name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, weights, encoded


def _encode(args: list[str]) -> dict:
    from bagel_titan_plugins.bagel.encode_latents import encode_latents

    cfg, plugins = load_job_config(args)
    return encode_latents(cfg, plugins, log=lambda line: None)


LOSSES = ("loss", "loss/ce", "loss/flow_mse", "grad_norm")


def test_training_with_the_cache_is_bitwise_training_without(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    summary = _encode(_args(data, tmp_path / "enc", "--bagel.latent_cache", str(cache)))
    assert summary["encoded"] > 0 and summary["skipped"] == {}
    again = _encode(_args(data, tmp_path / "enc", "--bagel.latent_cache", str(cache)))
    assert again["encoded"] == 0 and again["cached"] == summary["encoded"]

    plain, plain_w, _ = _train(_args(data, tmp_path / "plain"))
    cached, cached_w, encoded = _train(_args(data, tmp_path / "cached", "--bagel.latent_cache", str(cache)))
    assert encoded == 0
    assert [m["loss/flow_mse"] for m in plain if m["loss/flow_mse"]], "no step generated an image"
    for a, b in zip(plain, cached, strict=True):
        assert {k: a[k] for k in LOSSES} == {k: b[k] for k in LOSSES}
    assert plain_w.keys() == cached_w.keys()
    assert all(torch.equal(plain_w[k], cached_w[k]) for k in plain_w)


def test_encode_on_miss_trains_the_same_and_counts(data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    plain, _, _ = _train(_args(data, tmp_path / "plain"))
    missed, _, encoded = _train(
        _args(
            data, tmp_path / "miss", "--bagel.latent_cache", str(empty), "--bagel.latent_cache_miss", "encode"
        )
    )
    assert encoded > 0
    assert [{k: m[k] for k in LOSSES} for m in plain] == [{k: m[k] for k in LOSSES} for m in missed]


def _first_batch_error(args: list[str]) -> str:
    with pytest.raises(LatentCacheMiss) as info:
        _train(args)
    message = str(info.value)
    assert "\n" not in message and "bagel-titan-encode-latents" in message
    return message


def test_another_vae_or_resolution_or_damage_is_a_miss(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    _encode(_args(data, tmp_path / "enc", "--bagel.latent_cache", str(cache)))
    base = ["--bagel.latent_cache", str(cache), "--training.steps", "1", "--data.num_workers", "0"]

    other_vae = _first_batch_error(
        _args(data, tmp_path / "vae", *base, "--bagel.vae_path", f"{data}/other_ae.safetensors")
    )
    assert "missing" in other_vae and "VAE image" in other_vae

    # the editing images at 64 px instead of 48: other pixels, other key
    bigger = _first_batch_error(_args(data, tmp_path / "res", *base, edit_size=64))
    assert "missing" in bigger and "64x64 px" in bigger

    # a damaged entry: truncated, then one whose content was swapped with another's
    entries = sorted(cache.glob("*/*/*.safetensors"))
    assert len(entries) > 2
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])
    damaged = _first_batch_error(_args(data, tmp_path / "dmg", *base))
    assert "damaged entry" in damaged
    repaired = _encode(_args(data, tmp_path / "enc", "--bagel.latent_cache", str(cache)))
    assert repaired["encoded"] == len(entries)
    contents = [entry.read_bytes() for entry in entries]  # every entry gets another's content
    for entry, content in zip(entries, contents[1:] + contents[:1]):
        entry.write_bytes(content)
    swapped = _first_batch_error(_args(data, tmp_path / "swap", *base))
    assert "damaged entry" in swapped


def test_entries_are_written_atomically(tmp_path: Path) -> None:
    from bagel_titan_plugins.bagel.latent_cache import LatentCache

    cache = LatentCache(str(tmp_path), "ab" * 16, torch.float32)
    moments = torch.randn(32, 4, 4)

    class Interrupted(BaseException):
        pass

    def crash(*args, **kwargs):
        raise Interrupted

    original = os.replace
    os.replace = crash  # the process dies between writing the temporary file and the rename
    try:
        with pytest.raises(Interrupted):
            cache.put("cd" * 20, moments, (16, 16))
    finally:
        os.replace = original
    assert list(tmp_path.rglob("*.safetensors")) == []
    assert cache.get("cd" * 20, (4, 4)).reason == "missing"
    cache.put("cd" * 20, moments, (16, 16))
    assert torch.equal(cache.get("cd" * 20, (4, 4)).moments, moments)
    assert torch.equal(load_file(cache.path("cd" * 20))["moments"], moments)


def test_an_images_latents_do_not_depend_on_its_pack_mates() -> None:
    """The release encodes the pack's images padded to a common size in one call, so GroupNorm's
    statistics include the padding; bagel-titan encodes each alone. Measured here on the full
    FLUX architecture: padding moves the moments by O(1), and even a batch of equal-sized images
    is not bitwise the single calls on this CPU (why both paths encode one image per call)."""
    from bagel_titan_plugins.bagel.config import VAEArgs

    torch.manual_seed(0)
    vae = FrozenVAE(VAEArgs(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    alone = vae.moments_of(x[0, :, :16, :16])
    padded = torch.zeros(2, 3, 32, 32)
    padded[0, :, :16, :16] = x[0, :, :16, :16]
    padded[1] = x[1]
    in_pack = vae.module.moments(padded)[0, :, :2, :2]
    assert (in_pack - alone).abs().max() > 1e-2
    assert torch.equal(vae.moments_of(x[0, :, :16, :16].clone()), alone)


@pytest.mark.dist
def test_cli_runs_on_the_example_data(data: Path, tmp_path: Path, capsys) -> None:
    """The installed command encodes the example data; without a cache folder its `main` (here in
    this process) stops with exit status 2 and the one error line."""
    from conftest import run_command

    from bagel_titan_plugins.bagel.encode_latents import main

    cache = tmp_path / "latents"
    out = run_command(
        [
            str(REPO / ".venv" / "bin" / "bagel-titan-encode-latents"),
            *_args(data, tmp_path / "cli", "--bagel.latent_cache", str(cache)),
        ]
    )
    assert "done:" in out.stdout and "skipped bad samples: 0" in out.stdout, out.stdout
    manifest = json.loads(next(cache.glob("*/vae.json")).read_text())
    assert manifest["dtype"] == "float32" and manifest["device"] == "cpu"
    capsys.readouterr()
    assert main(_args(data, tmp_path / "cli")) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("bagel-titan-encode-latents: error: set the cache folder"), err


@pytest.mark.dist
@pytest.mark.slow
def test_benchmark_runs_and_checks_equality(tmp_path: Path) -> None:
    from conftest import run_command

    results = tmp_path / "RESULTS.md"
    run_command(
        [
            str(REPO / ".venv" / "bin" / "python"),
            "benchmarks/bench_latent_cache.py",
            *("--vae", "tiny", "--steps", "1", "--warmup", "0", "--packs", "1", "--results", str(results)),
        ]
    )
    text = results.read_text()
    assert (
        "losses bitwise equal on every step (cached vs encoded): yes" in text
        and "| latent cache | 1 |" in text
    )


def test_mixed_sizes_in_one_pack_cached_equals_encoded(tmp_path: Path) -> None:
    """A pack of images of three sizes (a padded batch): the latents the model samples from the
    cache equal, bit for bit, those it samples after encoding the pixels, for the same generator;
    and an image's latents do not change with its pack-mates."""
    from bagel_titan_plugins.bagel.collator import BagelCollator
    from bagel_titan_plugins.bagel.latent_cache import LatentCache, content_key
    from bagel_titan_plugins.bagel.processor import BagelSample, SpecialTokens, TextSegment, VaeSegment
    from synthetic_bagel import build_bagel_for_tests

    model = build_bagel_for_tests("debug", seed=3)
    stride = model.arch.vae.downsample * model.options.latent_patch_size
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (16, 48), (40, 24)]
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]
    samples = [
        BagelSample([TextSegment([5, 6], loss=False), VaeSegment(im, stride, noised=i != 1)], ("s", i))
        for i, im in enumerate(images)
    ]
    cache = LatentCache(str(tmp_path), model.vae.identity(), torch.float32)
    for im in images:  # as bagel-titan-encode-latents stores them
        cache.put(content_key(im), model.vae.moments_of(im), tuple(im.shape[1:]))
    kwargs = dict(special_tokens=SpecialTokens(1, 2, 3, 4), vit_patch_size=14, vae_downsample=2)
    plain = BagelCollator(None, model.options, **kwargs)(samples)
    cached = BagelCollator(None, model.options, latent_cache=cache, **kwargs)(samples)
    assert cached.padded_images is None and cached.vae_moments is not None
    x0, t, noise = model._latent_inputs(plain, torch.Generator().manual_seed(7), torch.device("cpu"))
    x0c, tc, noisec = model._latent_inputs(cached, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert torch.equal(x0, x0c) and torch.equal(t, tc) and torch.equal(noise, noisec)
    alone = BagelCollator(None, model.options, **kwargs)(samples[1:2])
    moments_in_pack = model._vae_moments(model.vae, plain)[1, :, :8, :24]
    assert torch.equal(model._vae_moments(model.vae, alone)[0], moments_in_pack)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_with_the_cache_train_as_without(data: Path, tmp_path: Path) -> None:
    """FSDP2 on 2 ranks, each with its loader worker: the same losses with and without the cache."""
    from conftest import run_bagel_titan

    cache = tmp_path / "latents"
    _encode(_args(data, tmp_path / "enc", "--bagel.latent_cache", str(cache)))
    two = ["--training.steps", "3"]
    run_bagel_titan(_args(data, tmp_path / "plain", *two), nproc=2)
    run_bagel_titan(_args(data, tmp_path / "cached", *two, "--bagel.latent_cache", str(cache)), nproc=2)

    def losses(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: json.loads(line)[k] for k in LOSSES} for line in lines]

    assert len(losses("plain")) == 3 and losses("plain") == losses("cached")


@pytest.mark.dist
def test_a_job_whose_cache_misses_an_image_stops_with_the_one_line_error(data: Path, tmp_path: Path) -> None:
    """The `bagel-titan` command with its loader worker: a cache miss ends the job with the one
    error line naming the command that fills the cache. (One rank: how an error on a rank ends
    a multi-rank job is tests/faults/test_rank_failure_and_signals.py's subject.)"""
    from conftest import run_bagel_titan

    empty = tmp_path / "empty"
    failed = run_bagel_titan(
        _args(data, tmp_path / "miss", "--training.steps", "3", "--bagel.latent_cache", str(empty)),
        check=False,
    )
    assert failed.returncode != 0
    errors = [line for line in failed.stdout.splitlines() + failed.stderr.splitlines() if "error:" in line]
    assert any("bagel-titan-encode-latents" in line and "missing" in line for line in errors), errors
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
