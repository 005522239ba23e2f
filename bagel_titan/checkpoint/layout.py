"""On-disk layout of a run's checkpoints: `<run>/<folder>/step-<N>/` plus a `COMPLETE` marker.

DCP writes the data files and `.metadata` into the step folder; the marker is written last,
atomically (temp file, fsync, rename), once every rank's data and the metadata are on disk. A
folder without the marker is a save that was interrupted and is never loaded. Deleting a
checkpoint removes the marker first, so a crash during deletion cannot leave a folder that
looks complete but lacks files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the marker records about a complete checkpoint."""

    step: int
    world_size: int
    dp_world_size: int


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def step_of(folder_name: str) -> int | None:
    """N for a folder named `step-N`, else None."""
    match = _STEP_DIR.match(folder_name)
    return int(match.group(1)) if match else None


def read_marker(path: str) -> CheckpointInfo | None:
    """The marker of checkpoint folder `path`, or None if the checkpoint is incomplete."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return CheckpointInfo(**json.load(f))
    except FileNotFoundError:
        return None


def write_marker(path: str, info: CheckpointInfo) -> None:
    """Mark `path` complete: durable and atomic (a reader sees no marker or a whole one)."""
    tmp = os.path.join(path, f".{MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(info), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    _fsync_dir(path)


def list_steps(root: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) step numbers under `root`, each ascending."""
    complete, incomplete = [], []
    if not os.path.isdir(root):
        return complete, incomplete
    for name in os.listdir(root):
        step = step_of(name)
        if step is not None:
            target = complete if read_marker(os.path.join(root, name)) else incomplete
            target.append(step)
    return sorted(complete), sorted(incomplete)


def remove_checkpoint(path: str) -> None:
    """Delete a step folder, marker first."""
    try:
        os.remove(os.path.join(path, MARKER))
        _fsync_dir(path)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
