"""Every first-party backend, as the model gets it from the registry, agrees with eager."""

from __future__ import annotations

import random

import pytest
import torch

from bagel_titan.plugins import PluginManager
from bagel_titan.protocols import AttentionLayerSpec
from bagel_titan_plugins.attention.meta import AttentionMeta
from synthetic_attention import random_inputs, random_pack

# NSA in its dense-equivalent configuration (top-k covers every block, the window covers the
# pack), with the gates fixed below, is exact attention.
OPTIONS = {
    "nsa": {"block_size": 16, "kernel_size": 8, "kernel_stride": 4, "topk": 64, "window_size": 10_000},
}
FIRST_PARTY = ("eager", "sdpa", "flex", "nsa")
# flex compiles its kernels on first use (half a minute of CPU): slow.
BACKEND_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "flex" else n for n in FIRST_PARTY]


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    return PluginManager()


def _build(plugins, name: str, spec: AttentionLayerSpec):
    section = f"attention.{name}"
    config = plugins.config_sections.get(section)(**OPTIONS.get(name, {})) if name != "eager" else None
    module = plugins.attention_backends.get(name).build(spec, config)
    if name == "nsa":
        with torch.no_grad():
            for branch, logit in (("compressed", -1e4), ("selected", 0.0), ("sliding", 0.0)):
                module.gates[branch].weight.zero_()
                module.gates[branch].bias.fill_(logit)
    return module


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_llm_pack_agrees_with_eager(plugins, name):
    spec = AttentionLayerSpec(4, 2, 16, 32, 0, "decoder")
    rng = random.Random(42)
    docs = random_pack(rng, num_tokens=190, num_docs=4)
    inputs = random_inputs(docs, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=32, pad=9, seed=4)
    args = (inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)
    with torch.no_grad():
        expected = _build(plugins, "eager", spec)(*args)
        actual = _build(plugins, name, spec)(*args)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_vit_backend_resolution_and_per_image_attention(plugins, name):
    """The ViT gets `encoder_fallback` when the backend has one (nsa -> sdpa); per-image full
    attention then agrees with eager."""
    backend = plugins.attention_backends.get(name)
    vit_name = backend.encoder_fallback or name
    assert vit_name in plugins.attention_backends
    spec = AttentionLayerSpec(4, 4, 16, 64, 0, "encoder")
    lengths = [49, 16, 100]
    meta = AttentionMeta.full_documents(lengths)
    inputs = random_inputs([[(n, "full")] for n in lengths], num_heads=4, num_kv_heads=4, head_dim=16, seed=8)
    args = (inputs.q_THD, inputs.k_THD, inputs.v_THD, meta)
    with torch.no_grad():
        expected = _build(plugins, "eager", spec)(*args)
        actual = _build(plugins, vit_name, spec)(*args)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_bagel_metadata_satisfies_the_core_contract():
    """A third-party backend types against `bagel_titan.protocols.AttentionMeta` and imports no
    plugin; BAGEL's metadata (its mask rule inside) is one implementation of it."""
    from bagel_titan.protocols import AttentionMeta as CoreAttentionMeta

    meta = AttentionMeta.from_segments([[(3, "causal"), (4, "noise")], [(2, "full")]], pad_to=12)
    assert isinstance(meta, CoreAttentionMeta)
    assert meta.num_tokens == 12 and meta.has_padding and meta.doc_lengths == [7, 2]
    assert meta.cu_seqlens.tolist() == [0, 7, 9] and meta.doc_ids.tolist()[-3:] == [-1, -1, -1]
