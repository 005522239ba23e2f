"""SigLIP NaViT vision encoder over packed patches of several images (per-image full attention).

Module names equal the release's keys under `vit_model.vision_model.*`; the patch embedding is
the release's Linear (converted from the Conv2d) with input feature order (py, px, c).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bagel_titan.protocols import AttentionLayerSpec, AttentionModule
from bagel_titan_plugins.attention.meta import AttentionMeta

from .config import ViTArgs

AttentionFactory = Callable[[AttentionLayerSpec], AttentionModule[AttentionMeta]]


class SiglipVisionEmbeddings(nn.Module):
    """Patch projection plus a learned absolute position embedding indexed by flattened ids."""

    def __init__(self, args: ViTArgs):
        super().__init__()
        self.patch_embedding = nn.Linear(
            args.patch_size * args.patch_size * args.num_channels, args.hidden_size
        )
        self.position_embedding = nn.Embedding(args.patches_per_side**2, args.hidden_size)

    def forward(self, pixels_NP: torch.Tensor, position_ids_N: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(
            pixels_NP.to(self.patch_embedding.weight.dtype)
        ) + self.position_embedding(position_ids_N)


class SiglipAttention(nn.Module):
    def __init__(self, args: ViTArgs, layer_index: int, attention_factory: AttentionFactory):
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        d = args.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.attn_core = attention_factory(
            AttentionLayerSpec(
                num_heads=args.num_heads,
                num_kv_heads=args.num_heads,
                head_dim=args.head_dim,
                hidden_size=d,
                layer_index=layer_index,
                role="encoder",
            )
        )

    def forward(self, x_ND: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        n = x_ND.shape[0]
        q_NHD = self.q_proj(x_ND).view(n, self.num_heads, self.head_dim)
        k_NHD = self.k_proj(x_ND).view(n, self.num_heads, self.head_dim)
        v_NHD = self.v_proj(x_ND).view(n, self.num_heads, self.head_dim)
        out_NHD = self.attn_core(q_NHD, k_NHD, v_NHD, meta, x_ND)
        return self.out_proj(out_NHD.reshape(n, self.num_heads * self.head_dim))


class SiglipMLP(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block (a sharding unit)."""

    def __init__(self, args: ViTArgs, layer_index: int, attention_factory: AttentionFactory):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = SiglipAttention(args, layer_index, attention_factory)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = SiglipMLP(args)

    def forward(self, x_ND: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        x_ND = x_ND + self.self_attn(self.layer_norm1(x_ND), meta)
        return x_ND + self.mlp(self.layer_norm2(x_ND))


class SiglipEncoder(nn.Module):
    def __init__(self, args: ViTArgs, attention_factory: AttentionFactory):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(args, i, attention_factory) for i in range(args.num_layers)
        )


class SiglipVisionTransformer(nn.Module):
    def __init__(self, args: ViTArgs, attention_factory: AttentionFactory):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(args)
        self.encoder = SiglipEncoder(args, attention_factory)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def forward(
        self, pixels_NP: torch.Tensor, position_ids_N: torch.Tensor, meta: AttentionMeta
    ) -> torch.Tensor:
        x_ND = self.embeddings(pixels_NP, position_ids_N)
        for layer in self.encoder.layers:
            x_ND = layer(x_ND, meta)
        return self.post_layernorm(x_ND)


class SiglipVisionModel(nn.Module):
    """`vit_model`: holds `vision_model` so that keys read `vit_model.vision_model.*`."""

    def __init__(self, args: ViTArgs, attention_factory: AttentionFactory):
        super().__init__()
        self.args = args
        self.vision_model = SiglipVisionTransformer(args, attention_factory)

    def forward(
        self, pixels_NP: torch.Tensor, position_ids_N: torch.Tensor, meta: AttentionMeta
    ) -> torch.Tensor:
        """[N, p*p*3] packed patches of every image -> [N, Dv] (last layer + post_layernorm);
        `meta` holds one full-attention document per image."""
        return self.vision_model(pixels_NP, position_ids_N, meta)
