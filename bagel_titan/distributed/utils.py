"""Process-group lifecycle, device choice, seeding and deterministic mode.

Launch with `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). A plain
`python` launch runs as a single-rank group, so the training code has one path.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import MutableMapping

import torch
import torch.distributed as dist

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
DEFAULT_ALLOCATOR_SETTINGS = "expandable_segments:True"
"""The CUDA caching allocator's settings when the user sets none: packs change shape every step
(new image sizes, new document mixes), and fixed-size segments fragment under that until
allocations fail and the allocator frees its cache and retries (a device sync each time)."""


def select_device(device: str = "auto") -> torch.device:
    """The device of this rank: `cuda:<LOCAL_RANK>` or the CPU.

    `device` is `[training] device` (validated by the config): "auto" picks CUDA when
    available, "cuda" requires it (checked when the config is loaded).
    """
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    set_default_allocator_settings(os.environ)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def set_default_allocator_settings(environ: MutableMapping[str, str]) -> None:
    """Give the CUDA caching allocator `DEFAULT_ALLOCATOR_SETTINGS` unless `PYTORCH_ALLOC_CONF`
    or `PYTORCH_CUDA_ALLOC_CONF` is set (the user's choice wins). It takes effect only before
    the first CUDA allocation of the process, which is why `select_device` calls it."""
    if not any(environ.get(key) for key in _ALLOCATOR_ENV):
        environ["PYTORCH_ALLOC_CONF"] = DEFAULT_ALLOCATOR_SETTINGS


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from the torchrun environment (no-op if done).

    On CUDA the group is "cuda:nccl,cpu:gloo": the gloo half carries CPU collectives such as
    asynchronous checkpoint saves. Without torchrun variables the job is a single rank.
    """
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if all(key in os.environ for key in _TORCHRUN_ENV):
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def destroy_distributed(barrier_timeout_s: float = 30.0, wait_for_peers: bool = True) -> None:
    """Tear down the default process group (safe to call twice).

    After a successful run ranks first wait for each other (bounded): a rank that tears down its
    gloo connections while a peer still uses them can abort the peer at exit. A failed rank does
    not wait (`wait_for_peers=False`): its peers may sit in a collective it will never join.
    """
    if not dist.is_initialized():
        return
    if wait_for_peers and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=barrier_timeout_s))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: tear down regardless
    dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Python's `random` with the same value on every rank, so
    model initialisation agrees across ranks; per-rank randomness uses its own generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels for bitwise-reproducible runs (`[training] deterministic`)."""
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    # No cuDNN autotuning: packs bring new image sizes to the VAE's convolutions all run long, and
    # benchmark mode times every algorithm again for each new shape.
    torch.backends.cudnn.benchmark = False
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed element-wise over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """`values` maximised element-wise over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class Reducer:
    """Element-wise sums and maxima of float lists over all ranks, through tensors on `device`
    (the process group's device: CUDA for NCCL, the CPU for gloo)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)

    def max(self, values: list[float]) -> list[float]:
        return all_reduce_max(values, self.device)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """`values` summed key by key over all ranks; the ranks may hold different keys (a key a
    rank lacks counts as 0 there)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0.0) + value
    return total
