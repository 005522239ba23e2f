"""CheckpointManager on one process (gloo): layout, markers, retention, error messages.

Multi-rank behaviour (sharding, per-rank data state, async, crashes) is in test_ckpt_resume.py
and test_ckpt_crash.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bagel_titan.checkpoint.layout import MARKER, SAVING, list_steps, read_marker
from bagel_titan.checkpoint.manager import CheckpointError, CheckpointManager, ResumePoint
from bagel_titan.checkpoint.states import ModelState, OptimizerState
from bagel_titan.train_state import TrainState
from bagel_titan.config.job_config import Checkpoint
from bagel_titan.distributed.utils import destroy_distributed, init_distributed
from bagel_titan.optim.ema import EMA


@pytest.fixture(scope="module", autouse=True)
def single_rank_group():
    init_distributed(torch.device("cpu"))
    yield
    destroy_distributed()


class Counter:
    """A stateful 'dataloader'."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _job(tmp_path: Path, with_ema: bool = True, **cfg):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    states = {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, opt),
        "train_state": TrainState(),
        "dataloader": Counter(),
    }
    if with_ema:
        states["ema"] = EMA(model, decay=0.5)
    config = Checkpoint(enable=True, interval=2, **cfg)
    return model, opt, states, CheckpointManager(config, str(tmp_path), states, 0, 1)


def _train(model, opt, states, manager, steps, start=0) -> None:
    for step in range(start + 1, start + steps + 1):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        states["train_state"].step = step
        states["dataloader"].position += 3
        if "ema" in states:
            states["ema"].update(step)
        manager.maybe_save(step)


def test_round_trip_and_marker(tmp_path: Path) -> None:
    model, opt, states, manager = _job(tmp_path)
    _train(model, opt, states, manager, 4)
    assert list_steps(str(tmp_path / "checkpoint")) == ([2, 4], [])
    info = read_marker(str(tmp_path / "checkpoint" / "step-4"))
    assert (info.step, info.world_size, info.dp_world_size) == (4, 1, 1)
    saved = model.weight.detach().clone()

    model2, _, states2, manager2 = _job(tmp_path)
    assert not torch.equal(model2.weight, saved)
    assert manager2.load() == 4 and manager2.restored_data_state
    torch.testing.assert_close(model2.weight, saved, rtol=0, atol=0)
    assert states2["dataloader"].position == 12 and states2["train_state"].step == 4
    assert manager2.load(step=2) == 2 and states2["dataloader"].position == 6
    assert not manager2.maybe_save(2), "a loaded step is not saved again"


def test_peek_names_what_load_restores_without_loading(tmp_path: Path) -> None:
    """peek() on real DCP checkpoints: none, complete, an incomplete newest (no marker), a
    damaged newest (moved aside, as load does), load_step, another data-parallel layout and
    initial_load_path; load(resume=...) then restores exactly that."""
    peek = CheckpointManager.peek
    config = Checkpoint(enable=True, interval=2)
    nothing = ResumePoint(path=None, step=0, model_only=False, restores_data=False)
    assert peek(config, str(tmp_path), dp_world_size=1) == nothing
    model, opt, states, manager = _job(tmp_path)
    _train(model, opt, states, manager, 6)
    root = tmp_path / "checkpoint"
    assert peek(config, str(tmp_path), 1) == ResumePoint(str(root / "step-6"), 6, False, True)
    assert peek(config, str(tmp_path), 2).restores_data is False, "another layout restarts the data"

    (root / "step-6" / MARKER).unlink()  # an interrupted save: never chosen
    (root / "step-6" / SAVING).touch()
    weights_before = states["model"].model.weight.detach().clone()
    point = peek(config, str(tmp_path), 1)
    assert point == ResumePoint(str(root / "step-4"), 4, False, True)
    torch.testing.assert_close(states["model"].model.weight, weights_before, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"load_step = 6 .*incomplete"):
        peek(Checkpoint(enable=True, load_step=6), str(tmp_path), 1)

    data_file = next(p for p in (root / "step-4").iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:-1])  # damaged: falls back, moves it aside
    assert peek(config, str(tmp_path), 1) == ResumePoint(str(root / "step-2"), 2, False, True)
    assert not (root / "step-4").exists() and list(root.glob("step-4.unusable-*"))
    assert peek(Checkpoint(enable=True, load_step=2), str(tmp_path), 1).step == 2

    _, _, states2, manager2 = _job(tmp_path)
    assert manager2.load(resume=peek(config, str(tmp_path), 1)) == 2
    assert manager2.restored_data_state and states2["dataloader"].position == 6

    initial = str(root / "step-2")
    model_only = Checkpoint(enable=True, initial_load_path=initial, initial_load_model_only=True)
    assert peek(model_only, str(tmp_path / "other"), 1) == ResumePoint(initial, 0, True, False)
    full = Checkpoint(enable=False, initial_load_path=initial, initial_load_model_only=False)
    assert peek(full, str(tmp_path / "other"), 1) == ResumePoint(initial, 2, False, True)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        peek(Checkpoint(enable=True, initial_load_path=str(root / "step-6")), str(tmp_path / "other"), 1)


