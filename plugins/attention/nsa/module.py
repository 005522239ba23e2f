"""The per-layer NSA module (its parameters) and the `nsa` backend.

Parameters (ordinary `nn.Parameter`s, so checkpoints and exports carry them):

- ``compress_key`` / ``compress_value``: the compression weights (absent for avgpool);
- ``intra_block_pe`` [Hkv, kernel_size, D]: position encoding inside a compression window;
- ``gates.{compressed,selected,sliding}.{weight,bias}`` ([Hq, hidden], [Hq]): per-token,
  per-head sigmoid gates of the three branches.

A pretrained dense checkpoint has none of them: `optional_state_keys` names them so a loader
can accept their absence, and `reset_parameters()` gives the near-dense start described in
`NSAConfig.gate_init_bias` (compression = window mean, gates favouring the selected branch).
"""

from __future__ import annotations


import torch
from torch import nn

from bagel_titan.protocols import AttentionBackend, AttentionLayerSpec, AttentionModule

from ..meta import AttentionMeta
from ..sdpa import sdpa_gqa
from .compress import compress, init_mean_pool_, weight_shape
from .config import NSAConfig
from .plan import NSAPlan, nsa_plan
from .reference import NSABranches, nsa_document
from .triton_path import nsa_streams_triton, triton_unusable_reason

BRANCHES = ("compressed", "selected", "sliding")


