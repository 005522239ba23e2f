"""The `sdpa` backend equals the eager reference on packed multimodal batches (fp32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.protocols import AttentionLayerSpec
from bagel_titan_plugins.attention.eager import EagerBackend
from bagel_titan_plugins.attention.meta import AttentionMeta
from bagel_titan_plugins.attention.sdpa import (
    CPU_FP32_ATTENTION_TOKENS,
    SDPABackend,
    SDPAConfig,
    document_plan,
    sdpa_gqa,
)
from synthetic_attention import random_inputs, random_pack

SPEC = AttentionLayerSpec(
    num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=32, layer_index=0, role="decoder"
)


def _grads(module, inputs):
    out = module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    q_grad, k_grad, v_grad = torch.autograd.grad(
        (out * weight).sum(), (inputs.q_THD, inputs.k_THD, inputs.v_THD)
    )
    return out, q_grad, k_grad, v_grad


@pytest.mark.parametrize("strategy", ["dense", "per_document", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_matches_eager_forward_and_grad(strategy, seed, kv_heads):
    rng = random.Random(seed)
    docs = random_pack(rng, num_tokens=96, num_docs=rng.randint(3, 5))
    inputs = random_inputs(
        docs, num_heads=4, num_kv_heads=kv_heads, head_dim=16, pad=7, seed=seed, requires_grad=True
    )
    spec = AttentionLayerSpec(4, kv_heads, 16, 32, 0, "decoder")
    eager = EagerBackend().build(spec, None)
    sdpa = SDPABackend().build(spec, SDPAConfig(strategy=strategy, document_call_tokens=64))

    expected = _grads(eager, inputs)
    actual = _grads(sdpa, inputs)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    pad_out = actual[0][-7:]
    assert torch.equal(pad_out, torch.zeros_like(pad_out)), "padding tokens must give exactly zero"


def _calls(meta: AttentionMeta) -> list[tuple[int, int, int, int, bool, bool]]:
    """(q_start, q_end, kv_start, kv_end, is_causal, masked) of each planned call."""
    return [
        (c.q_start, c.q_end, c.kv_start, c.kv_end, c.is_causal, c.mask is not None)
        for c in document_plan(meta).calls
    ]


def _assert_matches_eager(meta: AttentionMeta, documents) -> None:
    inputs = random_inputs(documents, num_heads=4, num_kv_heads=2, head_dim=16, requires_grad=True)
    sdpa = SDPABackend().build(SPEC, SDPAConfig(strategy="per_document"))
    eager = EagerBackend().build(SPEC, None)
    for name, a, e in zip(("out", "dq", "dk", "dv"), _grads(sdpa, inputs), _grads(eager, inputs)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_vit_full_documents_use_unmasked_calls():
    documents = [[(5, "full")], [(9, "full")], [(3, "full")]]
    meta = AttentionMeta.from_segments(documents)
    assert _calls(meta) == [
        (0, 5, 0, 5, False, False),
        (5, 14, 5, 14, False, False),
        (14, 17, 14, 17, False, False),
    ]
    _assert_matches_eager(meta, documents)


def test_text_only_documents_use_is_causal():
    meta = AttentionMeta.from_segments([[(4, "causal"), (3, "causal")]])
    assert _calls(meta) == [(0, 7, 0, 7, True, False)]
    assert document_plan(meta).rows == [(0, 0, 7)]


def test_t2i_samples_are_a_causal_call_and_an_unmasked_call_over_the_prefix():
    """Caption then noised image: the image rows see the whole sample, the caption rows only
    their causal prefix; no mask, and a quarter less work than one masked 70x70 call."""
    documents = [[(30, "causal"), (40, "noise")], [(6, "causal"), (5, "causal")]]
    meta = AttentionMeta.from_segments(documents)
    assert _calls(meta) == [
        (0, 30, 0, 30, True, False),
        (30, 70, 0, 70, False, False),
        (70, 81, 70, 81, True, False),
    ]
    assert document_plan(meta).work == 30 * 30 + 40 * 70 + 11 * 11 < 70 * 70 + 11 * 11
    _assert_matches_eager(meta, documents)


def test_causal_rows_after_an_image_come_from_one_causal_call_over_the_document():
    """ViT image, question, answer, second image, text: the causal call covers the document up to
    its last causal segment (its rows of the images are not used); each image is its own call."""
    documents = [[(8, "full"), (5, "causal"), (4, "causal"), (6, "full"), (3, "causal")]]
    meta = AttentionMeta.from_segments(documents)
    assert _calls(meta) == [
        (0, 26, 0, 26, True, False),
        (0, 8, 0, 8, False, False),
        (17, 23, 0, 23, False, False),
    ]
    assert document_plan(meta).rows == [(1, 0, 8), (0, 8, 9), (2, 0, 6), (0, 23, 3)]
    _assert_matches_eager(meta, documents)


def test_a_noise_segment_with_later_tokens_keeps_the_document_mask():
    """Tokens after a noised image must not see it: only a mask says so; other documents of the
    pack still go unmasked, and padding gives zeros."""
    documents = [[(5, "causal"), (6, "noise"), (4, "causal")], [(2, "causal")]]
    meta = AttentionMeta.from_segments(documents, pad_to=20)
    assert _calls(meta) == [(0, 15, 0, 15, False, True), (15, 17, 15, 17, True, False)]
    assert document_plan(meta).rows == [(0, 0, 15), (1, 0, 2), (-1, 0, 3)]
    _assert_matches_eager(AttentionMeta.from_segments(documents), documents)


def test_sdpa_bf16_close_to_eager():
    rng = random.Random(3)
    inputs = random_inputs(
        random_pack(rng, 80, 3), num_heads=4, num_kv_heads=2, head_dim=16, pad=5, dtype=torch.bfloat16
    )
    meta = inputs.meta
    ref = EagerBackend().build(SPEC, None)(
        inputs.q_THD.float(), inputs.k_THD.float(), inputs.v_THD.float(), meta
    )
    for strategy in ("dense", "per_document"):
        out = SDPABackend().build(SPEC, SDPAConfig(strategy=strategy))(
            inputs.q_THD, inputs.k_THD, inputs.v_THD, meta
        )
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("length", [CPU_FP32_ATTENTION_TOKENS, CPU_FP32_ATTENTION_TOKENS + 1])
def test_short_bf16_cpu_calls_with_a_backward_compute_in_fp32(length):
    """Up to `CPU_FP32_ATTENTION_TOKENS` query tokens, a bf16 CPU call that will be differentiated
    is the fp32 call with its inputs cast up and its output cast back (also under autocast, which
    would cast them down again), gradients included; longer calls and calls without a backward
    run the bf16 kernel."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, h, length, 16, generator=gen).bfloat16() for h in (4, 2, 2))
    grad_out = torch.randn(1, 4, length, 16, generator=gen).bfloat16()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    mask[length // 4 :, length // 4 :] = True

    def call(dtype: torch.dtype, autocast: bool = False):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sdpa_gqa(*(x.to(dtype) for x in leaves), mask)
        out.to(torch.bfloat16).backward(grad_out)
        return [out.to(torch.bfloat16)] + [x.grad for x in leaves]

    in_fp32 = length <= CPU_FP32_ATTENTION_TOKENS
    expected = call(torch.float32)
    for actual in (call(torch.bfloat16), call(torch.bfloat16, autocast=True)):
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, e) == in_fp32, f"{name} at {length} tokens"
    with torch.no_grad():
        bf16_kernel = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
        assert torch.equal(sdpa_gqa(q, k, v, mask), bf16_kernel)


