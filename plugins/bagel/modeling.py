"""The BAGEL top module: ViT + connector, latent projections, timestep embedder, MoT LLM.

`Bagel.forward(batch, generator)` runs one `BagelPackedBatch` end to end and returns the
tensors the loss components need. Submodule names equal the release's keys, so that
`state_dict()` is the official layout (`connector.fc1.weight`, `time_embedder.mlp.0.weight`,
`vit_pos_embed.pos_embed`, ...). The frozen VAE is a plain attribute (`model.vae`), not a
submodule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from bagel_titan.distributed.tensor_io import assign_full
from bagel_titan.errors import UserError
from bagel_titan.protocols import AttentionLayerSpec, AttentionModule
from bagel_titan_plugins.attention.meta import AttentionMeta

from .batch import BagelPackedBatch
from .config import BagelArchitecture, BagelConfig
from .modeling_qwen2_mot import (
    HeadRows,
    MoTRouting,
    Qwen2MoTForCausalLM,
    RMSNorm,
    on_padded_rows,
    row_multiple,
)
from .siglip_navit import SiglipVisionModel
from .latent_cache import LatentCacheMiss, vae_folder_name
from .vae import FrozenVAE

logger = logging.getLogger(__name__)

AttentionFactory = Callable[[AttentionLayerSpec], AttentionModule[AttentionMeta]]


def sincos_2d_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, embed_dim] fixed 2-D sin-cos table of the release (computed in float64).

    Row index = row * grid_size + col; the first half of the channels encodes the column, the
    second half the row; each half is [sin(pos*w_k), cos(pos*w_k)], w_k = 1e4^(-k/(d/4)).
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()


class PositionEmbedding(nn.Module):
    """A fixed sin-cos table stored as a frozen parameter (`pos_embed`), as in the release."""

    def __init__(self, grid_size: int, hidden_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(torch.zeros(grid_size**2, hidden_size), requires_grad=False)

    def table(self) -> torch.Tensor:
        return sincos_2d_table(self.pos_embed.shape[1], self.grid_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256 cos/sin frequencies -> MLP (`mlp.0`, SiLU, `mlp.2`)."""

    frequency_size = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half
        )
        args_NF = t_N.float()[:, None] * freqs[None]
        emb_NF = torch.cat([torch.cos(args_NF), torch.sin(args_NF)], dim=-1)
        return self.mlp(emb_NF.to(next(self.mlp.parameters()).dtype))


