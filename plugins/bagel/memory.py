"""Activation memory of one BAGEL pack, for the planner (`bagel-titan-estimate`).

A pack of T tokens is split, by assumption, into generation latents, ViT patches and text; the
split is printed with the plan. The default is a unified-training pack: half generation latents
(one 1024 px image is 4096 latent tokens), a quarter ViT patches, a quarter text (the CE tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from bagel_titan.metrics.memory_estimate import ActivationEstimate

from .config import BagelArchitecture, BagelConfig


@dataclass(frozen=True)
class PackMix:
    """Fractions of a pack's tokens by kind (the rest is text)."""

    generation: float = 0.5
    vit: float = 0.25


def _layer_saved(tokens: int, hidden: int, kv: int, intermediate: int, compute_bytes: int) -> int:
    """What one pre-norm transformer layer saves for backward: the two norms' outputs, q/k/v,
    attention output, o_proj and residual, the MLP's gate, up, activation, product and down
    projections, and the fp32 statistics of the norms."""
    return tokens * ((7 * hidden + 2 * kv + 4 * intermediate) * compute_bytes + 2 * 4)


EAGER_BACKENDS = ("eager",)
"""Backends that materialise fp32 [heads, T, T] scores: two copies are saved for backward (the
softmax and its NaN-cleaned output; backward's score gradients replace them one for one). The
fused backends (flex, sdpa's flash/efficient kernels, nsa) keep O(T) statistics only."""


def _scores(heads: int, tokens: int) -> int:
    return heads * tokens * tokens * 4


def activation_memory(
    arch: BagelArchitecture,
    options: BagelConfig,
    tokens: int,
    compute_bytes: int,
    activation_checkpointing: bool,
    mix: PackMix = PackMix(),
    llm_backend: str = "flex",
    vit_backend: str = "flex",
) -> ActivationEstimate:
    llm, vit = arch.llm, arch.vit
    n_vit = int(tokens * mix.vit) if options.visual_und else 0
    n_gen = int(tokens * mix.generation) if options.visual_gen else 0
    n_text = tokens - n_vit - n_gen
    kv = llm.num_kv_heads * (llm.hidden_size // llm.num_heads)
    llm_layer = _layer_saved(tokens, llm.hidden_size, kv, llm.intermediate_size, compute_bytes)
    # MoT: tokens are split into the two experts and put back in pack order (two extra copies).
    llm_layer += 2 * tokens * llm.hidden_size * compute_bytes
    vit_layer = _layer_saved(n_vit, vit.hidden_size, vit.hidden_size, vit.intermediate_size, compute_bytes)
    llm_scores = _scores(llm.num_heads, tokens) if llm_backend in EAGER_BACKENDS else 0
    vit_scores = _scores(vit.num_heads, n_vit) if vit_backend in EAGER_BACKENDS else 0
    llm_layer += 2 * llm_scores
    vit_layer += 2 * vit_scores
    if activation_checkpointing:
        saved = (
            llm.num_layers * tokens * llm.hidden_size + vit.num_layers * n_vit * vit.hidden_size
        ) * compute_bytes
    else:
        saved = llm.num_layers * llm_layer + vit.num_layers * vit_layer
    # Backward of a layer holds its saved tensors and, at most, as much again in gradients.
    working = 2 * max(llm_layer, vit_layer) if activation_checkpointing else max(llm_layer, vit_layer)
    # Outside the units: embeddings, final norm, the CE logits (compute dtype, an fp32 copy for
    # the loss and its gradient), the connector and the velocity head.
    outputs = tokens * llm.hidden_size * compute_bytes * 3
    outputs += n_text * llm.vocab_size * (compute_bytes + 4 + 4)
    outputs += n_vit * (vit.hidden_size + 2 * llm.hidden_size) * compute_bytes
    outputs += n_gen * llm.hidden_size * compute_bytes * 2
    notes = (
        f"{tokens} tokens per pack: {n_gen} generation latents, {n_vit} ViT patches, {n_text} text; "
        f"{'full AC' if activation_checkpointing else 'no AC'}, {llm_backend} attention"
    )
    return ActivationEstimate(saved, working, outputs, notes)
