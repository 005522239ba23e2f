"""The DCP storage writer of bagel-titan checkpoints: DCP's file writer (one file per rank,
fsynced), reused across saves so an asynchronous save can reuse its pinned staging buffers."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import FileSystemWriter


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
