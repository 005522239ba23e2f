"""Fit a small FLUX-style VAE to a set of images, so that its latents carry the pictures.

A randomly initialised frozen VAE (the debug flavor's) decodes every latent to noise, and its
posterior noise swamps the image signal: a model trained on its latents can never draw a
recognisable image. `fit_vae` trains the autoencoder once (e.g. on the bundled example images,
when they are written) with

- reconstruction: L1 + MSE between the images and the decoded posterior samples;
- a KL term on the latent the BAGEL model actually sees, `u = scale * (z - shift)` (the
  architecture's own `scale_factor` / `shift_factor`), towards N(0, 1): flow matching starts from
  N(0, 1) noise, so latents of about unit scale suit it, and the unused channels become plain
  N(0, 1) instead of arbitrary values.

Most steps run on images average-pooled to half size: they are 4x cheaper and teach the same
colours and shapes, and the many more steps they buy matter more than resolution (with 32 groups
of GroupNorm on 32 channels the debug VAE's decoder normalises every channel per image, so
absolute colours take many steps to learn). The result is an `AutoEncoder.state_dict()` with the
key layout of FLUX's `ae.safetensors`. The fit is deterministic for a given seed on a given
machine (CPU, fixed batch order).

``python -m bagel_titan_plugins.bagel.vae_fit DATA_DIR [--fit JSON]`` fits the debug flavor's VAE
to the images of an example-data folder (``DATA_DIR/train.parquet``) and writes
``DATA_DIR/ae.safetensors``; ``bagel-titan-example-data DATA_DIR --vae`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from bagel_titan_plugins.data.example_data import record_images

from .config import VAEArgs, architecture_for
from .vae import AttnBlock, AutoEncoder, ResnetBlock


@dataclass(frozen=True)
class VAEFitConfig:
    """Optimisation settings of `fit_vae`. The defaults fit the debug VAE to the example images
    in about a minute on 2 CPU cores (about 100 s of CPU time), to about 24 dB PSNR on held-out
    example images (shapes and colours right, edges a little soft)."""

    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 8
    """Images per step (all of one size; sizes take turns)."""
    lr: float = 5e-3
    """Peak AdamW learning rate (cosine decay to 5% after a short warm-up)."""
    kl_weight: float = 1e-2
    """Weight of KL(q(u|x) || N(0, 1)) per latent element relative to the per-pixel loss. At 1e-2
    the posterior keeps a std of about 0.2 on latents of about unit scale, so the decoder learns
    to ignore small latent errors: a generated latent that is nearly right decodes to a clean
    image instead of speckles (at 1e-4 the std is 0.02 and it does not), for the same PSNR."""
    seed: int = 0
    """Seeds the initialisation and the batch order."""
    half_res_fraction: float = 0.75
    """Fraction of the steps (the first ones) on images average-pooled to half size: 4x cheaper
    steps that teach the same colours and shapes."""
    zero_init_residual: bool = True
    """Start every residual and attention block as the identity (its last conv at zero), the
    usual start for deep residual nets; the tuned defaults use it."""


def posterior_kl(ae: AutoEncoder, moments: torch.Tensor) -> torch.Tensor:
    """Mean KL per latent element between the posterior of `u = scale * (z - shift)` and N(0, 1).

    `moments` [B, 2*z, h, w] holds the mean and log-variance of z (the encoder's output)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    s = ae.args.scale_factor
    u_mean = s * (mean - ae.args.shift_factor)
    u_logvar = logvar + 2.0 * math.log(s)
    return 0.5 * (u_mean.square() + u_logvar.exp() - 1.0 - u_logvar).mean()


def _group_by_size(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {i} has shape {tuple(image.shape)}; expected [3, H, W] pixels in [-1, 1]"
            )
        groups.setdefault(tuple(image.shape), []).append(image.float())
    return [torch.stack(g) for _, g in sorted(groups.items())]


@torch.no_grad()
def _zero_init_residual(ae: AutoEncoder) -> None:
    for module in ae.modules():
        if isinstance(module, (ResnetBlock, AttnBlock)):
            out = module.conv2 if isinstance(module, ResnetBlock) else module.proj_out
            out.weight.zero_()
            if out.bias is not None:  # both convs have one
                out.bias.zero_()


def fit_vae(
    arch: VAEArgs,
    images: Sequence[torch.Tensor],
    steps: int | None = None,
    seed: int | None = None,
    config: VAEFitConfig = VAEFitConfig(),
) -> dict[str, torch.Tensor]:
    """Train an `AutoEncoder(arch)` on `images` (each [3, H, W] in [-1, 1], H and W divisible by
    the VAE's downsample factor; several sizes allowed) and return its fp32 CPU state dict.

    `steps` and `seed` override `config`'s."""
    steps = config.steps if steps is None else steps
    seed = config.seed if seed is None else seed
    if not images:
        raise ValueError("fit_vae needs at least one image")
    for image in images:
        if image.shape[-2] % arch.downsample or image.shape[-1] % arch.downsample:
            raise ValueError(
                f"image size {tuple(image.shape[-2:])} is not divisible by the VAE downsample "
                f"factor {arch.downsample}"
            )
    groups = _group_by_size(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = AutoEncoder(arch).train()
    if config.zero_init_residual:
        _zero_init_residual(ae)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(i: int) -> float:  # linear warm-up, then cosine to 5%
        return min(1.0, (i + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(steps):
        group = groups[step % len(groups)]
        idx = torch.randint(len(group), (min(config.batch_size, len(group)),), generator=generator)
        x_BCHW = group[idx]
        if (
            step < config.half_res_fraction * steps
            and x_BCHW.shape[-2] % (2 * arch.downsample) == 0
            and x_BCHW.shape[-1] % (2 * arch.downsample) == 0
        ):
            x_BCHW = F.avg_pool2d(x_BCHW, 2)
        moments = ae.moments(x_BCHW)
        mean, logvar = moments.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator)
        z = mean + torch.exp(0.5 * logvar) * eps
        recon = ae.decoder(z)
        loss = (
            F.l1_loss(recon, x_BCHW)
            + F.mse_loss(recon, x_BCHW)
            + config.kl_weight * posterior_kl(ae, moments)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return {k: v.detach().float().contiguous() for k, v in ae.state_dict().items()}


@torch.no_grad()
def reconstruction_psnr(
    ae: AutoEncoder, images: Sequence[torch.Tensor], *, sample: bool = True, seed: int = 0
) -> float:
    """PSNR (dB, pixels in [0, 1]) of `decode(encode(x))` over `images`, through the model's
    scaled latents; `sample=False` decodes the posterior mean instead of a posterior sample."""
    generator = torch.Generator().manual_seed(seed)
    squared, count = 0.0, 0
    for x_BCHW in _group_by_size(images):
        if sample:
            latents = ae.encode(x_BCHW, generator=generator)
        else:
            mean = ae.moments(x_BCHW).chunk(2, dim=1)[0]
            latents = ae.args.scale_factor * (mean - ae.args.shift_factor)
        recon = ae.decode(latents).clamp(-1, 1)
        squared += ((recon - x_BCHW) / 2).square().sum().item()
        count += x_BCHW.numel()
    return 10.0 * math.log10(1.0 / max(squared / count, 1e-12))


def _pixels(png: bytes) -> torch.Tensor:
    """[3, H, W] in [-1, 1], as the processor normalises."""
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def fit_example_vae(data_dir: str, config: VAEFitConfig = VAEFitConfig()) -> str:
    """Fit the debug flavor's VAE to the images of `data_dir`/train.parquet (an example-data
    folder) and save it as `data_dir`/ae.safetensors; returns that path."""
    from safetensors.torch import save_file

    records = pq.read_table(os.path.join(data_dir, "train.parquet")).to_pylist()
    images = [_pixels(png) for png in record_images(records)]
    state = fit_vae(architecture_for("debug").vae, images, config=config)
    path = os.path.join(data_dir, "ae.safetensors")
    save_file(state, path, metadata={"format": "pt", "fit": json.dumps(dataclasses.asdict(config))})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit the debug VAE to an example-data folder's images.")
    parser.add_argument("data_dir", help="a folder written by bagel-titan-example-data (its train.parquet)")
    parser.add_argument(
        "--fit", default="{}", help="VAEFitConfig fields to change, as JSON: '{\"steps\": 100}'"
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(VAEFitConfig(), **json.loads(args.fit))
    print("wrote " + fit_example_vae(args.data_dir, config))


if __name__ == "__main__":
    main()
