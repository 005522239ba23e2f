"""Loading a checkpoint runs no code from it.

- The project's own non-tensor state (data positions, RNG states) is stored as JSON in a uint8
  tensor (`encode_state` / `decode_state`), never pickled. Tuples, bytes, tensors and dicts with
  non-string keys are tagged so they come back as they were.
- DCP pickles its `.metadata` file: `SafeReader` reads it with an unpickler that admits only
  DCP's own metadata classes and a few torch value types (dtypes, sizes).
- DCP loads non-tensor values (train state counters, optimizer hyper-parameters) with
  `torch.load(weights_only=False)`; `SafeLoadPlanner` loads them with `weights_only=True`
  (plain containers, numbers, strings and tensors only).
"""

from __future__ import annotations

import base64
import builtins
import collections
import copyreg
import io
import json
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from bagel_titan.errors import UserError


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint file names code that loading it would run."""


# -- JSON state in a tensor -------------------------------------------------------------------

_TAG = "__bagel_titan_type__"


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_to_json(v) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value.detach().cpu(), buffer)  # read back with weights_only=True
        return {_TAG: "tensor", "b64": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _to_json(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint as plain data: {value!r:.80}")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: _from_json(v) for k, v in value.items()}
    if kind == "tuple":
        return tuple(_from_json(v) for v in value["items"])
    if kind == "bytes":
        return base64.b64decode(value["b64"])
    if kind == "tensor":
        return torch.load(io.BytesIO(base64.b64decode(value["b64"])), weights_only=True)
    if kind == "dict":
        return {_from_json(k): _from_json(v) for k, v in value["items"]}
    raise ValueError(f"unknown tagged value {kind!r} in checkpoint state")


def encode_state(state: Any) -> torch.Tensor:
    """`state` (nested containers of plain values, bytes and tensors) as a uint8 JSON tensor."""
    data = json.dumps(_to_json(state), separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_state(tensor: torch.Tensor) -> Any:
    return _from_json(json.loads(bytes(tensor.numpy()).decode()))


# -- DCP metadata and values ------------------------------------------------------------------

_ALLOWED_BUILTINS = {"set", "frozenset", "slice", "object"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # metadata dataclasses and enums, never functions
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module == "torch.serialization" and name == "_get_layout":  # a name -> torch.layout lookup
            return torch.serialization._get_layout
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        elif module == "copyreg" and name == "_reconstructor":
            return copyreg._reconstructor  # type: ignore[attr-defined]  # real, but absent from typeshed
        elif module == "builtins" and name in _ALLOWED_BUILTINS:
            return getattr(builtins, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which is not part of a DCP checkpoint; "
            f"refusing to load it (checkpoints are only loaded from trusted sources)"
        )


def load_metadata(path: str) -> Any:
    """DCP's `.metadata` of the checkpoint folder `path`, read without running foreign code."""
    with open(f"{path}/.metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


class SafeReader(FileSystemReader):
    """DCP's file reader, but its metadata goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError("per-rank DCP metadata files are not supported")
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = load_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor values load with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data ({exc}); refusing to load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