class MLPconnector(nn.Module):
    """ViT features -> LLM width: fc1, gelu(tanh), fc2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class BagelForwardResult:
    """Everything one forward computes that a loss or a parity check reads."""

    ce_logits: torch.Tensor | None
    pred_velocity: torch.Tensor | None
    target_velocity: torch.Tensor | None
    intermediates: dict[str, torch.Tensor] = field(default_factory=dict)
    """With `keep_intermediates`: every row of every stage by name ("last_hidden_state", ...);
    without it the last layer finishes only the rows the heads read (`HeadRows`)."""


def flow_timesteps(raw_N: torch.Tensor, shift: float) -> torch.Tensor:
    """Raw N(0,1) draws (-inf for clean conditions) -> t in [0, 1): t = s*sig/(1+(s-1)*sig)."""
    sigma = torch.sigmoid(raw_N)
    return shift * sigma / (1 + (shift - 1) * sigma)


def patchify_latents(padded_latent: torch.Tensor, shapes: list[tuple[int, int]], p: int) -> torch.Tensor:
    """[n, C, H, W] padded latents -> [sum(h*w), p*p*C] tokens (crop to (h*p, w*p) per image)."""
    channels = padded_latent.shape[1]
    tokens = []
    for latent, (h, w) in zip(padded_latent, shapes):
        latent = latent[:, : h * p, : w * p].reshape(channels, h, p, w, p)
        tokens.append(torch.einsum("chpwq->hwpqc", latent).reshape(-1, p * p * channels))
    return torch.cat(tokens, dim=0)


def first_attention_core(layers: nn.ModuleList) -> AttentionModule[AttentionMeta]:
    """The attention module of the first of `layers`: the batch's metadata prepares it once for
    all of them (they share one backend and its per-batch cache)."""
    attention = layers[0].self_attn
    assert isinstance(attention, nn.Module)
    core = attention.attn_core
    assert isinstance(core, AttentionModule)
    return core


class Bagel(nn.Module):
    """BAGEL for training on packed batches (see module docstring)."""

    def __init__(
        self,
        arch: BagelArchitecture,
        options: BagelConfig,
        llm_attention: AttentionFactory,
        vit_attention: AttentionFactory,
    ):
        super().__init__()
        options.validate(arch)
        self.arch, self.options = arch, options
        d = arch.llm.hidden_size
        self.hidden_size = d
        self.language_model = Qwen2MoTForCausalLM(arch.llm, llm_attention, options.freeze_und)
        self.latent_channels = arch.vae.z_channels
        self.patch_latent_dim = options.latent_patch_size**2 * arch.vae.z_channels
        if options.visual_gen:
            self.time_embedder = TimestepEmbedder(d)
            self.vae2llm = nn.Linear(self.patch_latent_dim, d)
            self.llm2vae = nn.Linear(d, self.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(options.max_latent_size, d)
        if options.visual_und:
            self.vit_model = SiglipVisionModel(arch.vit, vit_attention)
            self.connector = MLPconnector(arch.vit.hidden_size, d)
            self.vit_pos_embed = PositionEmbedding(options.vit_max_num_patch_per_side, d)
        # Plain attribute: not a submodule (frozen, never sharded, never in state_dict()).
        self.vae = FrozenVAE(arch.vae, options.vae_dtype) if options.visual_gen else None
        self.tokenizer_path = ""
        """Folder whose tokenizer files an export copies (set by the model spec)."""
        self.latent_cache_encoded = 0
        """Images encoded because the latent cache had no entry (`latent_cache_miss = "encode"`)."""

    # -- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def reset_position_tables(self) -> None:
        """Fill the fixed sin-cos tables (they are recomputed, never trained or required)."""
        for table in (getattr(self, "latent_pos_embed", None), getattr(self, "vit_pos_embed", None)):
            if table is not None:
                assign_full(table.pos_embed, table.table())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh-model init: normal(init_std) weights, zero biases, unit norms, zero `llm2vae`,
        sin-cos tables; the VAE gets materialised with PyTorch's default init."""
        std = self.options.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if isinstance(module, nn.LayerNorm) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.options.visual_gen:
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)
        self.reset_position_tables()
        for module in self.modules():  # attention cores with parameters of their own (NSA)
            if isinstance(module, AttentionModule):
                module.reset_parameters()
        if self.vae is not None:
            self.vae.materialize(self.language_model.lm_head.weight.device)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        batch: BagelPackedBatch,
        generator: torch.Generator | None = None,
        keep_intermediates: bool = False,
        noised: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BagelForwardResult:
        """One packed batch -> CE logits, predicted and target velocities (and, with
        `keep_intermediates`, the intermediates, the last hidden state of every row included).

        Timesteps and noise are drawn with `generator` unless the batch carries them; VAE
        latents come from the frozen VAE unless the batch carries `padded_latent`. A sampler
        passes `noised` = (x_t [Nz, P] latent tokens, t [Nz] shifted timesteps) instead: the
        batch's VAE images, timesteps and noise are then unused and `target_velocity` is None.
        """
        inter: dict[str, torch.Tensor] = {}
        keep = (lambda k, v: inter.__setitem__(k, v)) if keep_intermediates else (lambda k, v: None)
        embed = self.language_model.model.embed_tokens
        device = embed.weight.device
        text_ND = embed(batch.packed_text_ids)
        seq_TD = text_ND.new_zeros((batch.sequence_length, self.hidden_size))
        seq_TD = seq_TD.index_copy(0, batch.packed_text_indexes, text_ND)

        # A modality that is on always runs, even with zero tokens in this pack: every rank then
        # reaches the same FSDP units in backward (no hang) and the gradients are zero, not None.
        num_vit = int(batch.packed_vit_tokens.shape[0])
        if self.options.visual_und:
            vit_meta = batch.vit_attention
            assert vit_meta is not None  # built by BagelPackedBatch.__post_init__
            vit_meta.prepare_for(first_attention_core(self.vit_model.vision_model.encoder.layers))
            pixels_NP = batch.packed_vit_tokens
            if num_vit == 0:  # any [0, ...] placeholder: give it the patch width
                pixels_NP = pixels_NP.new_zeros(
                    0, self.vit_model.vision_model.embeddings.patch_embedding.in_features
                )
            with record_function("bagel/vit"):
                vit_ND = self.vit_model(pixels_NP, batch.packed_vit_position_ids, vit_meta)
            keep("vit_output", vit_ND)
            conn_ND = self.connector(vit_ND)
            keep("connector_output", conn_ND)
            vit_in_ND = conn_ND + self.vit_pos_embed(batch.packed_vit_position_ids).to(conn_ND.dtype)
            seq_TD = seq_TD.index_copy(0, batch.packed_vit_token_indexes, vit_in_ND.to(seq_TD.dtype))
        elif num_vit > 0:
            raise ValueError(
                "the batch holds ViT tokens but [bagel] visual_und = false; enable it or drop "
                "understanding images in the processor"
            )

        pred_velocity = target_velocity = None
        num_vae = len(batch.patchified_vae_latent_shapes)
        if self.options.visual_gen:
            if noised is None:
                x0_NP, t_N, noise_NP = self._latent_inputs(batch, generator, device)
                keep("packed_latent_clean", x0_NP)
                xt_NP = (1 - t_N[:, None]) * x0_NP + t_N[:, None] * noise_NP
                target_velocity = (noise_NP - x0_NP)[batch.noised_vae_tokens]
            else:
                xt_NP, t_N = noised
            keep("timesteps_shifted", t_N)
            keep("noisy_latent_tokens", xt_NP)
            temb_ND = on_padded_rows(self.time_embedder, t_N)
            keep("timestep_embeds", temb_ND)
            vae_in_ND = (
                on_padded_rows(self.vae2llm, xt_NP.to(self.vae2llm.weight.dtype))
                + temb_ND
                + self.latent_pos_embed(batch.packed_latent_position_ids).to(temb_ND.dtype)
            )
            seq_TD = seq_TD.index_copy(0, batch.packed_vae_token_indexes, vae_in_ND.to(seq_TD.dtype))
        elif num_vae > 0:
            raise ValueError(
                "the batch holds VAE images but [bagel] visual_gen = false; enable it or drop "
                "generation samples in the processor"
            )
        keep("llm_input_sequence", seq_TD)

        und = batch.packed_text_indexes
        if num_vit > 0:
            und = torch.cat([und, batch.packed_vit_token_indexes])
        routing = MoTRouting.build(
            und, batch.packed_vae_token_indexes, batch.sequence_length, row_multiple(seq_TD)
        )
        meta = batch.attention
        assert meta is not None  # built by BagelPackedBatch.__post_init__
        meta.prepare_for(first_attention_core(self.language_model.model.layers))
        llm = self.language_model.model
        with record_function("bagel/llm"):
            if keep_intermediates:  # every row of every layer, for parity checks
                layer_outputs: list[torch.Tensor] = []
                hidden_TD = llm(seq_TD, routing, batch.packed_position_ids, meta, layer_outputs)
                for i, out in enumerate(layer_outputs):
                    keep(f"llm_layer_{i}_output", out)
                keep("last_hidden_state", hidden_TD)
                ce_ND, mse_ND = hidden_TD[batch.ce_loss_indexes], hidden_TD[batch.mse_loss_indexes]
            else:
                rows = HeadRows.build(
                    routing, batch.ce_loss_indexes, batch.mse_loss_indexes, row_multiple(seq_TD)
                )
                ce_ND, mse_ND = llm.final_rows(seq_TD, routing, batch.packed_position_ids, meta, rows)

        with record_function("bagel/heads"):
            if self.options.visual_gen:
                pred_velocity = on_padded_rows(self.llm2vae, mse_ND)
            ce_logits = on_padded_rows(self.language_model.lm_head, ce_ND)
        return BagelForwardResult(ce_logits, pred_velocity, target_velocity, inter)

    def _latent_inputs(
        self, batch: BagelPackedBatch, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latent tokens x0, shifted timesteps t per token, and noise (all [Nz, ...])."""
        p, side = self.options.latent_patch_size, self.options.max_latent_size
        if not batch.patchified_vae_latent_shapes:
            empty = torch.zeros(0, self.patch_latent_dim, device=device)
            return empty, empty[:, 0], empty
        for i, (h, w) in enumerate(batch.patchified_vae_latent_shapes):
            if h > side or w > side:
                raise ValueError(
                    f"VAE image {i} of the pack is {h}x{w} latent patches, more than [bagel] max_latent_size = "
                    f"{side} per side; raise max_latent_size (the sin-cos table grows) or lower the processor's "
                    f"vae_max_size"
                )
        padded = batch.padded_latent
        if padded is None:
            if self.vae is None:
                raise ValueError(
                    "the batch has VAE images but the model has no VAE ([bagel] visual_gen = false)"
                )
            with record_function("bagel/vae_encode"):
                padded = self.vae.sample_padded(self._vae_moments(self.vae, batch), generator)
        x0_NP = patchify_latents(padded.float(), list(batch.patchified_vae_latent_shapes), p)
        device = x0_NP.device
        raw_t = batch.packed_timesteps
        if raw_t is None:
            counts = [h * w for h, w in batch.patchified_vae_latent_shapes]
            draws = torch.randn(len(counts), generator=generator, device=device)
            clean = torch.tensor([not n for n in batch.vae_image_noised], device=device)
            draws = draws.masked_fill(clean, float("-inf"))
            raw_t = torch.repeat_interleave(
                draws, torch.tensor(counts, device=device), output_size=sum(counts)
            )
        noise = batch.noise
        if noise is None:
            noise = torch.randn(x0_NP.shape, generator=generator, device=device, dtype=x0_NP.dtype)
        return x0_NP, flow_timesteps(raw_t.float(), self.options.timestep_shift), noise.to(x0_NP.dtype)

    def _vae_moments(self, vae: FrozenVAE, batch: BagelPackedBatch) -> torch.Tensor:
        """[n, 2z, h_max, w_max] posterior moments of the pack's VAE images (zero padded).

        Each image is encoded alone, at its own size (not the release's padded batch: there the
        encoder's GroupNorm statistics include the padding, so an image's latents depend on its
        pack-mates; see docs/differences_from_release.md), or taken from the latent cache, which
        stored exactly that. Both give the same bits, so the cache does not change training."""
        p, ds = self.options.latent_patch_size, self.arch.vae.downsample
        shapes = list(batch.patchified_vae_latent_shapes)
        cached = batch.vae_moments
        encode = list(range(len(shapes)))
        if batch.vae_cache_misses:  # a batch of a `[bagel] latent_cache` run
            if cached is not None:
                own = vae_folder_name(vae.identity(), vae.dtype_for(cached.device))
                if batch.latent_cache_tag != own:
                    raise UserError(
                        f"the latent cache served moments of VAE {batch.latent_cache_tag}, but this model's VAE "
                        f"is {own}; run bagel-titan-encode-latents again with this run's config"
                    )
            encode = [i for i, why in enumerate(batch.vae_cache_misses) if why]
            if encode:
                self._cache_misses([batch.vae_cache_misses[i] for i in encode])
        if not encode and cached is not None:
            return cached
        if batch.padded_images is None:
            raise ValueError("the batch has VAE images to encode but no padded_images")
        images = batch.padded_images
        h_max, w_max = (max(s[k] for s in shapes) * p for k in (0, 1))
        moments = None if cached is None else cached.clone()  # the batch may be served again
        for i in encode:
            h, w = shapes[i]
            one = vae.moments_of(images[i, :, : h * p * ds, : w * p * ds])
            if moments is None:
                moments = one.new_zeros(len(shapes), one.shape[0], h_max, w_max)
            moments[i, :, : h * p, : w * p] = one
        if moments is None:
            raise ValueError("the batch has VAE shapes but no VAE images")
        return moments

    def _cache_misses(self, misses: list[str]) -> None:
        """Images the latent cache did not serve: an error, or encoded here and counted."""
        if self.options.latent_cache_miss == "error":
            raise LatentCacheMiss(misses[0])
        self.latent_cache_encoded += len(misses)
        if self.latent_cache_encoded == len(misses) or self.latent_cache_encoded % 1000 < len(misses):
            logger.warning(
                f"latent cache: {self.latent_cache_encoded} image(s) encoded so far because the cache had no "
                f"entry (latest: {misses[-1]})"
            )
