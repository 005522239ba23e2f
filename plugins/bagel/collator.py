"""The BAGEL collator: a list of `BagelSample`s -> one `BagelPackedBatch` (the release's layout).

Per sample, RoPE positions restart at 0. A text segment (`<|im_start|>` + ids + `<|im_end|>`,
causal) takes one position per token; a ViT image (`<|vision_start|>` + patches +
`<|vision_end|>`, full) shares one position, then the position moves on by one; a noised VAE
image (mode noise) shares one position that does not move on; a clean VAE image (mode full)
moves it on by one, and so does a dropped conditioning image. Image position ids index the
ViT / latent sin-cos tables (row * side + col), or with `[bagel] interpolate_pos` the table cell
each patch's fractional coordinate falls into. Timesteps and noise are drawn by
the model, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .batch import BagelPackedBatch
from .latent_cache import LatentCache, content_key, miss_message
from .processor import BagelSample, DroppedImage, SpecialTokens, TextSegment, VaeSegment, VitSegment


def patchify(image_CHW: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], feature order (py, px, c)."""
    c, h, w = image_CHW.shape
    x = image_CHW.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def grid_position_ids(h: int, w: int, row_stride: int) -> torch.Tensor:
    """[h*w] row * row_stride + col, row-major."""
    return (torch.arange(h)[:, None] * row_stride + torch.arange(w)).flatten()


