"""The shipped 7B configs parse, and their whole plan applies to the 7B model on the meta device
on a 2-rank gloo world (no weights are allocated)."""

from __future__ import annotations

import pytest

from bagel_titan.config.manager import load_job_config
from conftest import REPO


@pytest.mark.parametrize("name", ["bagel_7b.toml", "bagel_7b_nsa.toml"])
def test_7b_config_parses(name):
    cfg, _ = load_job_config(["--job.config_file", str(REPO / "train_configs" / name)])
    assert cfg.model.flavor == "7b-mot"
    assert cfg.training.dtype == "bfloat16" and cfg.activation_checkpoint.mode == "full"
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.eps == 1e-15
    assert cfg.ema.decay == 0.9999
    if name == "bagel_7b_nsa.toml":
        assert cfg.attention.backend == "nsa"
        nsa = cfg.section("attention.nsa")
        assert (nsa.block_size, nsa.compress_type, nsa.topk, nsa.window_size) == (64, "weightedpool", 16, 512)
    else:
        assert cfg.attention.backend == "flex"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", ["bagel_7b.toml", "bagel_7b_nsa.toml"])
def test_7b_plan_on_meta_with_two_ranks(plans_7b, name):
    report = plans_7b[name]
    extra = report["params_total"] - 14_607_000_000
    if name == "bagel_7b.toml":
        assert abs(extra) < 1_000_000  # 14.607B
    else:
        assert 0 < extra < 50_000_000  # NSA adds gates and compression weights
    assert report["units"] == 28 + 26 and report["fsdp_units"] == report["units"] and report["root_is_fsdp"]
    assert report["all_meta"]
    # 14.6B fp32 params + grads + 2 moments over 8 ranks: ~27 GiB of states per rank.
    assert 25 < report["estimate_states_gib_8_gpus"] < 30
