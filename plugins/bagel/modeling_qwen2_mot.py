"""Qwen2 decoder with Mixture-of-Transformers (MoT) experts, over one packed sequence.

Understanding tokens (text and ViT) go through the plain weights, generation tokens (VAE latents)
through the `_moe_gen` twin of every per-token module; attention is one joint attention over the
whole pack through the configured attention backend. Between layers the residual stream stays
split per expert (`MoTRouting.split` once before the first layer, `merge` after the last): only
attention needs the pack order, so each layer merges its queries, keys and values and splits the
attention output. In 16-bit compute each expert's rows are padded with zero rows to a multiple of
`ROW_MULTIPLE` (fewer distinct matrix shapes over a run); merging drops the padding. Module
names equal the release's state-dict keys
(`language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`, ...).

`freeze_und` is the release's option of that name: the understanding tokens' activations are
detached wherever they enter the computation (each layer's input, their queries, keys and values,
the final norm), so no gradient reaches the understanding experts, the embeddings, the ViT or the
connector; generation tokens still attend to them, and the `lm_head` still learns from the CE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._dynamo.decorators import mark_unbacked
import torch.nn.functional as F
from torch import nn

from bagel_titan.protocols import AttentionLayerSpec, AttentionModule
from bagel_titan_plugins.attention.meta import AttentionMeta

from .config import LLMArgs

AttentionFactory = Callable[[AttentionLayerSpec], AttentionModule[AttentionMeta]]


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in fp32, result cast back before the weight multiplies, in the
    input's dtype (as with bf16 parameters, also when autocast computes over fp32 ones)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


ROW_MULTIPLE = 64
"""In 16-bit compute, the row counts of the per-token matrix products (each expert's rows, the
heads' inputs) are padded with zero rows up to a multiple of this, so a run meets a handful of
shapes instead of new ones with every pack: oneDNN builds its bf16 CPU kernels per shape (about
4 ms each against 0.4 ms for a cached one; a sixth of the anchors' bf16 step). fp32 kernels
(MKL, cuBLAS) are not built per shape, so fp32 does not pad (padding cost the fp32 step 3-5%).
On a GPU the padding is at most 2 x 63 rows a pack. Padding rows never reach the pack:
attention, the outputs and the gradients see real rows only."""


def row_multiple(x: torch.Tensor) -> int:
    """`ROW_MULTIPLE` when `x`'s matrix products run in a 16-bit dtype (its own or autocast's),
    else 1."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return ROW_MULTIPLE if dtype in (torch.bfloat16, torch.float16) else 1


def padded_rows(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def on_padded_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` for a row-wise `fn`, computed over `x` padded with zero rows to a multiple of
    `row_multiple(x)`; the padding rows of the result are dropped (so their gradient is zero)."""
    n = x.shape[0]
    extra = padded_rows(n, row_multiple(x)) - n
    if extra == 0:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(extra, *x.shape[1:])]))[:n]


@dataclass
class MoTRouting:
    """Which tokens of the pack go to which expert; built once per batch.

    The understanding positions (text, ViT) and the generation positions (all VAE tokens)
    partition [0, T). The experts work on a grouped layout: the understanding rows, then the
    generation rows, each padded to a multiple of `row_multiple` (1: no padding). `split` takes a
    [T, ...] pack tensor to the grouped layout (zero padding rows), `merge` takes grouped rows
    back to pack order (dropping the padding).
    """

    order: torch.Tensor
    """[P] int64 pack position of every grouped row (padding rows: position 0, then zeroed)."""
    inverse: torch.Tensor
    """[T] int64 grouped row of every pack position."""
    padding: torch.Tensor | None
    """[P] bool, true on the padding rows of the grouped layout; None without padding. A mask, not
    row ranges: a compiled layer would specialize on a range's length (recompiling when it is 0 or
    1)."""
    und_rows: int
    """Grouped rows of the understanding expert, padding included."""

    @classmethod
    def build(
        cls, und: torch.Tensor, gen: torch.Tensor, num_tokens: int, row_multiple: int = 1
    ) -> "MoTRouting":
        num_und, num_gen = und.numel(), gen.numel()
        if num_und + num_gen != num_tokens:
            raise ValueError(
                f"MoT routing covers {num_und + num_gen} positions but the pack has {num_tokens} tokens: "
                f"every token must be text, ViT or VAE (check packed_text_indexes / "
                f"packed_vit_token_indexes / packed_vae_token_indexes)"
            )
        und_rows, gen_rows = padded_rows(num_und, row_multiple), padded_rows(num_gen, row_multiple)
        fill_und, fill_gen = und.new_zeros(und_rows - num_und), und.new_zeros(gen_rows - num_gen)
        order = torch.cat([und, fill_und, gen, fill_gen])
        rows = torch.arange(max(und_rows, gen_rows), device=order.device)
        inverse = torch.empty(num_tokens, dtype=order.dtype, device=order.device)
        inverse[und] = rows[:num_und]
        inverse[gen] = rows[:num_gen] + und_rows
        padding = None
        if row_multiple > 1:
            padding = torch.cat([rows[:und_rows] >= num_und, rows[:gen_rows] >= num_gen])
        return cls(order, inverse, padding, und_rows)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = _GatherRows.apply(x, self.order, self.inverse, self.padding, None)
        # A split, not two slices: each slice's backward would zero-fill a gradient of all rows.
        x_und, x_gen = grouped.split([self.und_rows, grouped.shape[0] - self.und_rows])
        return x_und, x_gen

    def merge(self, x_und: torch.Tensor, x_gen: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(torch.cat([x_und, x_gen]), self.inverse, self.order, None, self.padding)


class _GatherRows(torch.autograd.Function):
    """`x.index_select(0, index)`, whose backward gathers the gradient with `back_index` (the
    inverse map): the same values as indexing's backward (a zero-filled scatter with
    accumulation), without the scatter, which runs serially on CPU and took up to 1/10 of a small
    model's step. Rows marked by `zero_out` are zeroed in the result (grouping: the padding
    rows), rows marked by `zero_grad` in the gradient (ungrouping: the padding's gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        index: torch.Tensor,
        back_index: torch.Tensor,
        zero_out: torch.Tensor | None,
        zero_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(back_index, zero_grad)
        return _zero_rows(x.index_select(0, index), zero_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        back_index, zero_grad = ctx.saved_tensors
        return _zero_rows(grad.index_select(0, back_index), zero_grad), None, None, None, None


def _zero_rows(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`rows` ([P, ...]) with the rows that `mask` ([P] bool) marks set to zero."""
    if mask is None:
        return rows
    return rows.masked_fill(mask.view(-1, *[1] * (rows.dim() - 1)), 0)


@dataclass
class HeadRows:
    """The rows the heads read (CE and MSE positions), as rows of each expert's grouped layout in
    the heads' order, padded like the experts' rows (`ROW_MULTIPLE`, with row 0).

    The last decoder layer finishes only these rows: every row's keys and values feed the
    attention, but the other rows' attention output, o_proj and MLP in that layer would reach
    no loss. Exact for the rows kept; a saving of about (1 - kept share) / num_layers of the
    per-token work (the anchors' 4-layer model: 6%; 28 layers: about 1%)."""

    und: torch.Tensor
    gen: torch.Tensor
    num_und: int
    """Real rows of `und` (the rest is padding)."""
    num_gen: int

    @classmethod
    def build(
        cls, routing: MoTRouting, und_positions: torch.Tensor, gen_positions: torch.Tensor, multiple: int = 1
    ) -> "HeadRows":
        """`und_positions` and `gen_positions`: pack positions of understanding and generation
        tokens respectively (what `MoTRouting.inverse` maps to grouped rows)."""

        def rows(index: torch.Tensor, n: int) -> torch.Tensor:
            extra = padded_rows(n, multiple) - n
            return torch.cat([index, index.new_zeros(extra)]) if extra else index

        num_und, num_gen = und_positions.numel(), gen_positions.numel()
        und, gen = (
            rows(routing.inverse[und_positions], num_und),
            rows(routing.inverse[gen_positions] - routing.und_rows, num_gen),
        )
        for index in (und, gen):
            # A compiled last layer then never specialises on these counts (0 or 1 rows, or a
            # count that happens to equal another size of the first pack): no recompile per pack.
            mark_unbacked(index, 0)
        return cls(und, gen, num_und, num_gen)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, head_dim] fp32 cos and sin of Qwen2's default RoPE."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs_TF = position_ids.float()[:, None] * inv_freq[None, :]
    emb_TD = torch.cat([freqs_TF, freqs_TF], dim=-1)
    return emb_TD.cos(), emb_TD.sin()


@dataclass
class ExpertRotary:
    """RoPE's cos and sin rows of each expert's tokens (`MoTRouting.split` of the [T, head_dim]
    tables), built once per forward: queries and keys are rotated per expert, before the merge."""

    cos_und: torch.Tensor
    sin_und: torch.Tensor
    cos_gen: torch.Tensor
    sin_gen: torch.Tensor

    @classmethod
    def build(cls, routing: "MoTRouting", cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> "ExpertRotary":
        cos_und, cos_gen = routing.split(cos_TD)
        sin_und, sin_gen = routing.split(sin_TD)
        return cls(cos_und, sin_und, cos_gen, sin_gen)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    return x_THD * cos_TD[:, None, :] + _rotate_half(x_THD) * sin_TD[:, None, :]


class Qwen2MLP(nn.Module):
    """SwiGLU MLP without biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _frozen(x: torch.Tensor, freeze: bool) -> torch.Tensor:
    return x.detach() if freeze else x


def _in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in autocast's dtype when autocast is on (bf16 on one rank over fp32 weights), else as is.

    The residual stream enters the decoder through this: under autocast it then runs in bf16, as
    it does with FSDP2's bf16 parameters on several ranks and in the release, instead of in fp32
    on one rank only (the anchors' bf16 check step: loss 1.7e-5 and grad norm 9e-6 from the
    release's, against 1.0e-4 and 3.8e-4 with an fp32 stream); and every normed activation
    reaches its projections already cast, once, not once per projection."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class PackedAttentionMoT(nn.Module):
    """Joint attention with per-expert q/k/v/o projections and per-expert qk-norm."""

    o_proj: nn.Linear  # set per expert in __init__ (with setattr, like the other projections)
    o_proj_moe_gen: nn.Linear

    def __init__(
        self, args: LLMArgs, layer_index: int, attention_factory: AttentionFactory, freeze_und: bool = False
    ):
        super().__init__()
        self.freeze_und = freeze_und
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        d, q_dim, kv_dim = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, d, bias=False))
            norm = (lambda: RMSNorm(self.head_dim, args.rms_norm_eps)) if args.qk_norm else nn.Identity
            setattr(self, f"q_norm{suffix}", norm())
            setattr(self, f"k_norm{suffix}", norm())
        self.attn_core = attention_factory(
            AttentionLayerSpec(
                num_heads=args.num_heads,
                num_kv_heads=args.num_kv_heads,
                head_dim=args.head_dim,
                hidden_size=d,
                layer_index=layer_index,
                role="decoder",
            )
        )

    def _qkv(
        self, x_ND: torch.Tensor, suffix: str, cos_ND: torch.Tensor, sin_ND: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x_ND.shape[0]
        q_NHD = getattr(self, f"q_proj{suffix}")(x_ND).view(n, self.num_heads, self.head_dim)
        k_NHD = getattr(self, f"k_proj{suffix}")(x_ND).view(n, self.num_kv_heads, self.head_dim)
        v_NHD = getattr(self, f"v_proj{suffix}")(x_ND).view(n, self.num_kv_heads, self.head_dim)
        # qk-norm and RoPE run in fp32 (as the release does), attention in the compute dtype; both
        # act per token, so they run before the merge, which then moves compute-dtype rows.
        q_NHD = apply_rotary(getattr(self, f"q_norm{suffix}")(q_NHD.float()), cos_ND, sin_ND)
        k_NHD = apply_rotary(getattr(self, f"k_norm{suffix}")(k_NHD.float()), cos_ND, sin_ND)
        return q_NHD.to(v_NHD.dtype), k_NHD.to(v_NHD.dtype), v_NHD

    def forward(
        self,
        x_und: torch.Tensor,
        x_gen: torch.Tensor,
        routing: MoTRouting,
        rotary: ExpertRotary,
        meta: AttentionMeta,
        rows: HeadRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's attention output for its rows, or for `rows` only when given."""
        q_und, k_und, v_und = (
            _frozen(t, self.freeze_und) for t in self._qkv(x_und, "", rotary.cos_und, rotary.sin_und)
        )
        q_gen, k_gen, v_gen = self._qkv(x_gen, "_moe_gen", rotary.cos_gen, rotary.sin_gen)
        q_THD, k_THD, v_THD = (
            routing.merge(u, g) for u, g in ((q_und, q_gen), (k_und, k_gen), (v_und, v_gen))
        )
        hidden_TD = routing.merge(x_und, x_gen) if self.attn_core.uses_hidden else None
        out_THD = self.attn_core(q_THD, k_THD, v_THD, meta, hidden_TD)
        out_und, out_gen = routing.split(out_THD.reshape(out_THD.shape[0], self.num_heads * self.head_dim))
        if rows is not None:
            out_und, out_gen = out_und.index_select(0, rows.und), out_gen.index_select(0, rows.gen)
        return self.o_proj(out_und), self.o_proj_moe_gen(out_gen)


class Qwen2MoTDecoderLayer(nn.Module):
    """One decoder layer: every norm and MLP has an understanding and a generation expert."""

    def __init__(
        self, args: LLMArgs, layer_index: int, attention_factory: AttentionFactory, freeze_und: bool = False
    ):
        super().__init__()
        self.freeze_und = freeze_und
        self.self_attn = PackedAttentionMoT(args, layer_index, attention_factory, freeze_und)
        self.mlp = Qwen2MLP(args.hidden_size, args.intermediate_size)
        self.mlp_moe_gen = Qwen2MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        h_und: torch.Tensor,
        h_gen: torch.Tensor,
        routing: MoTRouting,
        rotary: ExpertRotary,
        meta: AttentionMeta,
        rows: HeadRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's rows of the residual stream in, the same rows out (the stream stays
        split between layers: only attention needs the pack order); only `rows` out when given."""
        h_und = _frozen(h_und, self.freeze_und)
        a_und, a_gen = self.self_attn(
            self.input_layernorm(h_und),
            self.input_layernorm_moe_gen(h_gen),
            routing,
            rotary,
            meta,
            rows,
        )
        if rows is not None:
            h_und, h_gen = h_und.index_select(0, rows.und), h_gen.index_select(0, rows.gen)
        h_und, h_gen = h_und + a_und, h_gen + a_gen
        h_und = h_und + self.mlp(self.post_attention_layernorm(h_und))
        h_gen = h_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h_gen))
        return h_und, h_gen


class Qwen2MoTModel(nn.Module):
    """Embeddings, decoder layers and the per-expert final norm (`model.*` keys)."""

    def __init__(self, args: LLMArgs, attention_factory: AttentionFactory, freeze_und: bool = False):
        super().__init__()
        self.args = args
        self.freeze_und = freeze_und
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2MoTDecoderLayer(args, i, attention_factory, freeze_und) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        h_TD: torch.Tensor,
        routing: MoTRouting,
        position_ids: torch.Tensor,
        meta: AttentionMeta,
        layer_outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run every layer on the packed input embeddings; returns the final-normed hidden states.
        `layer_outputs`, when given, collects each layer's residual stream (parity checks)."""
        h_und, h_gen = self.final_rows(h_TD, routing, position_ids, meta, None, layer_outputs)
        return routing.merge(h_und, h_gen)

    def final_rows(
        self,
        h_TD: torch.Tensor,
        routing: MoTRouting,
        position_ids: torch.Tensor,
        meta: AttentionMeta,
        rows: HeadRows | None,
        layer_outputs: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's final-normed rows: all (grouped layout, padding included), or the
        `rows` only, in their order and without their padding (the last layer finishes no
        other row)."""
        if rows is not None and layer_outputs is not None:
            raise ValueError("layer_outputs collects every row of every layer; pass rows = None with it")
        rotary = ExpertRotary.build(
            routing, *rotary_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta)
        )
        h_und, h_gen = routing.split(_in_compute_dtype(h_TD))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if rows is not None and i == last:
                h_und, h_gen = layer(h_und, h_gen, routing, rotary, meta, rows)
            else:
                h_und, h_gen = layer(h_und, h_gen, routing, rotary, meta)
            if layer_outputs is not None:
                layer_outputs.append(routing.merge(h_und, h_gen))
        h_und, h_gen = _frozen(self.norm(h_und), self.freeze_und), self.norm_moe_gen(h_gen)
        if rows is not None:
            h_und, h_gen = h_und[: rows.num_und], h_gen[: rows.num_gen]
        return h_und, h_gen


class Qwen2MoTForCausalLM(nn.Module):
    """The `language_model` of BAGEL: decoder plus an untied `lm_head`."""

    def __init__(self, args: LLMArgs, attention_factory: AttentionFactory, freeze_und: bool = False):
        super().__init__()
        if args.tie_word_embeddings:
            raise ValueError("tie_word_embeddings = true is not supported: BAGEL's lm_head is untied")
        self.model = Qwen2MoTModel(args, attention_factory, freeze_und)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
