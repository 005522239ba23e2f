"""A batch's trip from a loader worker to the training process in one piece.

torch's DataLoader pickles a worker's batch with every tensor in its own shared-memory
segment, and its default `file_descriptor` strategy hands each segment's fd over a fresh,
HMAC-authenticated socket connection to the worker's resource-sharer thread (which needs the
worker's GIL). A BAGEL pack holds about 25 tensors, so the training process paid some 25 of
those handshakes per step: 8-9 ms of a 25 ms debug step (bench_overhead, py-spy). The
`file_system` strategy (names instead of fds) made batches arrive corrupted and was reverted.

Here the worker packs a batch into one buffer instead: `FlatBatch.pack` pickles the batch with
every CPU tensor replaced by a slot number and copies the tensors, 64-byte aligned, into one
uint8 buffer in one named shared-memory segment, which travels by name: the training process
opens it without any round trip to the worker (no fd handshake, no wait for the worker's
threads). On 2 loaded cores this beat both one fd-shared segment and sending the bytes through
the result pipe (64 KiB per wake-up of the worker's writer thread): fewer preemptions and less
main-process CPU per batch. `unpack()` in the training process rebuilds the batch with its
tensors as views of that buffer. Contents, dtypes and shapes are exact; a tensor object that
appears twice in the batch comes back as one tensor; tensors come back contiguous and no longer
share storage with other tensors they were views of in the worker.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64
"""Byte alignment of every tensor in the buffer (any dtype's element size divides it)."""


def _flattenable(obj: Any) -> bool:
    return (
        isinstance(obj, torch.Tensor)
        and type(obj) is torch.Tensor
        and obj.layout == torch.strided
        and obj.device.type == "cpu"
        and not obj.requires_grad
    )


class _SlotPickler(pickle.Pickler):
    """Pickles everything but the flattenable tensors, which become slot numbers."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.slots: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if not _flattenable(obj):
            return None
        slot = self.slots.get(id(obj))
        if slot is None:  # the same tensor object twice -> one slot
            slot = self.slots[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return slot


class _SlotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.tensors[pid]


@dataclass
class FlatBatch:
    """One batch as a pickled skeleton plus all its tensors in one shared-memory buffer."""

    skeleton: bytes
    """The batch pickled with its tensors as slot numbers."""
    layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
    """Per slot: (byte offset in the buffer, dtype, shape)."""
    segment: "NamedSegment | None"
    """The buffer (None when the batch has no tensor bytes)."""

    @classmethod
    def pack(cls, batch: Any) -> "FlatBatch":
        file = io.BytesIO()
        pickler = _SlotPickler(file)
        pickler.dump(batch)
        layout, end = [], 0
        for t in pickler.tensors:
            layout.append((end, t.dtype, tuple(t.shape)))
            end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        if end == 0:
            return cls(file.getvalue(), layout, None)
        buffer = torch.empty(end, dtype=torch.uint8)
        buffer.untyped_storage()._share_filename_cpu_()  # before filling: moving it copies it
        for t, view in zip(pickler.tensors, _views(buffer, layout)):
            view.copy_(t)
        return cls(file.getvalue(), layout, NamedSegment(buffer))

    def unpack(self) -> Any:
        buffer = torch.empty(0, dtype=torch.uint8) if self.segment is None else self.segment.buffer
        return _SlotUnpickler(io.BytesIO(self.skeleton), _views(buffer, self.layout)).load()


class NamedSegment:
    """A uint8 buffer in a named shared-memory segment, pickled by its name: the receiver opens
    it without a round trip to the sender. These are torch's `file_system` segments: refcounted
    in the segment (the last process to close one unlinks it) and unlinked by torch_shm_manager
    when every process using them has died, so an interrupted run leaves none behind."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer

    def __reduce__(self):
        storage = self.buffer.untyped_storage()
        manager, handle, size = storage._share_filename_cpu_()
        storage._shared_incref()  # the segment outlives the sender's buffer until it is opened
        return (_open_segment, (manager, handle, size))


def _open_segment(manager: bytes, handle: bytes, size: int) -> NamedSegment:
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, handle, size)
    storage._shared_decref()  # drops the sender's reference taken in __reduce__
    return NamedSegment(torch.empty(0, dtype=torch.uint8).set_(storage))


def _views(
    buffer: torch.Tensor, layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """The slots' tensors as views of `buffer` (one `as_strided` each: a few microseconds)."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    views = []
    for offset, dtype, shape in layout:
        if dtype not in typed:  # the buffer's length is a multiple of ALIGN, so of every itemsize
            typed[dtype] = buffer.view(dtype)
        strides, step = [], 1
        for n in reversed(shape):
            strides.append(step)
            step *= n
        views.append(typed[dtype].as_strided(shape, strides[::-1], offset // dtype.itemsize))
    return views
