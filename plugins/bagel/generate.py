"""`bagel-titan-generate`: images from prompts, answers about images, and image edits, from an
exported model folder (a run's `exports/final`, or the official release's layout).

    bagel-titan-generate EXPORT --prompt "a large red circle on a white background" [--prompt ...]
    bagel-titan-generate EXPORT --image photo.png --question "what colour is the shape ?"
    bagel-titan-generate EXPORT --image photo.png --edit "make the background blue"

It runs the sampler that validation runs during training (`BagelSampler`: flow-matching Euler
steps with classifier-free guidance, greedy answers), with the processor settings (image sizes)
of a training config: `--config`, else the run's resolved `config.toml` when the export lies in
`<run>/exports/<name>/`, else the release's defaults. `[bagel.sampling]` of that config gives the
defaults of `--cfg`, `--steps` and `--size`. Options after `--` override config keys
(`-- --attention.backend flex`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Sequence

from bagel_titan.errors import UserError

if TYPE_CHECKING:  # imported where used: `--help` stays fast
    import numpy as np

    from .sampling import BagelSampler


def run_config_of(export: str) -> str | None:
    """The resolved `config.toml` of the run that wrote `export` (`<run>/exports/<name>/`)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(export))), "config.toml")
    return (
        path
        if os.path.basename(os.path.dirname(os.path.abspath(export))) == "exports" and os.path.isfile(path)
        else None
    )


def load_sampler(
    export: str,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    **sampling: object,
) -> BagelSampler:
    """A `BagelSampler` over the model in `export` on `device` ("auto": CUDA when available);
    `sampling` replaces fields of the config's `[bagel.sampling]` (e.g. `cfg_scale=4.0`)."""
    import torch

    from bagel_titan.config.manager import load_job_config

    from .modeling import Bagel
    from .sampling_config import SamplingConfig
    from .spec import BagelSpec, attention_factories
    from .weights import load_weights, read_architecture

    if not os.path.isdir(export):
        raise UserError(
            f"export folder {export!r} does not exist: pass a run's exports/final (or exports/step-N) "
            f"or a BAGEL release folder"
        )
    argv = ["--job.config_file", config_file] if config_file else ["--model.name", "bagel"]
    # The export holds the tokenizer and the VAE; the training's paths are not needed.
    job_config, plugins = load_job_config(
        [*argv, "--model.tokenizer_path", export, "--bagel.vae_path", "", *overrides]
    )
    try:
        arch, options = read_architecture(export)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load {export!r}: {exc}") from None
    spec = BagelSpec()
    # What shapes the model and its token layout is the export's (its config.json); the config
    # only adds run-time choices (the VAE's dtype). The collator reads the same options.
    options = dataclasses.replace(options, vae_dtype=spec.bagel_config(job_config).vae_dtype, vae_path="")
    job_config.plugin_sections["bagel"] = options
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    with torch.device(target):
        model = Bagel(arch, options, *attention_factories(job_config, plugins))
        model.init_weights()
    load_weights(model, export)
    if target.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    base = (
        job_config.section("bagel.sampling") if job_config.has_section("bagel.sampling") else SamplingConfig()
    )
    config = dataclasses.replace(
        base, prompts=[], questions=[], data_folder="", **{k: v for k, v in sampling.items() if v is not None}
    )
    return spec.sampler(model, job_config, config)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="bagel-titan-generate",
        description=__doc__.splitlines()[0],
        epilog="Options after `--` override config keys, e.g. -- --attention.backend flex",
    )
    parser.add_argument(
        "export", help="exported model folder: a run's exports/final, or a BAGEL release folder"
    )
    parser.add_argument("--prompt", action="append", default=[], help="text-to-image prompt (repeatable)")
    parser.add_argument("--image", help="input image for --question or --edit")
    parser.add_argument("--question", action="append", default=[], help="question about --image (repeatable)")
    parser.add_argument(
        "--edit", action="append", default=[], help="edit instruction for --image (repeatable)"
    )
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the config's)")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the config's)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial noise (image i uses seed + i)"
    )
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="generated image size in px")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt or instruction")
    parser.add_argument(
        "--config",
        help="training config for the processor and sampler settings (default: the "
        "run's config.toml next to exports/, else the release's defaults)",
    )
    parser.add_argument("--out", default="generated", help="folder for the images (default: ./generated)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not (args.prompt or args.question or args.edit):
        parser.error("nothing to do: give --prompt, or --image with --question or --edit")
    if (args.question or args.edit) and not args.image:
        parser.error("--question and --edit need --image")
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    return args, overrides


def run(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """Generate, answer and edit as `args` say; print each answer and written file; return the
    lines printed."""
    import torch
    from PIL import Image

    from bagel_titan_plugins.data.bad_samples import BadSampleError
    from bagel_titan_plugins.data.images import load_rgb

    from .sampling import slug

    config_file = args.config or run_config_of(args.export)
    try:
        sampler = load_sampler(
            args.export,
            config_file,
            overrides,
            args.device,
            cfg_scale=args.cfg,
            num_steps=args.steps,
            image_size=list(args.size) if args.size else None,
        )
    except ValueError as exc:  # a sampling setting out of range (the config's checks)
        raise UserError(f"bagel-titan-generate: {exc}") from None
    lines = [
        f"model {args.export} ({'config ' + config_file if config_file else 'release defaults'}) "
        f"on {sampler.device}"
    ]
    print(lines[-1], flush=True)
    image = None
    if args.image:
        try:
            limits = sampler.processor.config
            image = load_rgb(
                args.image, "", min_side=limits.min_image_side, max_pixels=limits.max_image_pixels
            )
        except BadSampleError as exc:
            raise UserError(f"--image {args.image!r} cannot be read ({exc})") from None
    os.makedirs(args.out, exist_ok=True)

    def save(pixels: np.ndarray, stem: str) -> None:
        path = os.path.join(args.out, f"{stem}.png")
        Image.fromarray(pixels).save(path)
        lines.append(f"wrote {path}")
        print(lines[-1], flush=True)

    with torch.no_grad():
        for question in args.question:
            assert image is not None  # --question needs --image (the parser checks)
            lines.append(f"{question} -> {sampler.answer_image(image, question)}")
            print(lines[-1], flush=True)
        try:
            for prompt in args.prompt:
                for i in range(args.num_images):
                    save(sampler.generate_image(prompt, args.seed + i), f"{slug(prompt)}-seed{args.seed + i}")
            for instruction in args.edit:
                assert image is not None  # --edit needs --image (the parser checks)
                for i in range(args.num_images):
                    save(
                        sampler.edit_image(image, instruction, args.seed + i),
                        f"edit-{slug(instruction)}-seed{args.seed + i}",
                    )
        except ValueError as exc:  # a size the model cannot generate, a modality it lacks
            raise UserError(str(exc)) from None
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its notice about the export's config.json is noise here
    try:
        run(args, overrides)
    except UserError as exc:
        print(f"bagel-titan-generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
