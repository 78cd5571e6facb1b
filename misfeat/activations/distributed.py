"""Caching past one machine: the few collective steps a ``torchrun`` cache needs.

Under ``torchrun --nproc_per_node N -m misfeat cache ...`` every rank plans the same
shards, takes shard ``i`` when ``i % world_size == rank``, writes its own shards and a
per-rank journal; rank 0 merges the journals into the one manifest after a barrier.
Rows stay in prompt order because the shard plan, not the rank, decides where a row
goes. Without ``WORLD_SIZE`` in the environment everything here is a no-op.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (used to fail together, not hang)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current(device_type: str = "cpu") -> Dist:
    """The running job; initialises the process group (gloo on CPU, nccl on CUDA) under torchrun."""
    if env_world_size() <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return Dist(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
