"""The one gather/scatter layer between full tensors on disk and (possibly FSDP2-sharded) model
tensors, and a safetensors writer that takes one tensor at a time.

- `local_region(t)`: which slice of the full tensor this rank holds (all of it for a plain
  tensor), so a loader reads only those rows from disk (`safe_open(...).get_slice`).
- `assign_region(t, part)` copies such a slice into the local shard; `assign_full(t, full)`
  cuts the shard from a full tensor every rank holds (recomputed tables).
- `gather_full(t, dtype)` unshards ONE tensor (collective), cast first: an elementwise cast
  commutes with the gather, so the transient full tensor is already in the export dtype.
- `SafetensorsStreamWriter` writes the header from the shapes up front, then each tensor's
  bytes as it arrives: the writer never holds more than the tensor it is given.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

Region = tuple[slice, ...]

# torch 2.13 renames all_gather_into_tensor (same signature); 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def local_region(t: torch.Tensor) -> Region:
    """The slices of the full tensor that this rank's local part of `t` holds."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def assign_region(t: torch.Tensor, part: torch.Tensor) -> None:
    """Copy `part` (the `local_region(t)` slice of the full tensor, any dtype/device) into the
    local part of `t`."""
    local = _local(t)
    if tuple(part.shape) != tuple(local.shape):
        raise ValueError(f"shape mismatch: slice {tuple(part.shape)} vs local shard {tuple(local.shape)}")
    local.copy_(part)


@torch.no_grad()
def assign_full(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor that every rank holds (read or recomputed alike) into `t`: the local
    slice is cut locally, without communication, and only the slice is moved to the device."""
    if tuple(full.shape) != tuple(t.shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(full.shape)} vs model {tuple(t.shape)}")
    assign_region(t, full[local_region(t)])


@torch.no_grad()
def gather_full(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full tensor of `t` on the host, cast to `dtype`. Collective for a DTensor: every
    rank of its mesh must call it (each gets the full tensor, then drops it)."""
    dtype = dtype or t.dtype
    if not isinstance(t, DTensor):
        return t.detach().to("cpu", dtype)
    mesh = t.device_mesh
    if mesh.ndim == 1 and tuple(t.placements) == (Shard(0),) and t.dim() > 0:
        return _gather_rows(t, dtype)
    # The local part is cast (an elementwise cast commutes with the gather) and moved to the
    # mesh's device: an offloaded (CPU) shard of a CUDA mesh is gathered over NCCL.
    local = t.to_local().detach().to(device=mesh.device_type, dtype=dtype)
    full = DTensor.from_local(
        local, mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    ).full_tensor()
    return full.to("cpu")


GATHER_PIECE_BYTES = 64 * 2**20
"""Row pieces of at most this size per rank are gathered at a time (see `_gather_rows`)."""


def _gather_rows(t: DTensor, dtype: torch.dtype) -> torch.Tensor:
    """FSDP2's layout (rank r holds rows [r*block, (r+1)*block)): the full tensor assembled in
    one buffer from small gathered pieces, so that besides the result only a few pieces are
    ever alive (DTensor.full_tensor would hold more full-size copies while it gathers and unpads).
    """
    mesh = t.device_mesh
    world, rows = mesh.size(), t.shape[0]
    block = -(-rows // world)
    local = t.to_local().detach()
    row_bytes = max(1, math.prod(t.shape[1:]) * dtype.itemsize)
    step = max(1, GATHER_PIECE_BYTES // row_bytes)
    full = torch.empty(rows, *t.shape[1:], dtype=dtype, device="cpu")
    for start in range(0, block, step):
        n = min(step, block - start)
        piece = local.new_zeros(n, *t.shape[1:], dtype=dtype, device=mesh.device_type)
        have = max(0, min(n, local.shape[0] - start))
        if have:
            piece[:have].copy_(local[start : start + have])
        gathered = piece.new_empty(world * n, *t.shape[1:])
        _all_gather_single(gathered, piece, group=mesh.get_group())
        for r in range(world):
            first = r * block + start
            count = max(0, min(n, rows - first))
            if count:
                full[first : first + count].copy_(gathered[r * n : r * n + count])
    return full


# -- safetensors, streamed ------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsStreamWriter:
    """Write a `.safetensors` file whose tensors arrive one at a time, in the order declared.

    `layout` maps name -> (dtype, shape), in file order. The file is the standard format (the
    `safetensors` library and the release code read it); mode 0644 so the group can read it.
    """

    def __init__(
        self,
        path: str,
        layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._expected.append((name, dtype, tuple(shape), size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.path = path
        self._file = open(path, "wb")
        os.chmod(path, 0o644)
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape, size = self._expected[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected "
                f"{expected} {dtype} {shape} next"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expected):
            missing = [e[0] for e in self._expected[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} tensors never written: {missing[:5]}")

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