def test_incomplete_folders_are_never_loaded_and_get_cleaned(tmp_path: Path) -> None:
    model, opt, states, manager = _job(tmp_path, keep_latest_k=1)
    _train(model, opt, states, manager, 2)
    (tmp_path / "checkpoint" / "step-2" / MARKER).unlink()  # as if killed before the marker
    model, opt, states, manager = _job(tmp_path, keep_latest_k=1)
    assert manager.load() == 0
    with pytest.raises(CheckpointError, match=r"load_step = 2 .*incomplete.*complete checkpoints: none"):
        manager.load(step=2)
    _train(model, opt, states, manager, 6)
    # step 2 was re-saved over the leftover; retention then kept only the newest.
    assert list_steps(str(tmp_path / "checkpoint")) == ([6], [])


def test_missing_component_and_bad_initial_load_path(tmp_path: Path) -> None:
    model, opt, states, manager = _job(tmp_path / "a", with_ema=False)
    _train(model, opt, states, manager, 2)
    *_, manager_ema = _job(tmp_path / "a", with_ema=True)
    with pytest.raises(CheckpointError, match=r"no state for \['ema'\]"):
        manager_ema.load()
    *_, bad = _job(tmp_path / "b", initial_load_path=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        bad.load()
    # Model-only loading ignores the missing EMA; the step and data start fresh.
    _, _, states_c, from_a = _job(
        tmp_path / "c", initial_load_path=str(tmp_path / "a" / "checkpoint" / "step-2")
    )
    assert from_a.load() == 0 and states_c["dataloader"].position == 0
    torch.testing.assert_close(states_c["model"].model.weight, model.weight, rtol=0, atol=0)


def test_config_errors(tmp_path: Path) -> None:
    """Checked once, by the config (the manager trusts its section)."""
    from bagel_titan.config.fields import ConfigError
    from bagel_titan.config.manager import load_job_config

    with pytest.raises(ValueError, match="interval"):
        Checkpoint(enable=True, interval=0)
    with pytest.raises(ConfigError, match="async_mode"):
        load_job_config(["--checkpoint.async_mode", "sometimes"])


def test_exclude_frozen_leaves_frozen_parameters_out(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    def build():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        model[0].requires_grad_(False)
        states = {"model": ModelState(model, exclude_frozen=True)}
        return model, CheckpointManager(Checkpoint(enable=True), str(tmp_path), states, 0, 1)

    torch.manual_seed(0)
    model, manager = build()
    manager.maybe_save(1, force=True)
    keys = FileSystemReader(str(tmp_path / "checkpoint" / "step-1")).read_metadata().state_dict_metadata
    assert sorted(k for k in keys if k.startswith("model.")) == ["model.1.bias", "model.1.weight"]
    model2, manager2 = build()
    frozen_before = model2[0].weight.detach().clone()
    assert manager2.load() == 1
    torch.testing.assert_close(model2[1].weight, model[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(model2[0].weight, frozen_before, rtol=0, atol=0)
