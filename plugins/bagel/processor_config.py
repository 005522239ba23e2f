"""`[bagel.processor]`: how the BAGEL processor turns raw samples into token sequences.

Registered as a config section by the bagel plugin; `BagelProcessor` reads it through
`job_config.section("bagel.processor")`. Defaults follow the public release's training recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ProcessorConfig:
    vit_min_size: int = 378
    """Shorter side (px) an understanding image is resized up to before the ViT (keeps aspect)."""
    vit_max_size: int = 980
    """Longer side (px) an understanding image is resized down to; also capped by
    `vit_max_num_patch_per_side * vit_patch_size`."""
    vit_max_pixels: int = 14 * 14 * 9 * 1024
    """Pixel budget of one ViT image after resizing (the release's 1,806,336): a larger result is
    scaled down, keeping the aspect ratio."""
    vae_min_size: int = 512
    """Shorter side (px) a VAE image (generation target or condition) is resized up to."""
    vae_max_size: int = 1024
    """Longer side (px) a VAE image is resized down to; also capped by `max_latent_size` latent
    patches per side. Both VAE sides are rounded to multiples of vae_downsample*latent_patch_size."""
    vae_max_pixels: int = 14 * 14 * 9 * 1024
    """Pixel budget of one VAE image after resizing (the release's 1,806,336)."""
    min_image_side: int = 16
    """An image whose shorter side (px, before resizing) is below this is skipped as too small."""
    max_image_pixels: int = 40_000_000
    """An image with more pixels than this (before resizing) is skipped as too large, from its
    header, without decoding it (a 100-megapixel PNG takes seconds and ~0.5 GB to decode, every
    epoch, only to be resized to about one megapixel)."""
    text_dropout_prob: float = 0.1
    """Probability to drop the conditioning text of a generation sample (classifier-free
    guidance training)."""
    vit_dropout_prob: float = 0.3
    """Probability to drop the ViT tokens of a conditioning image in a generation sample."""
    vae_dropout_prob: float = 0.3
    """Probability to drop the clean VAE tokens of a conditioning image in a generation sample."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Which text of a chat sample gets a CE loss: only assistant turns, or every turn. (A plain
    text-only sample is all target.) The batch always carries the release's per-label weights
    1/sqrt(len(<|im_start|> + text)); whether the CE uses them is the loss's option."""
    vit_image_mean: float = 0.5
    """ViT normalisation mean (per channel, pixels in [0, 1]): SigLIP uses 0.5."""
    vit_image_std: float = 0.5
    """ViT normalisation std: SigLIP uses 0.5 (pixels end in [-1, 1])."""
    seed: int = -1
    """Seed of the conditioning dropout draws; -1: `[data] seed` (then `training.seed`). A draw
    depends only on this seed and the sample's (dataset, index, epoch), so resume is exact."""
