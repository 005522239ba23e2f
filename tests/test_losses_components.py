"""The `ce` and `flow_mse` loss components: (sum, count) terms, options, and the fixture's loss."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_SEED0
from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config
from bagel_titan.protocols import ModelOutputs, loss_counts
from bagel_titan_plugins.bagel.parity import load_fixture_batch, load_fixture_model
from bagel_titan_plugins.bagel.spec import bagel_loss_term, bagel_outputs
from bagel_titan_plugins.losses.ce import CEFactory
from bagel_titan_plugins.losses.flow_mse import FlowMSEFactory
from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions

FIXTURE = REFERENCE_SEED0


def test_ce_sum_and_count_with_and_without_reweighting():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([0.5, 0.5, 1.0])
    per_token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    outputs = ModelOutputs(logits=logits, labels=labels, extras={"label_weights": weights})
    plain_loss, weighted_loss = CEFactory()(None), CEFactory()(CEOptions(reweight=True))
    assert (plain_loss.count_name, weighted_loss.count_name) == ("labels", "label_weight_sum")
    plain = plain_loss(outputs, 3)
    assert plain.count == 3 and torch.allclose(plain.sum, per_token.sum())
    weighted = weighted_loss(outputs, 2.0)
    assert weighted.count == pytest.approx(2.0) and torch.allclose(weighted.sum, (per_token * weights).sum())


def test_flow_mse_means_over_channels_and_counts_tokens():
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    outputs = ModelOutputs(extras={"pred_velocity": pred, "target_velocity": target})
    loss = FlowMSEFactory()(None)
    term = loss(outputs, 2)
    assert (
        loss.count_name == "noised_tokens" and term.count == 2 and term.sum.item() == pytest.approx(1.0 + 1.0)
    )
    summed = FlowMSEFactory()(FlowMSEOptions(channel_reduction="sum"))(outputs, 2)
    assert summed.sum.item() == pytest.approx(4.0 + 4.0)
    empty = loss(ModelOutputs(logits=torch.ones(1, 2, requires_grad=True)), 0)
    assert empty.count == 0 and empty.sum.item() == 0.0 and empty.sum.requires_grad


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'re_weight' in \[loss.ce\].*reweight"):
        load_job_config(["--loss.ce.re_weight", "true"])
    with pytest.raises(ConfigError, match=r"'shift' in \[loss.flow_mse\].*channel_reduction"):
        load_job_config(["--loss.flow_mse.shift", "3"])


def test_missing_outputs_are_named():
    with pytest.raises(ValueError, match="logits"):
        CEFactory()(None)(ModelOutputs(), 1)
    with pytest.raises(ValueError, match="label_weights"):
        CEFactory()(CEOptions(reweight=True))(
            ModelOutputs(logits=torch.zeros(1, 2), labels=torch.zeros(1, dtype=torch.long)), 1.0
        )
    with pytest.raises(ValueError, match="pred_velocity"):
        FlowMSEFactory()(None)(ModelOutputs(logits=torch.zeros(1, 2)), 3)


def test_a_count_the_spec_does_not_give_is_named():
    class Spec:
        def loss_counts(self, batch):
            return {"labels": 3}

    with pytest.raises(ValueError, match=r"\['flow_mse'\].*labels"):
        loss_counts(Spec(), [CEFactory()(None), FlowMSEFactory()(None)], object())
    assert loss_counts(Spec(), [CEFactory()(None)], object()) == [3.0]


def test_fixture_total_loss_through_the_components():
    model = load_fixture_model(str(FIXTURE))
    batch, _, info = load_fixture_batch(str(FIXTURE))
    r = model(batch)
    outputs = bagel_outputs(r, batch)
    expected = load_file(FIXTURE / "expected.safetensors")
    ce, mse = (
        bagel_loss_term(CEFactory()(None), outputs, batch),
        bagel_loss_term(FlowMSEFactory()(None), outputs, batch),
    )
    total = info["ce_weight"] * ce.sum / ce.count + info["mse_weight"] * mse.sum / mse.count
    torch.testing.assert_close(total, expected["total_loss"], atol=1e-5, rtol=0)
    rw = bagel_loss_term(CEFactory()(CEOptions(reweight=True)), outputs, batch)
    torch.testing.assert_close(rw.sum / rw.count, expected["ce_loss_reweighted"], atol=1e-5, rtol=0)
