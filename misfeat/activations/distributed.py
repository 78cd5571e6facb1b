"""Caching past one machine, on :mod:`misfeat.distributed` (the one distributed helper).

Under ``torchrun --nproc_per_node N -m misfeat cache ...`` every rank plans the same
shards, takes shard ``i`` when ``i % world_size == rank``, writes its own shards and a
per-rank journal; rank 0 merges the journals into the one manifest after a barrier.
Rows stay in prompt order because the shard plan, not the rank, decides where a row
goes. Without ``WORLD_SIZE`` in the environment everything here is a no-op.
"""

from __future__ import annotations

from misfeat.distributed import World, env, join

Dist = World
"""This process's place in the job (``world_size == 1``: not distributed)."""


def local_rank() -> int:
    return env().local_rank


def env_world_size() -> int:
    return env().world_size


def current(device_type: str = "cpu") -> World:
    """The running job; initialises the process group (gloo on CPU, nccl on CUDA) under torchrun."""
    return join("cuda" if device_type == "cuda" else "cpu")[0]
