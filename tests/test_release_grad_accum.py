"""`[training] grad_accum_weighting`: bagel-titan's token weighting (the default) and the
release's micro-step weighting (train/pretrain_unified_navit.py: each micro-step's loss is a mean
over its own tokens on all ranks, divided by gradient_accumulation_steps)."""

from __future__ import annotations

import pytest
import torch

from test_core_train import _gradients


def test_microbatch_weighting_averages_the_microbatch_means(tmp_path, toy_args):
    """One rank, so the real Trainer runs in this process (test_core_train's `_gradients`)."""
    mode = ["--training.grad_accum_weighting", "microbatches"]
    doc0 = _gradients(tmp_path, "0", 1, toy_args)  # one microbatch: the mean over doc 0's tokens
    doc3 = _gradients(tmp_path, "3", 1, toy_args)
    release = _gradients(tmp_path, "0,3", 1, [*toy_args, *mode])
    tokens = _gradients(tmp_path, "0,3", 1, toy_args)
    both = _gradients(tmp_path, "03", 1, toy_args)
    differs = False
    for name in doc0:
        torch.testing.assert_close(release[name], (doc0[name] + doc3[name]) / 2, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(tokens[name], both[name], atol=1e-6, rtol=0, msg=name)
        differs |= not torch.allclose(release[name], tokens[name], atol=1e-5)
    assert differs, "documents 0 and 3 must have different token counts for the two rules to differ"


def test_the_option_is_validated():
    from bagel_titan.config.manager import load_job_config
    from bagel_titan.errors import UserError

    assert load_job_config([])[0].training.grad_accum_weighting == "tokens"
    with pytest.raises((UserError, SystemExit, ValueError)):
        load_job_config(["--training.grad_accum_weighting", "samples"])
