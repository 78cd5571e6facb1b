"""Shuffled training batches from a store, through a bounded shuffle buffer.

Where it sits: reader -> **batches** -> SAE trainer (``Iterator[Tensor]`` of ``[batch, d]``).

A full random permutation of a large store does not fit in memory, and row-by-row random
reads are slow, so (as in SAELens and sparsify) rows are read in chunks, in a seeded
random chunk order, into a buffer that is shuffled as it is drained: whenever it is
full, half of it (whole batches) leaves in random order and the other half stays to mix
with the next chunks. Each epoch draws every row of this rank's chunks exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from misfeat.activations.shards import StoreError
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from misfeat.activations.reader import ActivationStore

_BUFFER_BYTES = 256 << 20  # default shuffle buffer: 256 MiB of rows
_MAX_CHUNK = 8192


@dataclass(frozen=True)
class BatchPlan:
    """Everything :func:`iterate` needs, validated up front (so errors come at the call, not the first batch)."""

    hook: str
    batch_size: int
    shuffle: bool
    buffer_rows: int
    chunk_rows: int
    seed: int
    epochs: int
    rank: int
    world_size: int
    dtype: torch.dtype
    drop_last: bool
    width: int
    row_bytes: int
    starts: tuple[int, ...]  # byte offset of the hook's tensor in each shard file
    chunks: np.ndarray  # int64 [n_chunks, 3]: shard, first row, end row

    @classmethod
    def make(cls, store: ActivationStore, hook: str, batch_size: int, *, shuffle: bool, buffer_rows: int | None,
             seed: int, epochs: int, rank: int, world_size: int, dtype: torch.dtype | None,
             drop_last: bool) -> BatchPlan:
        import numpy as np
        import torch

        if batch_size < 1:
            raise MisfeatError(f"batch_size={batch_size}: must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise MisfeatError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if epochs < 1:
            raise MisfeatError(f"epochs={epochs}: must be at least 1")
        width = store.d_of(hook)
        itemsize = torch.empty(0, dtype=store.dtype).element_size()
        row_bytes = width * itemsize
        if buffer_rows is None:
            buffer_rows = max(2 * batch_size, min(1 << 18, _BUFFER_BYTES // row_bytes))
        if buffer_rows < 2 * batch_size:
            raise MisfeatError(f"buffer_rows={buffer_rows} must hold at least two batches "
                               f"({2 * batch_size} rows) to shuffle across them")
        chunk_rows = max(1, min(_MAX_CHUNK, buffer_rows // 8))
        if world_size > 1:  # enough chunks that every rank gets a share of a small store
            total = sum(r.rows for r in store.shards)
            chunk_rows = max(1, min(chunk_rows, -(-total // (8 * world_size))))
        chunks = [(s, a, min(a + chunk_rows, r.rows)) for s, r in enumerate(store.shards)
                  for a in range(0, r.rows, chunk_rows)]
        starts = tuple(store._entries[s][hook].start for s in range(len(store.shards)))
        return cls(hook, batch_size, shuffle, buffer_rows, chunk_rows, seed, epochs, rank, world_size,
                   dtype or torch.float32, drop_last, width, row_bytes, starts,
                   np.asarray(chunks, dtype=np.int64).reshape(-1, 3))


def iterate(store: ActivationStore, plan: BatchPlan) -> Iterator[torch.Tensor]:
    import numpy as np

    from misfeat.activations.reader import _NP

    buf = np.empty((plan.buffer_rows + plan.chunk_rows, plan.width), dtype=_NP[store.manifest["dtype"]])
    files = _Files(store)
    try:
        for epoch in range(plan.epochs):
            rng = np.random.default_rng([plan.seed, epoch])
            order = rng.permutation(len(plan.chunks)) if plan.shuffle else np.arange(len(plan.chunks))
            fill = 0
            for c in order[plan.rank::plan.world_size]:
                shard, a, b = (int(x) for x in plan.chunks[c])
                files.read(shard, plan.starts[shard] + a * plan.row_bytes, buf[fill:fill + b - a])
                fill += b - a
                if fill >= plan.buffer_rows:
                    keep = plan.buffer_rows // 2 if plan.shuffle else 0
                    n_out = (fill - keep) // plan.batch_size * plan.batch_size
                    fill = yield from _drain(buf, fill, n_out, rng, plan, store.manifest["dtype"])
            n_out = fill // plan.batch_size * plan.batch_size if plan.drop_last else fill
            yield from _drain(buf, fill, n_out, rng, plan, store.manifest["dtype"])
    finally:
        files.close()


def _drain(buf: np.ndarray, fill: int, n_out: int, rng, plan: BatchPlan, store_dtype: str):
    """Yield ``n_out`` rows of ``buf[:fill]`` as batches (random ones when shuffling); move
    the rest to the front of the buffer and return how many there are."""
    import numpy as np

    from misfeat.activations.reader import _tensor

    perm = rng.permutation(fill) if plan.shuffle else np.arange(fill)
    for j in range(0, n_out, plan.batch_size):
        yield _tensor(buf[perm[j:min(j + plan.batch_size, n_out)]], store_dtype).to(plan.dtype)
    rest = perm[n_out:]
    buf[:len(rest)] = buf[rest]  # fancy indexing reads a copy first, so overlap is safe
    return len(rest)


class _Files:
    """Raw file descriptors of the shards, opened on demand (at most 32 at a time)."""

    def __init__(self, store: ActivationStore, limit: int = 32):
        self.store, self.limit = store, limit
        self.fds: dict[int, int] = {}

    def read(self, shard: int, offset: int, out: np.ndarray) -> None:
        if shard not in self.fds:
            if len(self.fds) >= self.limit:
                os.close(self.fds.pop(next(iter(self.fds))))
            self.fds[shard] = os.open(self.store.path / self.store.shards[shard].file, os.O_RDONLY)
        fd, view, got = self.fds[shard], memoryview(out).cast("B"), 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise StoreError(f"shard {self.store.shards[shard].file} of {self.store.path} ended early "
                                 "(truncated since it was opened); delete it and re-run `misfeat cache` "
                                 "with the same arguments")
            got += n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
