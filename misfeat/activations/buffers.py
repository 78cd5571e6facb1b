"""Host memory for finished shards: a bounded pool of buffer sets, reused within a run and
across the runs of one process.

Where it sits: producer (fills a set) -> **buffers** -> store's writer (writes it, hands it back).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Unpinned shard buffers a finished run leaves to the next one in this process (other hooks,
# checkpoints, runs): a fresh buffer's first touch costs a page fault per 4 KiB (filling one
# took 2.7x the CPU time of refilling one), which in a short run is most of the copying. At
# most one CPU run's pool is kept; page-locked ones are cached by torch's own host allocator.
_SPARE: list[torch.Tensor] = []
_SPARE_LOCK = threading.Lock()
_SPARE_SETS = 3


def release_spare_buffers() -> int:
    """Free the host buffers kept for the next cache run of this process; returns the bytes freed."""
    with _SPARE_LOCK:
        freed = sum(t.numel() for t in _SPARE)
        _SPARE.clear()
    return freed


class HostBuffers:
    """A pool of host buffers for finished shards (page-locked with ``pin``, for copies from a GPU).

    ``acquire`` blocks while every set is in the writer's hands: that bounds host memory
    and slows the forward only when the disk cannot keep up. Sets are made on demand,
    reused most-recent first (allocating and touching fresh memory, or pinning it, is
    slow), and grow when a shard has more rows than they hold. A set is one block of
    memory cut into a ``[rows, d]`` tensor per hook; :meth:`close` leaves unpinned blocks to
    the next pool of this process (:func:`release_spare_buffers` frees them).
    """

    def __init__(self, widths: dict[str, int], dtype: torch.dtype, count: int, *, pin: bool = True):
        self.widths, self.dtype, self.pin = widths, dtype, pin
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._blocks: list[torch.Tensor] = []
        self._block_of: dict[int, torch.Tensor] = {}  # id(set) -> its block
        for _ in range(count):
            self._free.put({})

    def acquire(self, rows: int) -> dict[str, torch.Tensor]:
        """A set of buffers with at least ``rows`` rows each (blocks until one is free)."""
        buffers = self._free.get()
        if not buffers or next(iter(buffers.values())).shape[0] < rows:
            if buffers:  # too small: its memory is freed now, not kept to the end of the run
                small = self._block_of.pop(id(buffers))
                self._blocks = [b for b in self._blocks if b is not small]
            capacity = max(rows + rows // 8, 1)  # shards of equal prompt counts differ a little in rows
            buffers = self._new_set(capacity)
        return buffers

    def _new_set(self, capacity: int) -> dict[str, torch.Tensor]:
        import torch

        itemsize = self.dtype.itemsize
        need = capacity * sum(self.widths.values()) * itemsize
        block = None
        if not self.pin:
            with _SPARE_LOCK:
                fits = [i for i, t in enumerate(_SPARE) if t.numel() >= need]
                if fits:
                    block = _SPARE.pop(min(fits, key=lambda i: _SPARE[i].numel()))
        if block is None:
            block = torch.empty(need, dtype=torch.uint8, pin_memory=self.pin)
        self._blocks.append(block)
        out, at = {}, 0
        for h, d in self.widths.items():
            size = capacity * d * itemsize
            out[h] = block[at:at + size].view(self.dtype).view(capacity, d)
            at += size
        self._block_of[id(out)] = block
        return out

    def release(self, buffers: dict[str, torch.Tensor]) -> None:
        self._free.put(buffers)

    def close(self) -> None:
        """Leave the unpinned blocks to the next pool (only once no set is in use)."""
        if self.pin:
            return
        with _SPARE_LOCK:
            _SPARE.extend(self._blocks)
            _SPARE.sort(key=lambda t: -t.numel())
            del _SPARE[_SPARE_SETS:]
        self._blocks, self._block_of = [], {}
