"""Data-parallel SAE training, on :mod:`misfeat.distributed` (the one distributed helper).

Under ``torchrun`` each process reads its own rows (``store.batches(..., rank=r,
world_size=w)``) and trains a replica. After every backward pass the gradients are
averaged (one all-reduce), and the per-latent "fired" flags are OR-ed (one all-reduce,
which also carries a non-finite-loss flag so that every process stops together). Since
the loss is a mean over rows with a fixed normaliser (see :mod:`misfeat.sae.model`), a
step on ``w`` shards of ``b / w`` rows equals a step on their ``b`` rows. Process 0 saves.
Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

from misfeat.distributed import World, join, shutdown

__all__ = ["World", "init_from_env", "shutdown"]


def init_from_env(device: str | None = None) -> tuple[World, str | None]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else stay alone;
    returns the world and this process's device (see :func:`misfeat.distributed.join`)."""
    return join(device)
