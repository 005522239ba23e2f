"""Issue 19 items 5, 6, 7 and a full disk during a save (one process, gloo): a damaged newest
checkpoint falls back to the previous one and is kept; loading runs no code from a checkpoint;
retention touches only this project's checkpoints; ENOSPC is one clear error."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from bagel_titan.checkpoint.layout import MARKER, SAVING, list_steps
from bagel_titan.checkpoint.manager import CheckpointError, CheckpointManager
from bagel_titan.checkpoint.safe_io import UnsafeCheckpointError, decode_state, encode_state
from bagel_titan.checkpoint.states import ModelState, OptimizerState
from bagel_titan.checkpoint.writer import CheckpointWriter
from bagel_titan.config.job_config import Checkpoint
from bagel_titan.distributed.utils import destroy_distributed, init_distributed
from bagel_titan.train_state import TrainState


@pytest.fixture(scope="module", autouse=True)
def single_rank_group():
    init_distributed(torch.device("cpu"))
    yield
    destroy_distributed()


class Position:
    """A stateful 'dataloader' whose state has tuples, int keys and bytes (JSON must keep them)."""

    def __init__(self) -> None:
        self.state = {"position": 0, "window": (1, 2), 3: b"\x00\xff"}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = state


def _job(root: Path, **cfg):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    states = {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, opt),
        "train_state": TrainState(),
        "dataloader": Position(),
    }
    manager = CheckpointManager(Checkpoint(enable=True, interval=2, **cfg), str(root), states, 0, 1)
    return model, opt, states, manager


def _train(model, opt, states, manager, steps: int) -> dict[int, torch.Tensor]:
    weights = {}
    for step in range(1, steps + 1):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        states["train_state"].step = step
        states["dataloader"].state["position"] += 3
        manager.maybe_save(step)
        weights[step] = model.weight.detach().clone()
    return weights


def _ckpt(root: Path) -> Path:
    return root / "checkpoint"


def test_json_state_round_trips_exactly() -> None:
    state = {"a": (1, [2.5, None]), 7: b"\x01", "t": torch.arange(3), "nested": {(1, 2): "x"}}
    back = decode_state(encode_state(state))
    assert back["a"] == (1, [2.5, None]) and back[7] == b"\x01" and back["nested"] == {(1, 2): "x"}
    assert torch.equal(back["t"], torch.arange(3))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "metadata"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(tmp_path: Path, damage: str) -> None:
    model, opt, states, manager = _job(tmp_path)
    weights = _train(model, opt, states, manager, 4)
    step4 = _ckpt(tmp_path) / "step-4"
    data = next(step4.glob("*.distcp"))
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete":
        data.unlink()
    else:
        (step4 / ".metadata").write_bytes(b"not a pickle")

    model2, _, states2, manager2 = _job(tmp_path)
    assert manager2.load() == 2
    assert torch.equal(model2.weight, weights[2])
    assert states2["dataloader"].state == {"position": 6, "window": (1, 2), 3: b"\x00\xff"}
    assert not step4.exists()
    kept = list(_ckpt(tmp_path).glob("step-4.unusable-*"))
    assert len(kept) == 1 and MARKER in os.listdir(kept[0]), "the damaged checkpoint is kept, not deleted"


def test_load_step_names_the_damage(tmp_path: Path) -> None:
    model, opt, states, manager = _job(tmp_path, load_step=4)
    _train(model, opt, states, manager, 4)
    (_ckpt(tmp_path) / "step-4" / ".metadata").write_bytes(b"junk")
    *_, manager2 = _job(tmp_path, load_step=4)
    with pytest.raises(CheckpointError, match=r"step-4 is damaged: its DCP metadata does not read"):
        manager2.load()


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_loading_runs_no_code_from_the_checkpoint(tmp_path: Path) -> None:
    model, opt, states, manager = _job(tmp_path)
    _train(model, opt, states, manager, 2)
    step2 = _ckpt(tmp_path) / "step-2"
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from bagel_titan.checkpoint.safe_io import load_metadata

    saved = load_metadata(str(step2)).state_dict_metadata
    assert isinstance(saved["dataloader.dp_rank_0"], TensorStorageMetadata)  # JSON bytes, not a pickle
    assert isinstance(saved["rng.rank_0"], TensorStorageMetadata)
    # A metadata file that names a function is refused before anything is unpickled from it.
    metadata = step2 / ".metadata"
    original = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(Boom()))
    *_, manager2 = _job(tmp_path, load_step=2)
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        manager2.load()
    # A non-tensor value that is a pickled callable is refused as well (weights_only).
    metadata.write_bytes(original)
    from bagel_titan.checkpoint.safe_io import SafeLoadPlanner

    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    import io

    class Item:
        class dest_index:
            fqn = "train_state.step"

    with pytest.raises(UnsafeCheckpointError, match="not plain data"):
        buffer = io.BytesIO()
        torch.save(Boom(), buffer)
        buffer.seek(0)
        planner.load_bytes(Item, buffer)


def test_retention_touches_only_its_own_checkpoints(tmp_path: Path) -> None:
    root = _ckpt(tmp_path)
    foreign = root / "step-1"  # a user's folder that happens to be named like a checkpoint
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    interrupted = root / "step-3"  # this project's interrupted save
    interrupted.mkdir()
    (interrupted / SAVING).write_text("")
    model, opt, states, manager = _job(tmp_path, keep_latest_k=0)
    _train(model, opt, states, manager, 6)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not interrupted.exists()
    assert list_steps(str(root)) == ([2, 4, 6], [])  # keep_latest_k = 0 keeps all

    *_, manager_k = _job(tmp_path / "k", keep_latest_k=1)
    other = _ckpt(tmp_path / "k") / "step-1"
    other.mkdir(parents=True)
    (other / "data.bin").write_bytes(b"x")
    model, opt, states, manager_k = _job(tmp_path / "k", keep_latest_k=1)
    _train(model, opt, states, manager_k, 4)
    assert list_steps(str(_ckpt(tmp_path / "k"))) == ([4], [])
    assert (other / "data.bin").exists()


def test_full_disk_during_a_save_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    model, opt, states, manager = _job(tmp_path)
    _train(model, opt, states, manager, 2)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(CheckpointWriter, "write_data", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*step-4: No space left on device"):
        manager.maybe_save(4)
    monkeypatch.undo()
    assert list_steps(str(_ckpt(tmp_path))) == ([2], [4])  # the partial save is marked as such
    manager.maybe_save(6)
    assert list_steps(str(_ckpt(tmp_path))) == ([2, 6], [])
