"""The DCP storage writer of bagel-titan checkpoints: DCP's file writer with fsync, plus a
fault-injection pause that crash tests use to `kill -9` a job in the middle of a save."""

from __future__ import annotations

import os
import time

from torch.distributed.checkpoint import FileSystemWriter

PAUSE_ENV = "BAGEL_TITAN_TEST_SAVE_PAUSE"
"""``"<step>:<seconds>"``: after this rank wrote its data for checkpoint `<step>` (before the
metadata and the completeness marker), sleep `<seconds>`. For crash tests only."""


def _pause_for(step: int) -> float:
    spec = os.environ.get(PAUSE_ENV, "")
    if not spec:
        return 0.0
    try:
        pause_step, seconds = spec.split(":")
        return float(seconds) if int(pause_step) == step else 0.0
    except ValueError as e:
        raise ValueError(f"{PAUSE_ENV} must look like '<step>:<seconds>', got {spec!r}") from e


class CheckpointWriter(FileSystemWriter):
    """One file per rank, fsynced, for checkpoint `step`."""

    def __init__(self, path: str, step: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._pause_s = _pause_for(step)

    def write_data(self, plan, planner):  # type: ignore[override]
        future = super().write_data(plan, planner)
        if self._pause_s:
            future.wait()
            time.sleep(self._pause_s)
        return future
