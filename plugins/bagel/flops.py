"""Training FLOPs of one packed batch (for MFU): 3x the forward's matmul FLOPs.

- LLM dense: every token through one expert's projections and MLP (und and gen experts have the
  same shapes), `lm_head` only on CE positions.
- LLM attention: QK^T and PV over the pairs the mask rule actually lets see each other, counted
  per document and segment (never the whole pack as one causal sequence).
- ViT per image: patch embedding, layers (full attention inside the image), connector.
- Latent path: vae2llm, timestep MLP, llm2vae on noised tokens. The frozen VAE is not counted.
"""

from __future__ import annotations

from typing import Sequence

from .batch import BagelPackedBatch, documents_of
from .config import BagelArchitecture, BagelConfig

TRAIN_FACTOR = 3
"""Forward + backward = 3x forward (backward computes input and weight gradients)."""


def visible_pairs(segments: Sequence[tuple[int, str]]) -> int:
    """(query, key) pairs one document's mask rule allows: a query sees earlier non-noise
    segments whole, and its own segment causally (text) or entirely (full, noise)."""
    pairs, visible_before = 0, 0
    for length, mode in segments:
        own = length * (length + 1) // 2 if mode == "causal" else length * length
        pairs += length * visible_before + own
        if mode != "noise":
            visible_before += length
    return pairs


def llm_layer_linear_params(arch: BagelArchitecture) -> int:
    """Weights one token meets in one decoder layer (one expert): q, k, v, o and the MLP."""
    llm = arch.llm
    q = llm.hidden_size * llm.num_heads * llm.head_dim
    kv = 2 * llm.hidden_size * llm.num_kv_heads * llm.head_dim
    o = llm.num_heads * llm.head_dim * llm.hidden_size
    return q + kv + o + 3 * llm.hidden_size * llm.intermediate_size


def vit_layer_linear_params(arch: BagelArchitecture) -> int:
    vit = arch.vit
    return 4 * vit.hidden_size * vit.hidden_size + 2 * vit.hidden_size * vit.intermediate_size


def forward_flops(batch: BagelPackedBatch, arch: BagelArchitecture, options: BagelConfig) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward over `batch`."""
    llm, vit, d = arch.llm, arch.vit, arch.llm.hidden_size
    flops = 2 * batch.sequence_length * llm.num_layers * llm_layer_linear_params(arch)
    pairs = sum(
        visible_pairs(doc) for doc in documents_of(batch.sample_lens, batch.split_lens, batch.attn_modes)
    )
    flops += 4 * pairs * llm.num_heads * llm.head_dim * llm.num_layers
    flops += 2 * batch.num_ce_tokens * d * llm.vocab_size

    assert batch.vit_attention is not None  # built by BagelPackedBatch.__post_init__
    vit_lengths = batch.vit_attention.doc_lengths  # host-side: no device sync
    num_vit = sum(vit_lengths)
    patch_dim = vit.patch_size * vit.patch_size * vit.num_channels
    flops += 2 * num_vit * (patch_dim * vit.hidden_size + vit.num_layers * vit_layer_linear_params(arch))
    flops += 4 * sum(n * n for n in vit_lengths) * vit.hidden_size * vit.num_layers
    flops += 2 * num_vit * (vit.hidden_size * d + d * d)

    num_vae = int(batch.packed_vae_token_indexes.shape[0])
    p_dim = options.latent_patch_size**2 * arch.vae.z_channels
    flops += 2 * num_vae * (p_dim * d + 256 * d + d * d)
    flops += 2 * batch.num_mse_tokens * d * p_dim
    return flops


def training_flops(batch: BagelPackedBatch, arch: BagelArchitecture, options: BagelConfig) -> int:
    """Forward + backward FLOPs of one packed batch."""
    return TRAIN_FACTOR * forward_flops(batch, arch, options)
