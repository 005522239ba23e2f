"""The `ce` and `flow_mse` loss components: (sum, count) terms, options, and the fixture's loss."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_SEED0
from bagel_titan.protocols import ModelOutputs
from bagel_titan_plugins.bagel.parity import load_fixture_batch, load_fixture_model
from bagel_titan_plugins.losses.ce import CEFactory
from bagel_titan_plugins.losses.flow_mse import FlowMSEFactory

FIXTURE = REFERENCE_SEED0


class _Batch:
    def __init__(self, n_ce, n_mse, weights=None):
        self.packed_label_ids = torch.zeros(n_ce, dtype=torch.long)
        self.mse_loss_indexes = torch.arange(n_mse)
        self.ce_loss_weights = weights if weights is not None else torch.ones(n_ce)


def test_ce_sum_and_count_with_and_without_reweighting():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([0.5, 0.5, 1.0])
    per_token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    outputs = ModelOutputs(logits=logits, labels=labels, label_weights=weights)
    batch = _Batch(3, 0, weights)
    plain = CEFactory()({})(outputs, batch)
    assert plain.count == 3 and torch.allclose(plain.sum, per_token.sum())
    weighted = CEFactory()({"reweight": True})(outputs, batch)
    assert weighted.count == pytest.approx(2.0) and torch.allclose(weighted.sum, (per_token * weights).sum())


def test_flow_mse_means_over_channels_and_counts_tokens():
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    term = FlowMSEFactory()({})(ModelOutputs(pred_velocity=pred, target_velocity=target), _Batch(0, 2))
    assert term.count == 2 and term.sum.item() == pytest.approx(1.0 + 1.0)
    summed = FlowMSEFactory()({"channel_reduction": "sum"})(ModelOutputs(pred_velocity=pred, target_velocity=target), _Batch(0, 2))
    assert summed.sum.item() == pytest.approx(4.0 + 4.0)


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match="reweight"):
        CEFactory()({"re_weight": True})
    with pytest.raises(ValueError, match="channel_reduction"):
        FlowMSEFactory()({"shift": 3})


def test_missing_outputs_are_named():
    with pytest.raises(ValueError, match="logits"):
        CEFactory()({})(ModelOutputs(), _Batch(1, 0))
    with pytest.raises(ValueError, match="pred_velocity"):
        FlowMSEFactory()({})(ModelOutputs(logits=torch.zeros(1, 2)), _Batch(0, 3))


def test_fixture_total_loss_through_the_components():
    model = load_fixture_model(str(FIXTURE))
    batch, _, info = load_fixture_batch(str(FIXTURE))
    r = model(batch)
    outputs = ModelOutputs(logits=r.ce_logits, labels=batch.packed_label_ids, label_weights=batch.ce_loss_weights,
                           pred_velocity=r.pred_velocity, target_velocity=r.target_velocity)
    expected = load_file(FIXTURE / "expected.safetensors")
    ce, mse = CEFactory()({})(outputs, batch), FlowMSEFactory()({})(outputs, batch)
    total = info["ce_weight"] * ce.sum / ce.count + info["mse_weight"] * mse.sum / mse.count
    torch.testing.assert_close(total, expected["total_loss"], atol=1e-5, rtol=0)
    rw = CEFactory()({"reweight": True})(outputs, batch)
    torch.testing.assert_close(rw.sum / rw.count, expected["ce_loss_reweighted"], atol=1e-5, rtol=0)
