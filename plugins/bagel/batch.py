"""The packed batch the BAGEL collator emits and the BAGEL model consumes.

Field names follow the public implementation's forward arguments (and the reference fixture),
so that a reader of either can map one to the other. Index tensors point into the packed
sequence of `sequence_length` real tokens (no flex padding here: backends pad if they must).

The batch carries its layout work done: the attention metadata of the LLM and the ViT and the
index of the noised VAE tokens are built when the batch is made (by the collator, in a loader
worker), from host-side lengths, so the model's forward neither loops over tokens nor waits for
the device to learn a length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from bagel_titan_plugins.attention.meta import AttentionMeta


@dataclass
class BagelPackedBatch:
    sequence_length: int
    """L: real tokens in the pack."""
    sample_lens: list[int]
    """Length of every sample (document) in the pack; sums to L."""
    split_lens: list[int]
    """Length of every contiguous segment; sums to L."""
    attn_modes: list[str]
    """Mode of every segment: "causal", "full" or "noise"."""
    packed_text_ids: torch.Tensor
    """[Nt] int64 ids of text and special tokens."""
    packed_text_indexes: torch.Tensor
    """[Nt] int64 their positions in [0, L)."""
    packed_position_ids: torch.Tensor
    """[L] int64 RoPE positions (restart at 0 per sample; an image shares one position)."""
    packed_label_ids: torch.Tensor
    """[Nc] int64 CE targets."""
    ce_loss_indexes: torch.Tensor
    """[Nc] int64 positions whose hidden state predicts `packed_label_ids`."""
    ce_loss_weights: torch.Tensor
    """[Nc] float32 per-label weights (1/sqrt(len) for re-weighting; 1.0 for special tokens)."""
    # -- understanding images (ViT) --
    packed_vit_tokens: torch.Tensor
    """[Nv, p*p*3] patchified pixels in [-1, 1], feature order (py, px, c)."""
    packed_vit_token_indexes: torch.Tensor
    """[Nv] positions in [0, L)."""
    packed_vit_position_ids: torch.Tensor
    """[Nv] row * vit_max_num_patch_per_side + col."""
    vit_token_seqlens: torch.Tensor
    """[n_vit] int32 tokens per ViT image."""
    # -- VAE images (generation targets and clean conditions) --
    padded_images: torch.Tensor | None
    """[n_vae, 3, Hmax, Wmax] pixels in [-1, 1], zero padded; the frozen VAE encodes each image
    on its own (cropped to its size). None in a batch whose every image the latent cache served."""
    patchified_vae_latent_shapes: list[tuple[int, int]]
    """Per VAE image (h, w) in latent patches."""
    packed_latent_position_ids: torch.Tensor
    """[Nz] row * max_latent_size + col."""
    packed_vae_token_indexes: torch.Tensor
    """[Nz] positions of all VAE tokens (clean and noised)."""
    vae_image_noised: list[bool]
    """Per VAE image: True for a generation target (noised, MSE), False for a clean condition."""
    mse_loss_indexes: torch.Tensor
    """[Nm] positions of the noised VAE tokens."""
    # -- optional overrides (the parity fixture records them; training draws them) --
    padded_latent: torch.Tensor | None = None
    """[n_vae, C, h, w] already-encoded latents (scaled and shifted); skips the VAE encoder."""
    packed_timesteps: torch.Tensor | None = None
    """[Nz] raw timesteps (N(0,1) per noised image, -inf for clean); drawn in forward if None."""
    noise: torch.Tensor | None = None
    """[Nz, P] flow-matching noise; drawn in forward if None."""
    # -- the latent cache (`[bagel] latent_cache`; see latent_cache.py) --
    vae_moments: torch.Tensor | None = None
    """[n_vae, 2z, h, w] posterior moments served by the latent cache (the VAE's dtype, zero
    padded; zeros for an image without an entry): the model samples them instead of encoding."""
    vae_cache_misses: list[str] = field(default_factory=list)
    """Per VAE image of a cached batch: "" when its moments are in `vae_moments`, else why not (the
    model raises it, or encodes the image from `padded_images`, per `latent_cache_miss`)."""
    latent_cache_tag: str = ""
    """The cache's VAE and dtype the moments belong to; the model checks it names its own VAE."""
    num_samples: int = 0
    """Samples in the pack (documents)."""
    sample_keys: list = field(default_factory=list)
    """(dataset, index) of every sample, for logging and exact-resume checks."""
    # -- derived from the fields above when the batch is made (None: build them) --
    attention: AttentionMeta | None = None
    """The LLM's attention metadata: documents = samples, segments = (split_lens, attn_modes)."""
    vit_attention: AttentionMeta | None = None
    """The ViT's attention metadata: one `full` document per image (`vit_token_seqlens`)."""
    noised_vae_tokens: torch.Tensor | None = None
    """[Nm] int64 positions among the packed VAE tokens of the noised ones (in the order of
    `mse_loss_indexes`): where the flow-matching targets are taken."""

    def __post_init__(self) -> None:
        if self.attention is None:
            self.attention = AttentionMeta.from_segments(
                documents_of(self.sample_lens, self.split_lens, self.attn_modes),
                device=self.packed_position_ids.device,
                position_ids=self.packed_position_ids,
            )
        if self.vit_attention is None:
            lengths = self.vit_token_seqlens.cpu().tolist()  # made on the host: no device sync
            self.vit_attention = AttentionMeta.full_documents(lengths, device=self.vit_token_seqlens.device)
        if self.noised_vae_tokens is None:
            counts = torch.tensor([h * w for h, w in self.patchified_vae_latent_shapes], dtype=torch.long)
            noised = torch.repeat_interleave(torch.tensor(self.vae_image_noised, dtype=torch.bool), counts)
            self.noised_vae_tokens = noised.nonzero().flatten().to(self.packed_position_ids.device)

    @property
    def num_tokens(self) -> int:
        return self.sequence_length

    @property
    def num_ce_tokens(self) -> int:
        return int(self.packed_label_ids.shape[0])

    @property
    def num_mse_tokens(self) -> int:
        return int(self.mse_loss_indexes.shape[0])

    def to(self, device: torch.device | str) -> "BagelPackedBatch":
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
            elif isinstance(value, AttentionMeta):
                value = value.to(device)
            values[f.name] = value
        return BagelPackedBatch(**values)


def documents_of(
    sample_lens: list[int], split_lens: list[int], attn_modes: list[str]
) -> list[list[tuple[int, str]]]:
    """Group the pack's segments into its samples; a segment may not straddle two samples."""
    if sum(sample_lens) != sum(split_lens) or len(split_lens) != len(attn_modes):
        raise ValueError(
            f"inconsistent pack: sum(sample_lens) = {sum(sample_lens)}, sum(split_lens) = {sum(split_lens)}, "
            f"{len(split_lens)} split_lens vs {len(attn_modes)} attn_modes"
        )
    docs: list[list[tuple[int, str]]] = []
    splits = iter(zip(split_lens, attn_modes))
    for length in sample_lens:
        doc, filled = [], 0
        while filled < length:
            n, mode = next(splits)
            doc.append((n, mode))
            filled += n
        if filled != length:
            raise ValueError(
                f"a segment straddles two samples (sample_lens={sample_lens}, split_lens={split_lens})"
            )
        docs.append(doc)
    return docs
