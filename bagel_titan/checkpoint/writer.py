"""The DCP storage writer of bagel-titan checkpoints: DCP's file writer (one file per rank,
fsynced), reused across saves so an asynchronous save can reuse its pinned staging buffers,
plus a fault-injection pause that crash tests use to `kill -9` a job in the middle of a save."""

from __future__ import annotations

import os
import time

import torch
from torch.distributed.checkpoint import FileSystemWriter

from bagel_titan.checkpoint.layout import step_of

PAUSE_ENV = "BAGEL_TITAN_TEST_SAVE_PAUSE"
"""``"<step>:<seconds>"``: after this rank wrote its data for checkpoint `<step>` (before the
metadata and the completeness marker), sleep `<seconds>`. For crash tests only."""


def _pause_for(step: int | None) -> float:
    spec = os.environ.get(PAUSE_ENV, "")
    if not spec or step is None:
        return 0.0
    try:
        pause_step, seconds = spec.split(":")
        return float(seconds) if int(pause_step) == step else 0.0
    except ValueError as e:
        raise ValueError(f"{PAUSE_ENV} must look like '<step>:<seconds>', got {spec!r}") from e


class CheckpointWriter(FileSystemWriter):
    """Writes the step folder given as `checkpoint_id` to `dcp.save`/`dcp.async_save`.

    With CUDA, staging for asynchronous saves copies into pinned host buffers that are
    allocated once and reused (`cache_staged_state_dict`); without it each save allocates.
    """

    def __init__(self, root: str):
        super().__init__(
            root,
            single_file_per_rank=True,
            sync_files=True,
            thread_count=1,
            cache_staged_state_dict=torch.cuda.is_available(),
        )

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        pause_s = _pause_for(step_of(os.path.basename(str(self.path))))
        if pause_s:
            future.wait()
            time.sleep(pause_s)
        return future