def grid_position_ids_interpolated(h: int, w: int, side: int) -> torch.Tensor:
    """[h*w] ids on the full `side` x `side` table: each patch takes the table cell its
    fractional coordinate falls into (the release's `interpolate_pos`)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
    return (rows[:, None] * side + cols).flatten()


@dataclass
class _Builder:
    """Accumulates the packed lists while samples are appended."""

    special: SpecialTokens
    vit_max_num_patch_per_side: int
    max_latent_size: int
    interpolate_pos: bool = False
    curr: int = 0
    sample_lens: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_indexes: list[int] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)
    ce_indexes: list[int] = field(default_factory=list)
    ce_weights: list[float] = field(default_factory=list)
    vit_tokens: list[torch.Tensor] = field(default_factory=list)
    vit_indexes: list[int] = field(default_factory=list)
    vit_positions: list[torch.Tensor] = field(default_factory=list)
    vit_seqlens: list[int] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)
    vae_shapes: list[tuple[int, int]] = field(default_factory=list)
    vae_positions: list[torch.Tensor] = field(default_factory=list)
    vae_indexes: list[int] = field(default_factory=list)
    vae_noised: list[bool] = field(default_factory=list)
    mse_indexes: list[int] = field(default_factory=list)

    def _grid(self, h: int, w: int, side: int) -> torch.Tensor:
        if self.interpolate_pos:
            return grid_position_ids_interpolated(h, w, side)
        return grid_position_ids(h, w, side)

    def _token(self, token_id: int) -> int:
        self.text_ids.append(token_id)
        self.text_indexes.append(self.curr)
        self.curr += 1
        return self.curr - 1

    def text(self, seg: TextSegment, rope: int) -> int:
        start = self.curr
        shifted = [self.special.bos, *seg.ids]
        self.text_ids.extend(shifted)
        self.text_indexes.extend(range(start, start + len(shifted)))
        self.curr += len(shifted)
        if seg.loss:
            self.ce_indexes.extend(range(start, start + len(shifted)))
            self.ce_weights.extend([1.0 / math.sqrt(len(shifted))] * len(shifted))
            self.label_ids.extend([*seg.ids, self.special.eos])
        eos_at = self._token(self.special.eos)
        if seg.eos_label is not None:
            self.ce_indexes.append(eos_at)
            self.ce_weights.append(1.0)
            self.label_ids.append(seg.eos_label)
        n = len(shifted) + 1
        self.split_lens.append(n)
        self.attn_modes.append("causal")
        self.position_ids.extend(range(rope, rope + n))
        return rope + n

    def vit(self, seg: VitSegment, rope: int) -> int:
        h, w = seg.grid
        if not self.interpolate_pos and max(h, w) > self.vit_max_num_patch_per_side:
            raise ValueError(
                f"ViT image of {h}x{w} patches exceeds vit_max_num_patch_per_side "
                f"{self.vit_max_num_patch_per_side}; lower [bagel.processor] vit_max_size"
            )
        self._token(self.special.vision_start)
        n = h * w
        self.vit_tokens.append(patchify(seg.image, seg.patch_size))
        self.vit_indexes.extend(range(self.curr, self.curr + n))
        self.vit_positions.append(self._grid(h, w, self.vit_max_num_patch_per_side))
        self.vit_seqlens.append(n)
        self.curr += n
        self._token(self.special.vision_end)
        self.split_lens.append(n + 2)
        self.attn_modes.append("full")
        self.position_ids.extend([rope] * (n + 2))
        return rope + 1

    def vae(self, seg: VaeSegment, rope: int) -> int:
        h, w = seg.grid
        if not self.interpolate_pos and max(h, w) > self.max_latent_size:
            raise ValueError(
                f"VAE image of {h}x{w} latent patches exceeds max_latent_size "
                f"{self.max_latent_size}; lower [bagel.processor] vae_max_size"
            )
        self._token(self.special.vision_start)
        n = h * w
        self.vae_images.append(seg.image)
        self.vae_shapes.append((h, w))
        self.vae_positions.append(self._grid(h, w, self.max_latent_size))
        self.vae_indexes.extend(range(self.curr, self.curr + n))
        self.vae_noised.append(seg.noised)
        if seg.noised:
            self.mse_indexes.extend(range(self.curr, self.curr + n))
        self.curr += n
        self._token(self.special.vision_end)
        self.split_lens.append(n + 2)
        self.attn_modes.append("noise" if seg.noised else "full")
        self.position_ids.extend([rope] * (n + 2))
        return rope if seg.noised else rope + 1

    def add(self, sample: BagelSample) -> None:
        start, rope = self.curr, 0
        for seg in sample.segments:
            if isinstance(seg, TextSegment):
                rope = self.text(seg, rope)
            elif isinstance(seg, VitSegment):
                rope = self.vit(seg, rope)
            elif isinstance(seg, VaeSegment):
                rope = self.vae(seg, rope)
            elif isinstance(seg, DroppedImage):
                rope += 1
            else:
                raise TypeError(f"unknown segment type {type(seg).__name__} in sample {sample.key}")
        self.sample_lens.append(self.curr - start)

    def build(self, keys: list, vit_feature_dim: int) -> BagelPackedBatch:
        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        padded = None
        if self.vae_images:
            h_max = max(im.shape[1] for im in self.vae_images)
            w_max = max(im.shape[2] for im in self.vae_images)
            padded = torch.zeros(len(self.vae_images), 3, h_max, w_max)
            for i, im in enumerate(self.vae_images):
                padded[i, :, : im.shape[1], : im.shape[2]] = im
        return BagelPackedBatch(
            sequence_length=self.curr,
            sample_lens=self.sample_lens,
            split_lens=self.split_lens,
            attn_modes=self.attn_modes,
            packed_text_ids=ints(self.text_ids),
            packed_text_indexes=ints(self.text_indexes),
            packed_position_ids=ints(self.position_ids),
            packed_label_ids=ints(self.label_ids),
            ce_loss_indexes=ints(self.ce_indexes),
            ce_loss_weights=torch.tensor(self.ce_weights, dtype=torch.float32),
            packed_vit_tokens=(
                torch.cat(self.vit_tokens) if self.vit_tokens else torch.zeros(0, vit_feature_dim)
            ),
            packed_vit_token_indexes=ints(self.vit_indexes),
            packed_vit_position_ids=(torch.cat(self.vit_positions) if self.vit_positions else ints([])),
            vit_token_seqlens=torch.tensor(self.vit_seqlens, dtype=torch.int32),
            padded_images=padded,
            patchified_vae_latent_shapes=self.vae_shapes,
            packed_latent_position_ids=(torch.cat(self.vae_positions) if self.vae_positions else ints([])),
            packed_vae_token_indexes=ints(self.vae_indexes),
            vae_image_noised=self.vae_noised,
            mse_loss_indexes=ints(self.mse_indexes),
            num_samples=len(self.sample_lens),
            sample_keys=keys,
        )


class BagelCollator:
    """Packs processed samples into one `BagelPackedBatch` (no padding; backends pad if they must)."""

    def __init__(
        self,
        job_config: Any,
        bagel_config: Any,
        *,
        vit_patch_size: int,
        vae_downsample: int,
        special_tokens: SpecialTokens | None = None,
        tokenizer_path: str | None = None,
        latent_cache: LatentCache | None = None,
    ):
        """`special_tokens` (or `tokenizer_path`, to look them up like the processor) gives the ids of
        <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>; without either they come from
        `[model] tokenizer_path`."""
        if special_tokens is None:
            from .processor import load_tokenizer

            path = tokenizer_path or job_config.model.tokenizer_path or job_config.model.pretrained_path
            if not path:
                raise ValueError("BagelCollator needs the special token ids: set [model] tokenizer_path")
            special_tokens = load_tokenizer(path)[1]
        self.special = special_tokens
        self.vit_max_num_patch_per_side = int(bagel_config.vit_max_num_patch_per_side)
        self.max_latent_size = int(bagel_config.max_latent_size)
        self.interpolate_pos = bool(getattr(bagel_config, "interpolate_pos", False))
        self.vit_feature_dim = vit_patch_size * vit_patch_size * 3
        self.vae_downsample = vae_downsample
        self.latent_patch_size = int(bagel_config.latent_patch_size)
        self.latent_cache = latent_cache
        """`[bagel] latent_cache` of the model's VAE: the batch carries the stored moments."""

    def __call__(self, samples: Sequence[BagelSample]) -> BagelPackedBatch:
        if not samples:
            raise ValueError("cannot collate an empty pack")
        builder = _Builder(
            self.special, self.vit_max_num_patch_per_side, self.max_latent_size, self.interpolate_pos
        )
        for sample in samples:
            builder.add(sample)
        batch = builder.build([s.key for s in samples], self.vit_feature_dim)
        if self.latent_cache is not None and batch.patchified_vae_latent_shapes:
            attach_cached_moments(batch, samples, self.latent_cache, self.latent_patch_size)
        return batch


