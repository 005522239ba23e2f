"""EMA arithmetic, schedule (start_step, update_interval), frozen parameters and state dicts,
in one process. Sharded EMA under FSDP is covered by the 2-rank runs in test_ckpt_resume.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bagel_titan.optim.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    return model


def _perturb(model: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale)


def test_update_follows_the_schedule_and_formula() -> None:
    model = _model()
    ema = EMA(model, decay=0.75, start_step=2, update_interval=2)
    assert set(ema.shadow) == {"0.weight", "1.weight", "1.bias"}  # frozen bias excluded
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(1, 7):
        _perturb(model, 0.5)
        updated = ema.update(step)
        assert updated == (step % 2 == 0)
        params = dict(model.named_parameters())
        if updated:
            for name in expected:
                if step <= 2:
                    expected[name] = params[name].detach().clone()
                else:
                    expected[name] = 0.75 * expected[name] + 0.25 * params[name].detach()
        for name, value in expected.items():
            torch.testing.assert_close(ema.shadow[name], value)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())


def test_shadow_is_fp32_for_bf16_parameters() -> None:
    model = _model().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    before = model[0].weight.detach().float()
    _perturb(model, 1.0)
    ema.update(1)
    after = model[0].weight.detach().float()
    assert ema.shadow["0.weight"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["0.weight"], 0.5 * before + 0.5 * after)


def test_state_dict_round_trip_and_full_state_dict() -> None:
    model = _model()
    ema = EMA(model, decay=0.9)
    _perturb(model, 1.0)
    ema.update(1)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(_model(), decay=0.9)
    other.load_state_dict(saved)
    for name, value in saved.items():
        torch.testing.assert_close(other.shadow[name], value, rtol=0, atol=0)
    full = other.full_state_dict()
    assert set(full) == set(saved) and all(t.device.type == "cpu" for t in full.values())
    with pytest.raises(KeyError, match="missing.*1.bias"):
        other.load_state_dict({k: v for k, v in saved.items() if k != "1.bias"})


def test_copy_from_model_and_bad_arguments() -> None:
    model = _model()
    ema = EMA(model, decay=0.9)
    _perturb(model, 2.0)
    ema.copy_from_model()
    torch.testing.assert_close(ema.shadow["1.bias"], model[1].bias.detach())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="update_interval"):
        EMA(model, decay=0.9, update_interval=0)
    with pytest.raises(ValueError, match="no trainable"):
        EMA(nn.Linear(2, 2).requires_grad_(False), decay=0.9)
