"""Data-parallel degrees (HSDP replicate x FSDP shard) from the world size, and the device mesh.

Only data parallelism exists: every rank sees different samples; FSDP shards parameters inside a
shard group, HSDP additionally replicates across groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def from_config(cls, parallelism, world_size: int) -> "ParallelDims":
        """Resolve `[parallelism]` (data_parallel_shard_degree = -1 takes the rest) and validate."""
        replicate = parallelism.data_parallel_replicate_degree
        shard = parallelism.data_parallel_shard_degree
        if world_size <= 0:
            raise ValueError(f"world size must be > 0, got {world_size}")
        if replicate <= 0:
            raise ValueError(
                f"parallelism.data_parallel_replicate_degree must be >= 1, got {replicate}"
            )
        if shard == -1:
            if world_size % replicate:
                raise ValueError(
                    f"world size {world_size} is not divisible by "
                    f"parallelism.data_parallel_replicate_degree {replicate}"
                )
            shard = world_size // replicate
        if shard <= 0:
            raise ValueError(f"parallelism.data_parallel_shard_degree must be >= 1 or -1, got {shard}")
        if replicate * shard != world_size:
            raise ValueError(
                f"parallelism.data_parallel_replicate_degree ({replicate}) x "
                f"data_parallel_shard_degree ({shard}) must equal the world size ({world_size})"
            )
        return cls(dp_replicate=replicate, dp_shard=shard, world_size=world_size)

    @property
    def dp_degree(self) -> int:
        """Number of data-parallel ranks (each sees different data)."""
        return self.dp_replicate * self.dp_shard

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """1-D ("dp_shard",) mesh for FSDP, 2-D ("dp_replicate", "dp_shard") for HSDP.
        fully_shard takes the whole mesh either way; data-parallel rank = global rank."""
        if self.hsdp:
            return init_device_mesh(
                device_type,
                (self.dp_replicate, self.dp_shard),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )
        return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))