class NSAAttention(AttentionModule[AttentionMeta]):
    """Native sparse attention for the causal queries of a packed batch, exact attention for
    the others (see `plan.py`). Called as ``module(q_THD, k_THD, v_THD, meta, hidden_TD)``."""

    uses_hidden = True  # its gates read the layer input

    def __init__(self, spec: AttentionLayerSpec, config: NSAConfig):
        super().__init__()
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(
                f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})"
            )
        self.spec = spec
        self.config = config
        shape = weight_shape(config.compress_type, spec.num_kv_heads, config.kernel_size, spec.head_dim)
        if shape is None:
            self.register_parameter("compress_key", None)
            self.register_parameter("compress_value", None)
        else:
            self.compress_key = nn.Parameter(torch.empty(shape))
            self.compress_value = nn.Parameter(torch.empty(shape))
        self.intra_block_pe = nn.Parameter(torch.empty(spec.num_kv_heads, config.kernel_size, spec.head_dim))
        self.gates = nn.ModuleDict(
            {branch: nn.Linear(spec.hidden_size, spec.num_heads) for branch in BRANCHES}
        )
        self.reset_parameters()

    @property
    def optional_state_keys(self) -> tuple[str, ...]:
        """State-dict keys (relative to this module) that a dense checkpoint lacks."""
        return tuple(name for name, _ in self.named_parameters())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The near-dense start: mean-pool compression, zero position encoding, gates from
        `gate_init_bias` alone (zero weights). Does nothing on the meta device; works on
        FSDP-sharded (DTensor) parameters."""
        if self.intra_block_pe.is_meta:
            return
        cfg = self.config
        for weight in (self.compress_key, self.compress_value):
            if weight is not None:
                init_mean_pool_(weight, cfg.compress_type, cfg.kernel_size)
        self.intra_block_pe.zero_()
        for branch, gate in self.gates.items():
            assert isinstance(gate, nn.Linear)
            gate.weight.zero_()
            gate.bias.fill_(cfg.gate_init_bias if branch == "selected" else -cfg.gate_init_bias)

    # -- branches ---------------------------------------------------------------------------

    def _use_triton(self, q: torch.Tensor) -> bool:
        cfg = self.config
        if cfg.implementation == "torch":
            return False
        reason = triton_unusable_reason(cfg, q.device, q.dtype)
        if cfg.implementation == "triton" and reason is not None:
            raise RuntimeError(
                f'[attention.nsa] implementation = "triton" cannot run: {reason}; '
                f'use implementation = "auto" or "torch"'
            )
        return reason is None

    def stream_branches(
        self,
        q_SHD: torch.Tensor,
        k_SKD: torch.Tensor,
        v_SKD: torch.Tensor,
        plan: NSAPlan,
        meta: AttentionMeta,
    ) -> NSABranches:
        """The three branch outputs [S, Hq, D] over the batch's causal key streams."""
        cfg = self.config
        if self._use_triton(q_SHD):
            return nsa_streams_triton(
                q_SHD,
                k_SKD,
                v_SKD,
                self.compress_key,
                self.compress_value,
                self.intra_block_pe,
                cfg,
                plan,
                meta,
            )
        per_doc: list[NSABranches] = []
        start = 0
        for length in plan.stream_lengths:  # host ints: no device sync
            end = start + length
            k_LKD, v_LKD = k_SKD[start:end], v_SKD[start:end]
            k_cmp = compress(
                k_LKD,
                self.compress_key,
                cfg.compress_type,
                cfg.kernel_size,
                cfg.kernel_stride,
                self.intra_block_pe,
            )
            v_cmp = compress(
                v_LKD, self.compress_value, cfg.compress_type, cfg.kernel_size, cfg.kernel_stride
            )
            per_doc.append(nsa_document(q_SHD[start:end], k_LKD, v_LKD, k_cmp, v_cmp, cfg))
            start = end
        return NSABranches(*(torch.cat([b[i] for b in per_doc], dim=0) for i in range(len(BRANCHES))))

    def gate_values(self, hidden_CD: torch.Tensor) -> torch.Tensor:
        """[C, 3, Hq] sigmoid gates of the causal queries (branches in `BRANCHES` order)."""
        dtype = next(self.gates.parameters()).dtype
        logits = [self.gates[branch](hidden_CD.to(dtype)) for branch in BRANCHES]
        return torch.sigmoid(torch.stack(logits, dim=1).float())

    # -- forward ----------------------------------------------------------------------------

    def prepare(self, meta: AttentionMeta) -> None:
        nsa_plan(meta)

    @torch.compiler.disable
    def forward(
        self,
        q_THD: torch.Tensor,
        k_THD: torch.Tensor,
        v_THD: torch.Tensor,
        meta: AttentionMeta,
        hidden_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gated NSA for causal queries, exact attention for the others; padding gives zeros.

        Kept out of torch.compile: its index plans and per-document shapes change every batch
        (a recompile each step), and its heavy parts are kernels or per-document loops.
        """
        if hidden_TD is None:
            raise ValueError(
                "the nsa attention backend needs hidden_TD (the layer's input hidden states) for its gates"
            )
        plan = nsa_plan(meta)
        rows: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        if plan.causal_rows.numel():
            idx = plan.stream_index
            branches = self.stream_branches(q_THD[idx], k_THD[idx], v_THD[idx], plan, meta)
            gate_CBH = self.gate_values(hidden_TD[plan.causal_rows])
            mixed_CHD = gate_CBH[:, 0, :, None] * branches[0][plan.causal_in_stream].float()
            for i in range(1, len(branches)):
                mixed_CHD = mixed_CHD + gate_CBH[:, i, :, None] * branches[i][plan.causal_in_stream].float()
            rows.append(plan.causal_rows)
            values.append(mixed_CHD.to(q_THD.dtype))

        for call in plan.exact_calls:
            q_1HRD = q_THD[call.rows].transpose(0, 1).unsqueeze(0)
            k_1KLD = k_THD[call.start : call.end].transpose(0, 1).unsqueeze(0)
            v_1KLD = v_THD[call.start : call.end].transpose(0, 1).unsqueeze(0)
            rows.append(call.rows)
            values.append(sdpa_gqa(q_1HRD, k_1KLD, v_1KLD, call.mask_RL).squeeze(0).transpose(0, 1))

        out_THD = q_THD.new_zeros(q_THD.shape)
        if not rows:
            return out_THD
        return out_THD.index_copy(0, torch.cat(rows), torch.cat(values))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"compress_type={c.compress_type!r}, block_size={c.block_size}, kernel={c.kernel_size}/{c.kernel_stride}, "
            f"topk={c.topk}, init_blocks={c.init_blocks}, local_blocks={c.local_blocks}, window={c.window_size}"
        )


class NSABackend(AttentionBackend):
    """The `nsa` attention backend (LLM only: the ViT uses `encoder_fallback`)."""

    name = "nsa"
    config_section = "attention.nsa"
    encoder_fallback = "sdpa"

    def build(self, spec: AttentionLayerSpec, config: NSAConfig | None) -> NSAAttention:
        if spec.role != "decoder":
            raise ValueError(
                f"the nsa backend serves causal decoder attention, not role {spec.role!r}; set the encoder's "
                f'backend (BAGEL: [bagel] vit_backend) to "{self.encoder_fallback}", "flex" or "eager" (empty uses {self.encoder_fallback!r})'
            )
        return NSAAttention(spec, config or NSAConfig())
