"""The `nsa` backend: the algorithm, BAGEL's rule on packed batches, parameters and checkpoints."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.protocols import AttentionLayerSpec
from bagel_titan_plugins.attention.eager import EagerBackend
from bagel_titan_plugins.attention.meta import AttentionMeta
from bagel_titan_plugins.attention.nsa import NSAAttention, NSABackend, NSAConfig
from bagel_titan_plugins.attention.nsa.compress import compress, weight_shape
from bagel_titan_plugins.attention.nsa.reference import nsa_document
from bagel_titan_plugins.attention.state_keys import optional_attention_state_keys
from synthetic_attention import random_inputs, random_pack

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 8, 24
SPEC = AttentionLayerSpec(HEADS, KV_HEADS, HEAD_DIM, HIDDEN, 0, "decoder")
SMALL = dict(
    block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, local_blocks=1, window_size=10
)


def _module(options: dict, spec: AttentionLayerSpec = SPEC) -> NSAAttention:
    return NSABackend().build(spec, NSAConfig(**options))


def _fix_gates(module: NSAAttention, compressed: float, selected: float, sliding: float) -> None:
    """Gate logits fixed per branch (weights zero): +-1e4 give gates of exactly 1 and 0."""
    with torch.no_grad():
        for branch, logit in zip(("compressed", "selected", "sliding"), (compressed, selected, sliding)):
            module.gates[branch].weight.zero_()
            module.gates[branch].bias.fill_(logit)


def _run(module, inputs):
    return module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)


# -- the algorithm, against a per-query brute force -------------------------------------------


def _brute_force_nsa(q, k, v, k_cmp, v_cmp, cfg: NSAConfig):
    """NSA for one causal document, one query and one KV head at a time, from the definitions."""
    L, H, D = q.shape
    K = k.shape[1]
    G = H // K
    scale = 1 / math.sqrt(D)
    outs = [torch.zeros(L, H, D, dtype=torch.float64) for _ in range(3)]
    q, k, v, k_cmp, v_cmp = (x.double() for x in (q, k, v, k_cmp, v_cmp))

    def attend(qv, keys, values):
        if len(keys) == 0:
            return torch.zeros(D, dtype=torch.float64)
        p = torch.softmax(torch.stack([qv @ key for key in keys]) * scale, 0)
        return sum(pi * vi for pi, vi in zip(p, values))

    n_blocks = math.ceil(L / cfg.block_size)
    for t in range(L):
        visible_cmp = [c for c in range(k_cmp.shape[0]) if c * cfg.kernel_stride + cfg.kernel_size - 1 <= t]
        for kh in range(K):
            block_score = [0.0] * n_blocks
            for h in range(kh * G, (kh + 1) * G):
                outs[0][t, h] = attend(
                    q[t, h], [k_cmp[c, kh] for c in visible_cmp], [v_cmp[c, kh] for c in visible_cmp]
                )
                if visible_cmp:
                    p = torch.softmax(torch.stack([q[t, h] @ k_cmp[c, kh] for c in visible_cmp]) * scale, 0)
                    for pc, c in zip(p.tolist(), visible_cmp):
                        window = set(range(c * cfg.kernel_stride, c * cfg.kernel_stride + cfg.kernel_size))
                        for j in range(n_blocks):
                            block = set(range(j * cfg.block_size, (j + 1) * cfg.block_size))
                            block_score[j] += pc * len(window & block) / cfg.kernel_stride
            qb = t // cfg.block_size
            forced = {j for j in range(qb + 1) if j < cfg.init_blocks or j > qb - cfg.local_blocks}
            rest = sorted((j for j in range(qb + 1) if j not in forced), key=lambda j: -block_score[j])
            chosen = sorted(forced) + rest[: max(0, cfg.topk - len(forced))]
            sel_keys = [s for s in range(t + 1) if s // cfg.block_size in chosen]
            win_keys = [s for s in range(t + 1) if s >= t - cfg.window_size]
            for h in range(kh * G, (kh + 1) * G):
                outs[1][t, h] = attend(q[t, h], [k[s, kh] for s in sel_keys], [v[s, kh] for s in sel_keys])
                outs[2][t, h] = attend(q[t, h], [k[s, kh] for s in win_keys], [v[s, kh] for s in win_keys])
    return outs


@pytest.mark.parametrize("compress_type", ["weightedpool", "linear", "avgpool"])
def test_reference_matches_brute_force(compress_type):
    cfg = NSAConfig(**SMALL, compress_type=compress_type, query_chunk=23)
    module = _module({**SMALL, "compress_type": compress_type})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial compression parameters
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    L = 75
    q, k, v = (torch.randn(L, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    k_cmp = compress(
        k, module.compress_key, compress_type, cfg.kernel_size, cfg.kernel_stride, module.intra_block_pe
    )
    v_cmp = compress(v, module.compress_value, compress_type, cfg.kernel_size, cfg.kernel_stride)
    with torch.no_grad():
        ours = nsa_document(q, k, v, k_cmp, v_cmp, cfg)
    expected = _brute_force_nsa(q, k, v, k_cmp, v_cmp, cfg)
    for name, a, e in zip(ours._fields, ours, expected):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compression_windows_by_hand():
    x = torch.arange(10.0).view(10, 1, 1)  # L=10, one head, D=1
    out = compress(x, None, "avgpool", kernel_size=4, kernel_stride=2)
    assert out.flatten().tolist() == [1.5, 3.5, 5.5, 7.5]  # windows [0,4) [2,6) [4,8) [6,10)
    assert compress(x[:3], None, "avgpool", 4, 2).shape == (0, 1, 1)


@pytest.mark.parametrize("compress_type", ["weightedpool", "linear", "avgpool"])
def test_initial_compression_is_the_window_mean(compress_type):
    module = _module({**SMALL, "compress_type": compress_type})
    x = torch.randn(40, KV_HEADS, HEAD_DIM)
    mean = compress(x, None, "avgpool", 8, 4)
    torch.testing.assert_close(
        compress(x, module.compress_key, compress_type, 8, 4, module.intra_block_pe), mean
    )
    if compress_type != "avgpool":
        assert module.compress_key.shape == weight_shape(compress_type, KV_HEADS, 8, HEAD_DIM)


# -- BAGEL's rule on packed batches -------------------------------------------------------------

DENSE_EQUIVALENT = dict(
    block_size=16, kernel_size=8, kernel_stride=4, topk=64, init_blocks=1, local_blocks=2, window_size=10_000
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("compress_type", ["weightedpool", "linear"])
def test_dense_equivalent_config_equals_exact_attention(seed, compress_type):
    """Top-k covering every block and a window covering the sequence: the selected and sliding
    branches are exact causal attention; with the compressed gate at 0 the output is exact,
    for every segment mode, in packs of 3+ documents, with GQA, forward and backward."""
    rng = random.Random(seed)
    docs = random_pack(rng, num_tokens=150, num_docs=rng.randint(3, 5))
    inputs = random_inputs(
        docs,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_size=HIDDEN,
        pad=6,
        seed=seed,
        requires_grad=True,
    )
    module = _module({**DENSE_EQUIVALENT, "compress_type": compress_type, "query_chunk": 37})
    eager = EagerBackend().build(SPEC, None)
    weight = torch.randn(inputs.q_THD.shape, generator=torch.Generator().manual_seed(seed))
    expected = eager(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
    expected_grads = torch.autograd.grad(
        (expected * weight).sum(), (inputs.q_THD, inputs.k_THD, inputs.v_THD)
    )

    for gates in [(-1e4, 1e4, -1e4), (-1e4, -1e4, 1e4), (-1e4, 0.0, 0.0)]:
        _fix_gates(module, *gates)
        out = _run(module, inputs)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((out * weight).sum(), (inputs.q_THD, inputs.k_THD, inputs.v_THD))
        for name, g, e in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(
                g, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name} gates={gates}: {m}"
            )
        assert torch.equal(out[-6:], torch.zeros_like(out[-6:]))


def _causal_rows(meta: AttentionMeta) -> torch.Tensor:
    return (meta.token_modes == 0) & (meta.doc_ids >= 0)


def test_sparse_config_documents_stay_apart_and_non_causal_queries_are_exact():
    """A sparse config on a pack of 4 documents: every document's output equals running that
    document alone; full/noise queries equal eager exactly."""
    rng = random.Random(7)
    docs = random_pack(rng, num_tokens=260, num_docs=4)
    module = _module({**SMALL, "compress_type": "weightedpool"})
    with torch.no_grad():
        module.gates["selected"].weight.normal_(0, 0.5)
        module.gates["sliding"].weight.normal_(0, 0.5)  # gates depend on the hidden state
    packed = random_inputs(
        docs, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN, pad=3, seed=1
    )
    with torch.no_grad():
        out = _run(module, packed)
        start = 0
        for doc in docs:
            n = sum(length for length, _ in doc)
            alone_meta = AttentionMeta.from_segments([doc])
            s = slice(start, start + n)
            alone = module(packed.q_THD[s], packed.k_THD[s], packed.v_THD[s], alone_meta, packed.hidden_TD[s])
            torch.testing.assert_close(out[s], alone, atol=1e-6, rtol=1e-6)
            start += n
        ref = EagerBackend().build(SPEC, None)(packed.q_THD, packed.k_THD, packed.v_THD, packed.meta)
    non_causal = (~_causal_rows(packed.meta)) & (packed.meta.doc_ids >= 0)
    assert non_causal.any()
    torch.testing.assert_close(out[non_causal], ref[non_causal], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[_causal_rows(packed.meta)], ref[_causal_rows(packed.meta)], atol=1e-3), (
        "the sparse config should differ from dense attention on long enough documents"
    )


def test_noised_latents_stay_hidden_from_later_tokens():
    doc = [(40, "causal"), (24, "noise"), (30, "causal"), (16, "full"), (20, "causal")]
    module = _module({**SMALL, "compress_type": "linear"})
    with torch.no_grad():
        module.gates["selected"].weight.normal_(0, 0.5)
        module.gates["sliding"].weight.normal_(0, 0.5)
    a = random_inputs(
        [doc], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN, seed=3
    )
    b = random_inputs(
        [doc], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN, seed=3
    )
    noise = slice(40, 64)
    b.k_THD[noise] = torch.randn(24, KV_HEADS, HEAD_DIM) * 5
    b.v_THD[noise] = torch.randn(24, KV_HEADS, HEAD_DIM) * 5
    b.hidden_TD[noise] = torch.randn(24, HIDDEN)
    with torch.no_grad():
        out_a, out_b = _run(module, a), _run(module, b)
    torch.testing.assert_close(out_a[:40], out_b[:40])
    torch.testing.assert_close(out_a[64:], out_b[64:])
    assert not torch.allclose(out_a[noise], out_b[noise])


def test_bf16_runs_and_stays_close_to_fp32():
    rng = random.Random(11)
    docs = random_pack(rng, num_tokens=120, num_docs=3)
    module = _module({**SMALL})
    x32 = random_inputs(
        docs, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN, seed=2
    )
    x16 = random_inputs(
        docs,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_size=HIDDEN,
        seed=2,
        dtype=torch.bfloat16,
    )
    with torch.no_grad():
        out16 = _run(module, x16)
        out32 = _run(module, x32)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=5e-2, rtol=5e-2)


def test_initialisation_starts_close_to_dense():
    """With the default gate bias and top-k covering the document, the output is within a few
    percent of dense attention (the compressed and sliding gates start at sigmoid(-4))."""
    inputs = random_inputs(
        [[(200, "causal")]],
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_size=HIDDEN,
        seed=5,
    )
    module = _module({**DENSE_EQUIVALENT, "window_size": 32})
    with torch.no_grad():
        out = _run(module, inputs)
        dense = EagerBackend().build(SPEC, None)(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
    rel = (out - dense).norm() / dense.norm()
    assert rel < 0.05, rel


# -- parameters, checkpoints, configuration -----------------------------------------------------


class _TinyLayer(nn.Module):
    def __init__(self, backend, options):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.attn_core = backend.build(SPEC, options)


def test_optional_state_keys_name_the_new_parameters_and_checkpoints_round_trip():
    model = nn.ModuleDict({"layers": nn.ModuleList([_TinyLayer(NSABackend(), None) for _ in range(2)])})
    keys = optional_attention_state_keys(model)
    assert keys == {
        f"layers.{i}.attn_core.{name}"
        for i in range(2)
        for name in ("compress_key", "compress_value", "intra_block_pe")
        + tuple(f"gates.{b}.{p}" for b in ("compressed", "selected", "sliding") for p in ("weight", "bias"))
    }
    dense_only = {k: v for k, v in model.state_dict().items() if k not in keys}
    fresh = nn.ModuleDict({"layers": nn.ModuleList([_TinyLayer(NSABackend(), None) for _ in range(2)])})
    missing, unexpected = fresh.load_state_dict(dense_only, strict=False)
    assert set(missing) == keys and not unexpected

    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    fresh.load_state_dict(model.state_dict())
    assert list(model.state_dict()) == list(fresh.state_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    eager_model = nn.ModuleDict({"layers": nn.ModuleList([_TinyLayer(EagerBackend(), {})])})
    assert optional_attention_state_keys(eager_model) == set()


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        module = _module({"compress_type": "linear"})
    assert module.gates["selected"].weight.is_meta
    module.to_empty(device="cpu")
    module.reset_parameters()
    reference = _module({"compress_type": "linear"})
    assert list(module.state_dict()) == list(reference.state_dict())
    for (name, a), (_, b) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.all(module.gates["selected"].bias == 4.0)
    assert torch.all(module.gates["compressed"].bias == -4.0) and torch.all(
        module.gates["sliding"].bias == -4.0
    )


def test_backend_registration_and_options():
    from bagel_titan.plugins import PluginManager

    plugins = PluginManager()
    backend = plugins.attention_backends.get("nsa")
    assert backend.encoder_fallback == "sdpa"
    assert plugins.config_sections.get("attention.nsa") is NSAConfig
    with pytest.raises(ValueError, match="vit_backend"):
        backend.build(AttentionLayerSpec(4, 4, 8, 32, 0, "encoder"), None)
    with pytest.raises(ConfigError, match=r"'windowsize' in \[attention.nsa\].*window_size"):
        load_job_config(["--attention.nsa.windowsize", "4"])
    for bad, match in [
        ({"compress_type": "conv"}, "compress_type"),
        ({"kernel_size": 32, "kernel_stride": 12}, "multiple of kernel_stride"),
        ({"block_size": 48, "kernel_size": 32}, "multiple of kernel_size"),
        ({"topk": 2, "init_blocks": 1, "local_blocks": 2}, "topk"),
    ]:
        with pytest.raises(ValueError, match=match):
            NSAConfig(**bad)
    with pytest.raises(RuntimeError, match="triton"):
        module = backend.build(SPEC, NSAConfig(implementation="triton"))
        inputs = random_inputs(
            [[(10, "causal")]], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=32
        )
        module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)


def test_missing_hidden_states_is_a_clear_error():
    inputs = random_inputs([[(10, "causal")]], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="hidden_TD"):
        _module({})(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