def attach_cached_moments(
    batch: BagelPackedBatch, samples: Sequence[BagelSample], cache: LatentCache, latent_patch_size: int
) -> None:
    """Put the latent cache's moments of the batch's VAE images into `batch.vae_moments` (zero
    padded like `padded_images`) and say per image why one was not served; the pixels stay in the
    batch only when some image must still be encoded."""
    p = latent_patch_size
    images = [
        (sample.key, i, seg)
        for sample in samples
        for i, seg in enumerate(s for s in sample.segments if isinstance(s, VaeSegment))
    ]
    h_max, w_max = (max(s[k] for s in batch.patchified_vae_latent_shapes) * p for k in (0, 1))
    moments, misses = None, []
    for n, (key, i, seg) in enumerate(images):
        h, w = seg.grid
        found = cache.get(content_key(seg.image), (h * p, w * p))
        if found.moments is None:
            where = f"VAE image {i} of sample {key}"
            misses.append(miss_message(cache, where, found.reason, (seg.image.shape[1], seg.image.shape[2])))
            continue
        misses.append("")
        if moments is None:
            moments = torch.zeros(len(images), found.moments.shape[0], h_max, w_max, dtype=cache.dtype)
        moments[n, :, : h * p, : w * p] = found.moments
    batch.vae_moments = moments
    batch.vae_cache_misses = misses
    batch.latent_cache_tag = cache.tag
    if not any(misses):
        batch.padded_images = None
