"""Data-parallel SAE training: the few collectives the trainer needs, and nothing when alone.

Under ``torchrun`` each process reads its own rows (``store.batches(..., rank=r,
world_size=w)``) and trains a replica. After every backward pass the gradients are
averaged (one all-reduce), and the per-latent "fired" flags are OR-ed (one all-reduce,
which also carries a non-finite-loss flag so that every process stops together). Since
the loss is a mean over rows with a fixed normaliser (see :mod:`misfeat.sae.model`), a
step on ``w`` shards of ``b / w`` rows equals a step on their ``b`` rows. Process 0 saves.
Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from misfeat.errors import MisfeatError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (``rank 0 of 1`` when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        """The initialised default process group, else a world of one."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes (one flat all-reduce)."""
        if self.size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.size
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce a copy of ``values`` (on the backend's device) and return it on theirs."""
        import torch.distributed as dist

        comm = values.clone()
        if dist.get_backend() == "nccl" and comm.device.type != "cuda":
            comm = comm.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(comm, op=getattr(dist.ReduceOp, op))
        return comm.to(values.device)

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a boolean tensor over processes."""
        if self.size == 1:
            return flags
        return self._reduce(flags.to(torch.int32), "MAX").bool()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over processes (a new tensor)."""
        return values if self.size == 1 else self._reduce(values, "SUM")

    def min(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """The smallest of each process's scalar (None where a process has none)."""
        if self.size == 1:
            return value
        t = torch.tensor([float("inf") if value is None else float(value)], dtype=torch.float64)
        t = self._reduce(t, "MIN")
        return None if torch.isinf(t).item() else t[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_from_env(device: str | None = None) -> tuple[World, str | None]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else stay alone.

    Returns the world and the device this process should use: ``cuda:<LOCAL_RANK>`` on
    CUDA machines (unless ``device`` names one), else ``device`` unchanged.
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    if not dist.is_available():
        raise MisfeatError("WORLD_SIZE > 1 but this torch has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda and (device is None or device == "cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    world = World.current()
    logger.info("data-parallel: process %d of %d on %s", world.rank, world.size, device or "cpu")
    return world, device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
