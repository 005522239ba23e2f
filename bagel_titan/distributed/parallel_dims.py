"""Data-parallel degrees from `[parallelism]`, validated against the world size, and the mesh.

bagel-titan only has data parallelism: plain FSDP (`dp_shard`) or HSDP (`dp_replicate` groups,
each sharding over `dp_shard` ranks). Every rank is a data-parallel rank, so the dp rank and dp
world size are the rank and world size, ordered replicate-major like the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bagel_titan.errors import UserError


class ParallelismConfigError(UserError, ValueError):
    """`[parallelism]` degrees that do not fit the world size."""


@dataclass
class ParallelDims:
    """Resolved data-parallel degrees: `dp_replicate * dp_shard == world_size`.

    `dp_shard = -1` means "the world size divided by `dp_replicate`". Build the mesh once with
    `build_mesh`; `dp_rank`/`dp_world_size` come from it.
    """

    dp_replicate: int
    dp_shard: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ParallelismConfigError(f"world size must be >= 1, got {self.world_size}")
        if self.dp_replicate < 1:
            raise ParallelismConfigError(f"[parallelism] dp_replicate must be >= 1, got {self.dp_replicate}")
        if self.dp_shard == -1:
            if self.world_size % self.dp_replicate:
                raise ParallelismConfigError(
                    f"[parallelism] dp_replicate = {self.dp_replicate} does not divide the world "
                    f"size {self.world_size}; set dp_replicate to a divisor of {self.world_size}"
                )
            self.dp_shard = self.world_size // self.dp_replicate
        elif self.dp_shard < 1:
            raise ParallelismConfigError(
                f"[parallelism] dp_shard must be >= 1 or -1 (auto), got {self.dp_shard}"
            )
        if self.dp_replicate * self.dp_shard != self.world_size:
            raise ParallelismConfigError(
                f"[parallelism] dp_replicate ({self.dp_replicate}) * dp_shard ({self.dp_shard}) "
                f"= {self.dp_replicate * self.dp_shard} but the job has {self.world_size} ranks; "
                f"make the product equal the world size or set dp_shard = -1"
            )

    @property
    def hsdp(self) -> bool:
        """Replicated groups of sharded ranks (a 2-D mesh)."""
        return self.dp_replicate > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 1-D ("dp_shard",) mesh, or the 2-D ("dp_replicate", "dp_shard") mesh for HSDP."""
        if self.hsdp:
            self._mesh = init_device_mesh(
                device_type,
                (self.dp_replicate, self.dp_shard),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )
        else:
            self._mesh = init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))
        return self._mesh

    @property
    def dp_world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (replicate-major), which picks its data shard."""
        if self._mesh is None:
            return dist.get_rank() if dist.is_initialized() else 0
        if self.hsdp:
            return self._mesh.get_local_rank("dp_replicate") * self.dp_shard + self._mesh.get_local_rank(
                "dp_shard"
            )
        return self._mesh.get_local_rank("dp_shard")
