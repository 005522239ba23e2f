"""The packed batch the BAGEL collator emits and the BAGEL model consumes.

Field names follow the public implementation's forward arguments (and the reference fixture),
so that a reader of either can map one to the other. Index tensors point into the packed
sequence of `sequence_length` real tokens (no flex padding here: backends pad if they must).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


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
    """[n_vae, 3, Hmax, Wmax] pixels in [-1, 1], zero padded; the frozen VAE encodes them."""
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
    num_samples: int = 0
    """Samples in the pack (documents)."""
    sample_keys: list = field(default_factory=list)
    """(dataset, index) of every sample, for logging and exact-resume checks."""

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
            values[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return BagelPackedBatch(**values)
