"""The one distributed helper: torchrun's environment, the process group, and the collectives.

Under ``torchrun --nproc_per_node N -m misfeat <command> ...`` every process has ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; :func:`env` reads them (and only it
does), :func:`rank_device` picks ``cuda:<LOCAL_RANK>`` for a process on a CUDA machine,
:func:`join` initialises the process group (gloo on CPU, nccl on CUDA) and returns this
process's :class:`World`. Without ``WORLD_SIZE`` > 1 everything here is a no-op and the
world is ``rank 0 of 1``. The cache (sharded writes, a merged manifest) and the SAE trainer
(averaged gradients, OR-ed dead-latent flags) use the same :class:`World`.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Env:
    """torchrun's description of this process (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env() -> Env:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment (defaults: one process)."""
    try:
        return Env(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        raise MisfeatError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None


def rank_device(device: str | None) -> str | None:
    """The device of this process: ``cuda:<LOCAL_RANK>`` under torchrun on a CUDA machine when
    ``device`` is None or ``"cuda"``, else ``device`` unchanged."""
    e = env()
    if e.world_size <= 1 or device not in (None, "cuda"):
        return device
    import torch

    return f"cuda:{e.local_rank}" if torch.cuda.is_available() else device


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (``rank 0 of 1`` when alone)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def world_size(self) -> int:
        return self.size

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        """The initialised default process group, else a world of one."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce a copy of ``values`` (on the backend's device) and return it on theirs."""
        import torch
        import torch.distributed as dist

        comm = values.clone()
        if dist.get_backend() == "nccl" and comm.device.type != "cuda":
            comm = comm.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(comm, op=getattr(dist.ReduceOp, op))
        return comm.to(values.device)

    def any_true(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (to fail together, not hang)."""
        if not self.active:
            return flag
        import torch

        return bool(self._reduce(torch.tensor([1 if flag else 0], dtype=torch.int64), "MAX").item())

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a boolean tensor over processes."""
        if not self.active:
            return flags
        import torch

        return self._reduce(flags.to(torch.int32), "MAX").bool()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over processes (a new tensor)."""
        return values if not self.active else self._reduce(values, "SUM")

    def min(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """The smallest of each process's scalar (None where a process has none)."""
        if not self.active:
            return value
        import torch

        t = torch.tensor([float("inf") if value is None else float(value)], dtype=torch.float64)
        t = self._reduce(t, "MIN")
        return None if torch.isinf(t).item() else t[0]

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes (one flat all-reduce)."""
        if not self.active:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.size
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)


def join(device: str | None = None) -> tuple[World, str | None]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else stay alone.

    Returns the world and the device this process should use (:func:`rank_device`); the
    backend is nccl when that device is CUDA, else gloo. The group is left at exit."""
    e = env()
    if e.world_size <= 1:
        return World(), device
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise MisfeatError("WORLD_SIZE > 1 but this torch has no torch.distributed; run without torchrun")
    device = rank_device(device)
    use_cuda = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(shutdown)
    world = World.current()
    logger.info("distributed: process %d of %d (%s) on %s", world.rank, world.size, world.backend, device or "cpu")
    return world, device


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
