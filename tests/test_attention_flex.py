"""The `flex` backend equals the eager reference (forward only: FlexAttention has no CPU backward)."""

from __future__ import annotations

import random

import pytest
import torch

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.protocols import AttentionLayerSpec
from bagel_titan_plugins.attention.eager import EagerBackend
from bagel_titan_plugins.attention.flex import FlexBackend, FlexConfig, bucketed_length
from synthetic_attention import random_inputs, random_pack


def _compare(kv_heads: int, seed: int, options: FlexConfig) -> None:
    rng = random.Random(seed)
    # 180-200 real tokens + padding stay inside one 256 bucket: one compiled shape per kv_heads.
    docs = random_pack(rng, num_tokens=rng.randint(180, 200), num_docs=rng.randint(3, 5))
    inputs = random_inputs(docs, num_heads=4, num_kv_heads=kv_heads, head_dim=16, pad=9, seed=seed)
    spec = AttentionLayerSpec(4, kv_heads, 16, 32, 0, "decoder")
    expected = EagerBackend().build(spec, None)(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
    with torch.no_grad():
        actual = FlexBackend().build(spec, options)(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(actual[-9:], torch.zeros_like(actual[-9:])), "padding tokens must give exactly zero"


@pytest.mark.slow  # compiles flex_attention
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_compiled_flex_matches_eager(kv_heads):
    for seed in range(3):
        _compare(kv_heads, seed, FlexConfig(block_size=128))


def test_uncompiled_flex_matches_eager():
    _compare(4, 5, FlexConfig(compile=False, block_size=64))


def test_block_mask_is_built_once_per_batch():
    rng = random.Random(0)
    inputs = random_inputs(random_pack(rng, 100, 3), num_heads=4, num_kv_heads=4, head_dim=16)
    module = FlexBackend().build(AttentionLayerSpec(4, 4, 16, 32, 0, "decoder"), FlexConfig(compile=False))
    with torch.no_grad():
        module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
        first = inputs.meta._cache["flex_block_mask:128:128"]
        module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)
    assert inputs.meta._cache["flex_block_mask:128:128"] is first


def test_cpu_backward_is_a_clear_error():
    inputs = random_inputs([[(10, "causal")]], num_heads=2, num_kv_heads=2, head_dim=8, requires_grad=True)
    module = FlexBackend().build(AttentionLayerSpec(2, 2, 8, 32, 0, "decoder"), None)
    with pytest.raises(NotImplementedError, match="sdpa"):
        module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta)


@pytest.mark.parametrize(
    "tokens, per_octave, expected",
    [
        (1, 4, 128),
        (128, 4, 128),
        (129, 4, 256),
        (1000, 4, 1024),
        (1100, 4, 1280),
        (5000, 4, 5120),
        (9000, 1, 16384),
        (9000, 0, 9088),
        (33000, 2, 49152),
    ],
)
def test_bucketed_length(tokens, per_octave, expected):
    assert bucketed_length(tokens, 128, per_octave) == expected


def test_bucketing_limits_distinct_shapes():
    shapes = {bucketed_length(n, 128, 4) for n in range(1024, 32769, 7)}
    assert len(shapes) <= 21
    assert all(bucketed_length(n, 128, 4) < 1.26 * n for n in range(1024, 32769, 97))


def test_bad_options():
    with pytest.raises(ValueError, match="block_size"):
        FlexConfig(block_size=100)
    with pytest.raises(ConfigError, match=r"'blocksize' in \[attention.flex\].*block_size"):
        load_job_config(["--attention.flex.blocksize", "64"])


@pytest.mark.slow  # compiles create_block_mask
def test_compiled_block_mask_equals_the_eager_one():
    """The BlockMask is built compiled (tile by tile) by default; it must be the same mask."""
    from bagel_titan_plugins.attention.flex import flex_block_mask

    for seed, length in ((0, 1000), (1, 2500)):
        masks = []
        for compiled in (True, False):
            inputs = random_inputs(
                random_pack(random.Random(seed), length, 4), num_heads=2, num_kv_heads=1, head_dim=8
            )
            masks.append(flex_block_mask(inputs.meta, bucketed_length(length, 128, 4), 128, compiled))
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(masks[0], name), getattr(masks[1], name)), name
        assert (
            masks[0].kv_num_blocks.sum() < masks[0].kv_num_blocks.numel() * masks[0].kv_num_blocks.shape[-1]
        )
