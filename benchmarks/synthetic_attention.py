"""Synthetic packed batches for checking and benchmarking attention backends.

A pack mimics BAGEL's: documents made of text (``causal``), ViT images (``full``), clean VAE
conditions (``full``) and generated VAE images (``noise``), followed by padding. Used by the
attention tests and `benchmarks/bench_attention.py`, so both exercise the same shapes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from bagel_titan_plugins.attention.meta import AttentionMeta


def random_document(rng: random.Random, length: int, image_fraction: float = 0.5) -> list[tuple[int, str]]:
    """Segments of one document of exactly `length` tokens (length >= 1).

    Starts with text, then mixes text and images (``full`` or ``noise``, sometimes adjacent, as
    an editing condition next to a generated image) so every rule of the mask is exercised;
    `image_fraction` is roughly the share of image segments.
    """
    segments: list[tuple[int, str]] = []
    left = length
    while left > 0:
        if segments and rng.random() < image_fraction:
            mode = rng.choice(("full", "noise"))
        else:
            mode = "causal"
        n = min(left, rng.randint(1, max(1, length // 3)))
        segments.append((n, mode))
        left -= n
    return segments


def random_pack(
    rng: random.Random, num_tokens: int, num_docs: int, pad: int = 0
) -> list[list[tuple[int, str]]]:
    """`num_docs` random documents with `num_tokens` real tokens in all (`pad` is not included)."""
    if num_docs > num_tokens:
        raise ValueError(f"cannot split {num_tokens} tokens into {num_docs} documents")
    cuts = sorted(rng.sample(range(1, num_tokens), num_docs - 1))
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [num_tokens])]
    return [random_document(rng, n) for n in lengths]


@dataclass
class AttentionInputs:
    """q/k/v of one synthetic pack and its metadata."""

    q_THD: torch.Tensor
    k_THD: torch.Tensor
    v_THD: torch.Tensor
    hidden_TD: torch.Tensor
    meta: AttentionMeta


def random_inputs(
    documents: list[list[tuple[int, str]]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int = 32,
    pad: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> AttentionInputs:
    """Random q/k/v/hidden for `documents` followed by `pad` padding tokens."""
    real = sum(n for doc in documents for n, _ in doc)
    meta = AttentionMeta.from_segments(documents, pad_to=real + pad, device=device)
    T = meta.num_tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    return AttentionInputs(
        q_THD=rand(T, num_heads, head_dim),
        k_THD=rand(T, num_kv_heads, head_dim),
        v_THD=rand(T, num_kv_heads, head_dim),
        hidden_TD=rand(T, hidden_size),
        meta=meta,
    )
