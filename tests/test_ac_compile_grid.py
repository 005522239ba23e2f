"""The AC x compile x backend grid on CPU, at test size.

`eager` + full activation checkpointing + compile once failed in backward with "CheckpointError:
Recomputed values for the following tensors have different metadata than during the forward
pass". The cause: the eager backend built the batch's [T, T] mask lazily, on the first layer's
first call, and cached it on the attention metadata. The compiled forward of a checkpointed
layer then traced the mask's construction (a cache miss), while its recomputation in backward
found the mask cached, so dynamo guarded into another graph that saves other tensors (the
recomputed list is shifted against the saved one). Fixed by building every per-batch mask and
plan before the layers (`AttentionMeta.prepare_for`, called by the model once per batch).

The tests here are fast: the first checks that rule for every backend that trains on CPU (no
per-batch state may appear inside a layer, forward or recomputation), the second runs the fixed
cell itself on one decoder layer. The whole model per cell is in `test_compile_ac.py` (slow) and
the full grid through the trainer in `benchmarks/bench_train_step.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bagel_titan.config.job_config import ActivationCheckpoint
from bagel_titan.distributed.activation_checkpoint import apply_activation_checkpointing
from bagel_titan.distributed.compile import apply_compile
from bagel_titan_plugins.attention.eager import EagerBackend
from bagel_titan_plugins.attention.meta import AttentionMeta
from bagel_titan_plugins.attention.nsa.config import NSAConfig
from bagel_titan_plugins.attention.nsa.module import NSABackend
from bagel_titan_plugins.attention.sdpa import SDPABackend, SDPAConfig
from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for
from bagel_titan_plugins.bagel.modeling_qwen2_mot import (
    ExpertRotary,
    ROW_MULTIPLE,
    MoTRouting,
    Qwen2MoTDecoderLayer,
    rotary_cos_sin,
)
from bagel_titan_plugins.bagel.spec import BagelSpec, build_bagel
from synthetic_bagel import Text, VaeImage, VitImage, synthetic_batch

ARCH = architecture_for("debug")
OPTS = BagelConfig()
PACK = [[VitImage(3, 4), Text(4, loss=False), Text(5)], [Text(3, loss=False), VaeImage(2, 3)], [Text(6)]]


@dataclasses.dataclass
class Configured:
    """A registered backend built with its fixed typed section (e.g. one sdpa strategy)."""

    backend: object
    config: object

    def build(self, spec, config):
        return self.backend.build(spec, self.config)


# Every backend that trains on CPU (flex is refused there at config load), sdpa per strategy.
CPU_BACKENDS = {
    "eager": (EagerBackend(), None),
    "sdpa-dense": (Configured(SDPABackend(), SDPAConfig(strategy="dense")), None),
    "sdpa-per-document": (Configured(SDPABackend(), SDPAConfig(strategy="per_document")), None),
    "nsa": (
        Configured(
            NSABackend(), NSAConfig(block_size=4, kernel_size=4, kernel_stride=2, topk=4, window_size=8)
        ),
        SDPABackend(),
    ),
}


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_no_per_batch_state_is_built_inside_a_checkpointed_layer(name):
    """Whatever a backend caches on the batch's metadata exists before the first layer runs and
    nothing is added by the layers, in the forward or in the recomputation during backward."""
    backend, vit_backend = CPU_BACKENDS[name]
    torch.manual_seed(0)
    model = build_bagel(ARCH, OPTS, backend=backend, vit_backend=vit_backend)
    model.init_weights()
    units = BagelSpec().sharding_units(model)
    apply_activation_checkpointing(model, units, ActivationCheckpoint(mode="full"))
    batch = synthetic_batch(ARCH, OPTS, PACK, torch.Generator().manual_seed(0))
    metas = {"llm": batch.attention, "vit": batch.vit_attention}
    seen: dict[str, set[str]] = {}

    def snapshot(key):  # before the tower's first layer first runs
        def hook(module, args) -> None:
            seen.setdefault(key, set(metas[key]._cache))

        return hook

    hooks = [
        model.language_model.model.layers[0].register_forward_pre_hook(snapshot("llm")),
        model.vit_model.vision_model.encoder.layers[0].register_forward_pre_hook(snapshot("vit")),
    ]
    result = model(batch, torch.Generator().manual_seed(1))
    loss = (
        result.ce_logits.logsumexp(-1).mean() + (result.pred_velocity - result.target_velocity).pow(2).mean()
    )
    loss.backward()
    for hook in hooks:
        hook.remove()

    assert seen["llm"] and seen["vit"], f"{name}: nothing prepared before the layers: {seen}"
    for key, meta in metas.items():
        added = set(meta._cache) - seen[key]
        assert not added, f"{name}: built inside the {key}'s checkpointed layers: {sorted(added)}"


def _pack(layout: list[list[tuple[int, str, str]]], seed: int, row_multiple: int = 1):
    """Layer inputs for documents of (length, segment mode, expert) runs: hidden states,
    MoT routing (experts' rows padded to `row_multiple`), RoPE tables, attention metadata."""
    segments = [[(n, mode) for n, mode, _ in doc] for doc in layout]
    experts = [expert for doc in layout for n, _, expert in doc for _ in range(n)]
    num_tokens = len(experts)
    und = torch.tensor([i for i, e in enumerate(experts) if e == "und"], dtype=torch.long)
    gen = torch.tensor([i for i, e in enumerate(experts) if e == "gen"], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, ARCH.llm.hidden_size, generator=g)
    positions = torch.cat([torch.arange(sum(n for n, _, _ in doc)) for doc in layout])
    cos, sin = rotary_cos_sin(positions, ARCH.llm.head_dim, ARCH.llm.rope_theta)
    meta = AttentionMeta.from_segments(segments)
    return hidden, MoTRouting.build(und, gen, num_tokens, row_multiple), cos, sin, meta


# Two packs of different lengths and layouts (text, a clean image, noised latents, text).
LAYER_PACKS = [
    [[(5, "causal", "und"), (4, "full", "gen"), (3, "causal", "und")], [(6, "causal", "und")]],
    [[(7, "causal", "und"), (6, "noise", "gen")], [(4, "full", "und"), (9, "causal", "und")]],
]


def _layer_step(
    layer: Qwen2MoTDecoderLayer, index: int, row_multiple: int = 1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden, routing, cos, sin, meta = _pack(LAYER_PACKS[index], seed=index, row_multiple=row_multiple)
    meta.prepare_for(layer.self_attn.attn_core)  # as Bagel.forward does, before its layers
    hidden.requires_grad_(True)
    out = routing.merge(*layer(*routing.split(hidden), routing, ExpertRotary.build(routing, cos, sin), meta))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + index))
    layer.zero_grad(set_to_none=True)
    (out * weight).sum().backward()
    return out.detach(), [hidden.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("row_multiple", [1, ROW_MULTIPLE])
def test_eager_full_ac_compiled_layer_matches_the_plain_layer_without_recompiling(row_multiple):
    """The cell that failed, on one decoder layer: eager attention, full AC, compiled with
    dynamic shapes; same outputs and gradients as the plain layer (unpadded experts), one graph
    for both packs; also with the experts' rows padded as in 16-bit compute."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    attention = EagerBackend()
    torch.manual_seed(0)
    plain = Qwen2MoTDecoderLayer(ARCH.llm, 0, lambda spec: attention.build(spec, None))
    with torch.no_grad():  # non-trivial norms and the generation expert's own weights
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = Qwen2MoTDecoderLayer(ARCH.llm, 0, lambda spec: attention.build(spec, None))
    layer.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(layer, [layer], ActivationCheckpoint(mode="full"))
    apply_compile([layer], backend="aot_eager")  # dynamo + AOTAutograd, no C++ build

    graphs = []
    for index in range(len(LAYER_PACKS)):
        expected_out, expected_grads = _layer_step(plain, index)
        out, grads = _layer_step(layer, index, row_multiple)
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1] == graphs[0], f"the second pack's length recompiled: graphs {graphs}"


def test_bench_grid_names_reach_the_activation_checkpoint_section(tmp_path):
    """`bench_train_step.py --ac none,full,selective,op` trains what each name says."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train_step import AC_MODES, TrainSetting, job_argv

    from bagel_titan.config.manager import load_job_config

    sections = {}
    for name in AC_MODES:
        cfg, _ = load_job_config(job_argv(TrainSetting(ac=name), str(tmp_path)))
        ac = cfg.activation_checkpoint
        sections[name] = (ac.mode, ac.selective_granularity)
    assert sections == {
        "none": ("none", "layer"),
        "full": ("full", "layer"),
        "selective": ("selective", "layer"),
        "op": ("selective", "op"),
    }
    with pytest.raises(ValueError, match="unknown activation checkpointing 'ful'"):
        job_argv(TrainSetting(ac="ful"), str(tmp_path))
