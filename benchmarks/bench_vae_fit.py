"""Fit the debug VAE to the example images (what `bagel-titan-example-data --vae` does) and
report the time it takes (wall and CPU) and how well it reconstructs held-out example images.

    python benchmarks/bench_vae_fit.py [--steps N] [--threads T]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import random
import time

import numpy as np
import torch
from PIL import Image

import common
from bagel_titan_plugins.bagel.config import architecture_for
from bagel_titan_plugins.bagel.vae import AutoEncoder
from bagel_titan_plugins.bagel.vae_fit import VAEFitConfig, fit_vae, reconstruction_psnr
from bagel_titan_plugins.data.example_data import make_records, random_scene, record_images, render


def pixels(png: bytes) -> torch.Tensor:
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def held_out(n: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [pixels(render(random_scene(rng), *((64, 48) if i % 2 else (48, 64)))) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=VAEFitConfig.steps)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--num-samples", type=int, default=512, help="example records the images come from")
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = architecture_for("debug").vae
    config = dataclasses.replace(VAEFitConfig(), steps=args.steps)
    images = [pixels(png) for png in record_images(make_records(args.num_samples, 0, (64, 48)))]
    test = held_out(64, seed=12345)
    wall, cpu = time.perf_counter(), time.process_time()
    state = fit_vae(arch, images, config=config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ae = AutoEncoder(arch).eval()
    ae.load_state_dict(state)
    torch.manual_seed(0)
    random_ae = AutoEncoder(arch).eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                ae.encode(
                    torch.stack([x for x in test if x.shape[1] == 48]),
                    generator=torch.Generator().manual_seed(0),
                ).flatten()
            ]
        )
    rows = [
        [
            f"fitted, {args.steps} steps",
            f"{wall:.1f}",
            f"{cpu:.1f}",
            f"{reconstruction_psnr(ae, test):.2f}",
            f"{reconstruction_psnr(ae, test, sample=False):.2f}",
            f"{reconstruction_psnr(ae, images[:64]):.2f}",
            f"{latents.mean().item():+.3f}",
            f"{latents.std().item():.3f}",
        ],
        [
            "random init (before)",
            "-",
            "-",
            f"{reconstruction_psnr(random_ae, test):.2f}",
            f"{reconstruction_psnr(random_ae, test, sample=False):.2f}",
            f"{reconstruction_psnr(random_ae, images[:64]):.2f}",
            "-",
            "-",
        ],
    ]
    table = common.markdown_table(
        [
            "VAE",
            "wall s",
            "CPU s",
            "held-out PSNR dB (sampled)",
            "held-out PSNR dB (mean)",
            "train PSNR dB",
            "latent mean",
            "latent std",
        ],
        rows,
    )
    print(table)
    notes = [
        f"debug flavor VAE {arch}",
        f"fit {config}",
        f"{len(images)} training images from {args.num_samples} "
        f"example records (seed 0); 64 held-out scenes (seed 12345), both orientations; PSNR on [0, 1] pixels",
        "latent = scale * (z - shift) as BAGEL trains on it, posterior sampled; the CPU is shared with other jobs",
    ]
    common.append_section(args.results, "bench_vae_fit", common.device_description(), notes, table)


if __name__ == "__main__":
    main()
