"""Per-unit torch.compile composes with activation checkpointing on packed batches: the same
losses and gradients as the plain model, and no recompile when the next pack has another
length (the units are compiled with a symbolic token dimension).

Dynamo's graph capture and guards, where recompiles come from, are the same for every compiler
backend; "aot_eager" also runs AOTAutograd's partitioning and the checkpoint recomputation
without the minutes of C++ code generation inductor takes on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from bagel_titan.config.job_config import ActivationCheckpoint
from bagel_titan.distributed.activation_checkpoint import apply_activation_checkpointing
from bagel_titan.distributed.compile import apply_compile
from bagel_titan_plugins.attention.plugin import bagel_titan_attention_backends
from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for
from bagel_titan_plugins.bagel.spec import BagelSpec, build_bagel
from synthetic_bagel import Text, VaeImage, VitImage, synthetic_batch

ARCH = architecture_for("debug")
OPTS = BagelConfig()
PACKS = [  # three packs of different lengths, every modality in each
    [[VitImage(3, 4), Text(4, loss=False), Text(5)], [Text(3, loss=False), VaeImage(2, 3)]],
    [[VitImage(2, 5), Text(7, loss=False), Text(9)], [Text(5, loss=False), VaeImage(3, 3)], [Text(11)]],
    [[VitImage(4, 4), Text(6, loss=False), Text(3)], [Text(2, loss=False), VaeImage(2, 2)]],
]
AC_SETTINGS = {
    "none": (ActivationCheckpoint(mode="none"), "layer"),
    "full": (ActivationCheckpoint(mode="full"), "layer"),
    "selective-op": (ActivationCheckpoint(mode="selective"), "op"),
}


def _model(backend_name: str):
    backend = {b.name: b for b in bagel_titan_attention_backends()}[backend_name]
    torch.manual_seed(0)  # before the build: the frozen VAE takes its default init there
    model = build_bagel(ARCH, OPTS, backend=backend)
    model.init_weights()
    with torch.no_grad():
        model.llm2vae.weight.normal_(std=0.02)  # zero at init: give the velocity path gradients
    return model


def _step(model, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    batch = synthetic_batch(ARCH, OPTS, PACKS[index], torch.Generator().manual_seed(index))
    result = model(batch, torch.Generator().manual_seed(100 + index))
    loss = (
        result.ce_logits.float().logsumexp(-1).mean()
        + (result.pred_velocity - result.target_velocity).pow(2).mean()
    )
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.slow
@pytest.mark.parametrize("backend,ac", [("eager", "full"), ("sdpa", "full"), ("sdpa", "selective-op")])
def test_compiled_checkpointed_units_match_and_do_not_recompile(backend, ac):
    """eager + full AC + compile is the combination that once failed with "CheckpointError:
    Recomputed values ... have different metadata" (a mask built lazily inside the layer)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference, compiled = _model(backend), _model(backend)
    ac_config, granularity = AC_SETTINGS[ac]
    units = BagelSpec().sharding_units(compiled)
    apply_activation_checkpointing(compiled, units, ac_config, granularity)
    apply_compile(units, backend="aot_eager")

    graphs = []
    for index in range(len(PACKS)):
        expected_loss, expected_grads = _step(reference, index)
        loss, grads = _step(compiled, index)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert len(grads) == len(expected_grads)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1:] == [graphs[0]] * (len(PACKS) - 1), f"packs of new lengths recompiled: graphs {graphs}"
