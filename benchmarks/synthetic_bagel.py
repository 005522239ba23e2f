"""Synthetic `BagelPackedBatch`es with the release's packing layout, without data or tokenizer.

For tests, benchmarks and FLOP/throughput checks that must not depend on the data pipeline. A
sample is a list of segments:

- `Text(n, loss)`: `<|im_start|>` + n ids + `<|im_end|>`, causal; with `loss`, the start token and
  every id predict the next token (the last id predicts `<|im_end|>`).
- `VitImage(h, w)`: `<|vision_start|>` + h*w ViT patches + `<|vision_end|>`, full, one shared
  position, then the position moves on.
- `VaeImage(h, w, noised)`: same framing over h*w latent patches; `noise` mode (generation target,
  position does not move on) or `full` (clean condition, timestep -inf, no loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from bagel_titan_plugins.bagel.batch import BagelPackedBatch
from bagel_titan_plugins.bagel.config import BagelArchitecture, BagelConfig, architecture_for
from bagel_titan_plugins.bagel.modeling import Bagel
from bagel_titan_plugins.bagel.spec import build_bagel


@dataclass(frozen=True)
class Text:
    num_ids: int
    loss: bool = True


@dataclass(frozen=True)
class VitImage:
    h: int
    w: int


@dataclass(frozen=True)
class VaeImage:
    h: int
    w: int
    noised: bool = True


Segment = Union[Text, VitImage, VaeImage]


def synthetic_batch(
    arch: BagelArchitecture,
    options: BagelConfig,
    samples: Sequence[Sequence[Segment]],
    generator: torch.Generator | None = None,
) -> BagelPackedBatch:
    """Pack `samples` (lists of segments) into one batch with random ids and pixels.

    Special ids are the last four of the vocabulary (start, end, vision start, vision end).
    Timesteps and noise are left to the model (drawn from its generator).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vocab = arch.llm.vocab_size
    bos, eos, vis_start, vis_end = vocab - 4, vocab - 3, vocab - 2, vocab - 1
    p_vit, ds, p_lat = arch.vit.patch_size, arch.vae.downsample, options.latent_patch_size
    text_ids: list[int] = []
    text_idx: list[int] = []
    pos_ids: list[int] = []
    labels: list[int] = []
    ce_idx: list[int] = []
    ce_w: list[float] = []
    vit_idx: list[int] = []
    vit_pos: list[int] = []
    vit_lens: list[int] = []
    vae_idx: list[int] = []
    lat_pos: list[int] = []
    mse_idx: list[int] = []
    vae_shapes: list[tuple[int, int]] = []
    noised_flags: list[bool] = []
    sample_lens: list[int] = []
    split_lens: list[int] = []
    modes: list[str] = []
    cursor = 0

    def add_text(token: int, position: int) -> None:
        nonlocal cursor
        text_ids.append(token)
        text_idx.append(cursor)
        pos_ids.append(position)
        cursor += 1

    for sample in samples:
        start, rope = cursor, 0
        for seg in sample:
            seg_start = cursor
            if isinstance(seg, Text):
                ids = torch.randint(0, vocab - 4, (seg.num_ids,), generator=g).tolist()
                for tok in [bos] + ids + [eos]:
                    add_text(tok, rope)
                    rope += 1
                if seg.loss:
                    ce_idx += list(range(seg_start, seg_start + seg.num_ids + 1))
                    labels += ids + [eos]
                    ce_w += [1.0 / (seg.num_ids + 1) ** 0.5] * (seg.num_ids + 1)
                modes.append("causal")
            else:
                add_text(vis_start, rope)
                n = seg.h * seg.w
                rows, cols = torch.meshgrid(torch.arange(seg.h), torch.arange(seg.w), indexing="ij")
                if isinstance(seg, VitImage):
                    vit_idx += list(range(cursor, cursor + n))
                    vit_pos += (rows * options.vit_max_num_patch_per_side + cols).flatten().tolist()
                    vit_lens.append(n)
                    mode = "full"
                else:
                    vae_idx += list(range(cursor, cursor + n))
                    lat_pos += (rows * options.max_latent_size + cols).flatten().tolist()
                    vae_shapes.append((seg.h, seg.w))
                    noised_flags.append(seg.noised)
                    if seg.noised:
                        mse_idx += list(range(cursor, cursor + n))
                    mode = "noise" if seg.noised else "full"
                pos_ids += [rope] * n
                cursor += n
                add_text(vis_end, rope)
                if mode != "noise":
                    rope += 1
                modes.append(mode)
            split_lens.append(cursor - seg_start)
        sample_lens.append(cursor - start)

    vit_tokens = torch.rand(len(vit_idx), p_vit * p_vit * arch.vit.num_channels, generator=g) * 2 - 1
    padded_images = None
    if vae_shapes:
        hmax = max(h for h, _ in vae_shapes) * p_lat * ds
        wmax = max(w for _, w in vae_shapes) * p_lat * ds
        padded_images = torch.zeros(len(vae_shapes), arch.vae.in_channels, hmax, wmax)
        for i, (h, w) in enumerate(vae_shapes):
            hp, wp = h * p_lat * ds, w * p_lat * ds
            padded_images[i, :, :hp, :wp] = torch.rand(arch.vae.in_channels, hp, wp, generator=g) * 2 - 1
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return BagelPackedBatch(
        sequence_length=cursor,
        sample_lens=sample_lens,
        split_lens=split_lens,
        attn_modes=modes,
        packed_text_ids=long(text_ids),
        packed_text_indexes=long(text_idx),
        packed_position_ids=long(pos_ids),
        packed_label_ids=long(labels),
        ce_loss_indexes=long(ce_idx),
        ce_loss_weights=torch.tensor(ce_w, dtype=torch.float32),
        packed_vit_tokens=vit_tokens,
        packed_vit_token_indexes=long(vit_idx),
        packed_vit_position_ids=long(vit_pos),
        vit_token_seqlens=torch.tensor(vit_lens, dtype=torch.int32),
        padded_images=padded_images,
        patchified_vae_latent_shapes=vae_shapes,
        packed_latent_position_ids=long(lat_pos),
        packed_vae_token_indexes=long(vae_idx),
        vae_image_noised=noised_flags,
        mse_loss_indexes=long(mse_idx),
        num_samples=len(samples),
    )


def build_bagel_for_tests(flavor: str = "debug", seed: int = 0, **options: Any) -> Bagel:
    """A materialised, randomly initialised fp32 CPU model with eager attention."""
    model = build_bagel(architecture_for(flavor), BagelConfig(**options))
    torch.manual_seed(seed)
    model.init_weights()
    return model