def test_unknown_option_names_the_section_and_known_keys():
    with pytest.raises(ConfigError, match=r"'stratgy' in \[attention.sdpa\].*document_call_tokens"):
        load_job_config(["--attention.sdpa.stratgy", "dense"])
    with pytest.raises(ValueError, match="strategy"):
        SDPAConfig(strategy="loop")


def test_auto_goes_per_document_for_a_pack_of_samples_and_dense_for_many_tiny_documents():
    from bagel_titan_plugins.attention.sdpa import prefers_dense

    config = SDPAConfig()
    anchor_pack = AttentionMeta.from_segments(
        [[(40, "causal"), (160, "noise")]] * 9 + [[(60, "causal"), (80, "causal")]]
    )
    assert not prefers_dense(anchor_pack, config.document_call_tokens)  # 2k tokens, 10 samples: ~8x less work
    crumbs = AttentionMeta.from_segments([[(2, "causal")]] * 1000)
    assert prefers_dense(crumbs, config.document_call_tokens)  # 1000 calls cost more than one 2k call
    one_document = AttentionMeta.from_segments([[(30, "causal"), (20, "full")]])
    assert prefers_dense(one_document, config.document_call_tokens)  # the same call either way
    module = SDPABackend().build(SPEC, None)
    assert module._strategy(anchor_pack) == "per_document" and module._strategy(crumbs) == "dense"
