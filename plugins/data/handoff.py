"""A batch's trip from a loader worker to the training process in one piece.

torch's DataLoader pickles a worker's batch with every tensor in its own shared-memory
segment, and its default `file_descriptor` strategy hands each segment's fd over a fresh,
HMAC-authenticated socket connection to the worker's resource-sharer thread (which needs the
worker's GIL). A BAGEL pack holds about 25 tensors, so the training process paid some 25 of
those handshakes per step: 8-9 ms of a 25 ms debug step (bench_overhead, py-spy). The
`file_system` strategy (names instead of fds) made batches arrive corrupted and was reverted.

Here the worker packs a batch into one buffer instead: `FlatBatch.pack` pickles the batch with
every CPU tensor replaced by a slot number and copies the tensors, 64-byte aligned, into one
uint8 buffer. A small buffer travels inside the pickle (through the result pipe: a copy of a
few hundred KB costs less than one handshake); a large one in one shared-memory segment (one
handshake per batch). `unpack()` in the training process rebuilds the batch with its tensors as
views of that buffer. Contents, dtypes and shapes are exact; a tensor object that appears twice
in the batch comes back as one tensor; tensors come back contiguous and no longer share storage
with other tensors they were views of in the worker.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64
"""Byte alignment of every tensor in the buffer (any dtype's element size divides it)."""

INLINE_BYTES = 512 << 10
"""Buffers up to this size travel inside the pickle; larger ones in shared memory. Measured on
2 shared CPU cores (main-process CPU per batch): 256 KiB 0.28 ms piped vs 0.40 ms in a segment,
1 MiB 1.5 ms vs 0.6 ms (the pipe moves 64 KiB per wake-up of the worker's writer thread)."""


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
    """One batch as a pickled skeleton plus all its tensors in one buffer."""

    skeleton: bytes
    """The batch pickled with its tensors as slot numbers."""
    layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
    """Per slot: (byte offset in the buffer, dtype, shape)."""
    inline: bytes | None
    """The buffer itself when it is small (it travels in the pickle)."""
    shared: torch.Tensor | None
    """[nbytes] uint8 buffer in shared memory when it is large."""

    @classmethod
    def pack(cls, batch: Any, inline_bytes: int | None = None) -> "FlatBatch":
        """`inline_bytes`: the largest buffer sent inside the pickle (default `INLINE_BYTES`)."""
        if inline_bytes is None:
            inline_bytes = INLINE_BYTES
        file = io.BytesIO()
        pickler = _SlotPickler(file)
        pickler.dump(batch)
        layout, end = [], 0
        for t in pickler.tensors:
            layout.append((end, t.dtype, tuple(t.shape)))
            end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        buffer = torch.empty(end, dtype=torch.uint8)
        if end > inline_bytes:
            buffer.share_memory_()  # before filling: moving it later would copy it once more
        for t, view in zip(pickler.tensors, _views(buffer, layout)):
            view.copy_(t)
        if end > inline_bytes:
            return cls(file.getvalue(), layout, None, buffer)
        return cls(file.getvalue(), layout, buffer.numpy().tobytes(), None)

    def unpack(self) -> Any:
        if self.shared is not None:
            buffer = self.shared
        else:
            # bytearray: a writable buffer, so the tensors are ordinary writable tensors
            buffer = (
                torch.frombuffer(bytearray(self.inline), dtype=torch.uint8)
                if self.inline
                else torch.empty(0, dtype=torch.uint8)
            )
        return _SlotUnpickler(io.BytesIO(self.skeleton), _views(buffer, self.layout)).load()


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
