"""`bagel-titan-encode-latents`: fill `[bagel] latent_cache` for a training config, once.

    bagel-titan-encode-latents --job.config_file X.toml --bagel.latent_cache data/example/latents

Takes the training config (the same TOML and `--section.key value` overrides as `bagel-titan`),
reads every record of every `[[data.datasets]]` and `[[validation.datasets]]` entry through the
run's BAGEL processor (same resize rules and per-dataset overrides; conditioning dropout off, so
that every generation target and every editing condition is seen), and encodes each VAE image not
yet in the cache with the run's frozen VAE (`[bagel] vae_path`, else the `ae.safetensors` of
`[model] pretrained_path`), one image per encoder call, in the dtype the run's VAE uses on the
`[training] device` (bf16 on a GPU under `vae_dtype = "auto"`). Bad records are skipped and
counted by reason, as the loader counts them. Rerunning it encodes only what is missing (new
data, another size, another VAE), and repairs a damaged entry.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from bagel_titan.errors import UserError
from bagel_titan.protocols import ReadPass

from .latent_cache import COMMAND, DTYPE_NAMES, LatentCache, content_key
from .processor import VaeSegment

if TYPE_CHECKING:
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.plugins import PluginManager

    from .vae import FrozenVAE
    from .spec import BagelSpec

NO_DROPOUT = {"text_dropout_prob": 0.0, "vit_dropout_prob": 0.0, "vae_dropout_prob": 0.0}
PROGRESS_SECONDS = 10.0


def load_run_vae(job_config: JobConfig, plugins: PluginManager) -> tuple[BagelSpec, FrozenVAE]:
    """The run's model spec and its frozen VAE, on the CPU in fp32, with the run's VAE weights."""
    from . import weights
    from .spec import BagelSpec

    spec = plugins.model_specs.get(job_config.model.name)
    if not isinstance(spec, BagelSpec):
        raise UserError(f"[model] name = {job_config.model.name!r} is not a BAGEL model spec")
    options = spec.bagel_config(job_config)
    with torch.device("meta"):  # shapes only: nothing but the VAE is materialised
        model = spec.build(job_config, plugins)
    if model.vae is None:
        raise UserError("[bagel] visual_gen = false: the run has no VAE images to cache")
    model.vae.materialize("cpu")
    if options.vae_path:
        weights.load_vae_file(model, options.vae_path)
    elif job_config.model.pretrained_path:
        source = weights.detect(job_config.model.pretrained_path)
        weights._load_vae(model, source.vae, job_config.model.pretrained_path)
    else:
        raise UserError(
            "the latent cache needs the run's VAE from a file: set [bagel] vae_path or [model] "
            "pretrained_path (a randomly initialised VAE is not known before the run starts)"
        )
    return spec, model.vae


def encode_latents(
    job_config: JobConfig, plugins: PluginManager, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Fill the cache; returns the summary counts."""
    from bagel_titan.distributed.utils import select_device
    from bagel_titan_plugins.data.bad_samples import BadSampleError, as_bad_record
    from bagel_titan_plugins.data.loader import resolve_sources

    spec, vae = load_run_vae(job_config, plugins)
    folder = spec.bagel_config(job_config).latent_cache
    if not folder:
        raise UserError(
            "set the cache folder: --bagel.latent_cache DIR (e.g. beside the data), and the same "
            "[bagel] latent_cache when training"
        )
    device = select_device(job_config.training.device)
    cache = LatentCache(folder, vae.identity(), vae.dtype_for(device))
    cache.write_manifest(
        {
            "vae_path": spec.bagel_config(job_config).vae_path,
            "pretrained_path": job_config.model.pretrained_path,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    processor = spec.build_processor(job_config)
    entries = list(job_config.data.datasets) + list(job_config.validation.datasets)
    sources = resolve_sources(entries, plugins)
    counts: Counter[str] = Counter({"samples": 0, "images": 0, "duplicates": 0, "cached": 0, "encoded": 0})
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    log(
        f"encoding the VAE images of {len(sources)} dataset(s) into {cache.root} "
        f"({DTYPE_NAMES[cache.dtype]} on {device})"
    )
    start = last = time.monotonic()
    for source in sources:
        for raw in source.iter_shard(0, 1, 0, ReadPass()):
            counts["samples"] += 1
            raw.processor_options = {**source.processor_options, **NO_DROPOUT}
            bad = as_bad_record(raw.data)
            try:
                if bad is not None:
                    raise bad
                sample = processor(raw)
            except BadSampleError as error:
                skipped[error.reason] += 1
                continue
            except Exception as exc:  # the loader skips it too (processor_error)
                skipped["processor_error"] += 1
                log(f"skipped {source.name!r} index {raw.index}: {type(exc).__name__}: {exc}")
                continue
            for seg in sample.segments:
                if not isinstance(seg, VaeSegment):
                    continue
                counts["images"] += 1
                key = content_key(seg.image)
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                h, w = seg.image.shape[1] // vae.args.downsample, seg.image.shape[2] // vae.args.downsample
                if cache.get(key, (h, w)).moments is not None:
                    counts["cached"] += 1
                    continue
                cache.put(key, vae.moments_of(seg.image.to(device)), (seg.image.shape[1], seg.image.shape[2]))
                counts["encoded"] += 1
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                log(
                    f"  {counts['samples']} samples, {counts['images']} images: {counts['encoded']} encoded "
                    f"({counts['encoded'] / (last - start):.1f}/s), {counts['cached']} already cached"
                )
    summary = {**counts, "distinct": len(seen), "skipped": dict(skipped), "seconds": time.monotonic() - start}
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
    log(
        f"done: {counts['samples']} samples, {counts['images']} VAE images ({len(seen)} distinct): "
        f"{counts['encoded']} encoded, {counts['cached']} already cached; skipped bad samples: "
        f"{sum(skipped.values())} ({reasons}); {summary['seconds']:.1f} s; train with "
        f"--bagel.latent_cache {folder}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from bagel_titan.cli import setup_logging
    from bagel_titan.config.manager import load_job_config, main_help

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(__doc__ + "\n" + main_help(argv))
        return 0
    setup_logging()
    try:
        job_config, plugins = load_job_config(argv)
        encode_latents(job_config, plugins, log=lambda line: print(line, flush=True))
    except (UserError, FileNotFoundError) as exc:
        print(f"{COMMAND}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
