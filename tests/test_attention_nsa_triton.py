"""The Triton NSA path (native-sparse-attention-triton) agrees with our PyTorch NSA (GPU only)."""

from __future__ import annotations

import random

import pytest
import torch

from bagel_titan.protocols import AttentionLayerSpec
from bagel_titan_plugins.attention.nsa import NSABackend, NSAConfig
from bagel_titan_plugins.attention.nsa.plan import nsa_plan
from bagel_titan_plugins.attention.nsa.triton_path import triton_installed
from synthetic_attention import random_inputs, random_pack

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_installed()),
    reason="needs a CUDA device and native-sparse-attention-triton",
)

SPEC = AttentionLayerSpec(
    num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256, layer_index=0, role="decoder"
)
BASE = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=2, window_size=96)


def _branches(options: dict, seed: int):
    rng = random.Random(seed)
    docs = random_pack(rng, num_tokens=1500, num_docs=3)
    inputs = random_inputs(
        docs,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        hidden_size=256,
        pad=20,
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )
    outs = {}
    for implementation in ("triton", "torch"):
        module = NSABackend().build(SPEC, NSAConfig(**options, implementation=implementation)).cuda()
        with torch.no_grad():
            module.intra_block_pe.normal_(0, 0.1)
            module.compress_key.add_(torch.randn_like(module.compress_key) * 0.01)
        plan = nsa_plan(inputs.meta)
        idx = plan.stream_index
        with torch.no_grad():
            outs[implementation] = module.stream_branches(
                inputs.q_THD[idx], inputs.k_THD[idx], inputs.v_THD[idx], plan, inputs.meta
            )
    return outs["triton"], outs["torch"]


def _mismatch(name: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None when `a` and `b` [S, H, D] agree within bf16 tolerance, else where they do not (the
    stream rows and heads), so that one GPU run says which tokens disagree."""
    bad = ~torch.isclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    if not bad.any():
        return None
    rows, heads = bad.any(dim=2).nonzero(as_tuple=True)
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements, max abs difference "
        f"{float((a.float() - b.float()).abs().max()):.3g}, stream rows {sorted(set(rows.tolist()))[:24]}, "
        f"heads {sorted(set(heads.tolist()))}"
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_matches_torch_when_topk_covers_every_block(seed):
    triton, torch_ = _branches({**BASE, "topk": 64}, seed)
    problems = [_mismatch(name, a, b) for name, a, b in zip(triton._fields, triton, torch_)]
    assert not any(problems), "; ".join(p for p in problems if p)


def test_triton_matches_torch_with_sparse_selection():
    triton, torch_ = _branches({**BASE, "topk": 4}, 2)
    torch.testing.assert_close(triton.compressed.float(), torch_.compressed.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(triton.sliding.float(), torch_.sliding.float(), atol=2e-2, rtol=2e-2)
    # Selection can flip on near-ties in bf16: require agreement for almost every query.
    close = ((triton.selected.float() - torch_.selected.float()).abs() < 2e-2).flatten(1).all(dim=1)
    assert close.float().mean() > 0.98
