"""On-disk layout of a run's checkpoints: `<run>/<folder>/step-<N>/` plus a `COMPLETE` marker.

A save first writes `SAVING` into the new step folder (so an interrupted save is recognisably
this project's), then DCP writes the data files and `.metadata`; the marker is written last,
atomically (temp file, fsync, rename), once every rank's data and the metadata are on disk. It
records the size and SHA-256 of every file, which `verify` checks before a checkpoint is loaded.
A folder without the marker is a save that was interrupted and is never loaded. Deleting a
checkpoint removes the marker first, so a crash during deletion cannot leave a folder that
looks complete but lacks files. Only folders with a readable marker, or with `SAVING` (an
interrupted save of this project), are ever deleted; anything else under the folder is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

MARKER = "COMPLETE"
SAVING = "SAVING"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the marker records about a complete checkpoint."""

    step: int
    world_size: int
    dp_world_size: int
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)
    """Every file of the checkpoint: {name: {"size": bytes, "sha256": hex digest}}."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def step_of(folder_name: str) -> int | None:
    """N for a folder named `step-N`, else None."""
    match = _STEP_DIR.match(folder_name)
    return int(match.group(1)) if match else None


def read_marker(path: str) -> CheckpointInfo | None:
    """The marker of checkpoint folder `path`, or None if it has none or one that does not
    read as a marker (then the folder is not a checkpoint this project can vouch for)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return CheckpointInfo(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _sha256(file: str) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest would need Python 3.11
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(path: str) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every file DCP wrote into the step folder `path`."""
    return {
        name: {"size": os.path.getsize(os.path.join(path, name)), "sha256": _sha256(os.path.join(path, name))}
        for name in sorted(os.listdir(path))
        if name not in (MARKER, SAVING, f".{MARKER}.tmp") and os.path.isfile(os.path.join(path, name))
    }


def verify(path: str, info: CheckpointInfo, read_metadata: Callable[[str], Any]) -> str | None:
    """What is wrong with the complete checkpoint `path` (None: nothing found): its DCP metadata
    must read, and every file the marker lists must be there with its size and checksum."""
    try:
        metadata = read_metadata(path)
    except Exception as exc:  # any failure to read it makes the checkpoint unusable
        return f"its DCP metadata does not read ({type(exc).__name__}: {exc})"
    referenced = {getattr(v, "relative_path", None) for v in (metadata.storage_data or {}).values()}
    for name in sorted(n for n in referenced if n):
        if not os.path.isfile(os.path.join(path, name)):
            return f"file {name} is missing"
    for name, expected in info.files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"file {name} is missing"
        size = os.path.getsize(file)
        if size != expected["size"]:
            return f"file {name} has {size} bytes, {expected['size']} were written"
        if _sha256(file) != expected["sha256"]:
            return f"file {name} does not match its recorded SHA-256"
    return None


def start_save(path: str) -> None:
    """Create the step folder of a new save, holding the `SAVING` note."""
    os.makedirs(path)
    with open(os.path.join(path, SAVING), "w") as f:
        f.write("a save in progress; it is complete once COMPLETE exists\n")


def move_aside(path: str, why: str) -> str:
    """Rename a step folder out of the `step-<N>` namespace (kept, never loaded or deleted)."""
    target = f"{path}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(target):
        target += "x"
    os.replace(path, target)
    return target


def write_marker(path: str, info: CheckpointInfo) -> None:
    """Mark `path` complete: durable and atomic (a reader sees no marker or a whole one)."""
    tmp = os.path.join(path, f".{MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(info), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    try:
        os.remove(os.path.join(path, SAVING))
    except FileNotFoundError:
        pass
    _fsync_dir(path)


def list_steps(root: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) step numbers under `root`, each ascending: complete ones have a
    readable marker, incomplete ones are this project's interrupted saves (`SAVING`, no marker).
    Other `step-<N>` folders are in neither list: nothing loads or deletes them."""
    complete: list[int] = []
    incomplete: list[int] = []
    if not os.path.isdir(root):
        return complete, incomplete
    for name in os.listdir(root):
        step = step_of(name)
        folder = os.path.join(root, name)
        if step is None or not os.path.isdir(folder):
            continue
        if read_marker(folder) is not None:
            complete.append(step)
        elif os.path.exists(os.path.join(folder, SAVING)):
            incomplete.append(step)
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
