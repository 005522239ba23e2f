"""Peak bytes of live tensor storage on a device: what `torch.cuda.max_memory_allocated` reports
on a GPU, measured the same way on any device (the CPU included), to validate the memory planner.

Every tensor an operator returns while the mode is active is counted until its storage is freed;
tensors alive on entry (parameters, optimizer state) are counted by the caller as the baseline.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveMemory(TorchDispatchMode):
    """`with LiveMemory("cpu") as live: ...`; then `live.peak` (bytes above the entry state)."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = torch.device(device).type
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or storage.nbytes() == 0:
                    continue
                self._seen[key] = storage.nbytes()
                self.current += storage.nbytes()
                weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out
