"""Host memory for finished shards: a bounded pool of page-aligned blocks, each holding one
shard file's image, reused within a run and across the runs of one process.

Where it sits: producer (fills a set) -> **buffers** -> store's writer (writes it, hands it back).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

from misfeat.activations.image import ShardImage, image_plan
from misfeat.activations.shards import ALIGN

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
    """A pool of host memory for finished shards (page-locked with ``pin``, for copies from a GPU).

    ``acquire`` blocks while every block is in the writer's hands: that bounds host memory
    and slows the forward only when the disk cannot keep up. Blocks are made on demand,
    reused most-recent first (allocating and touching fresh memory, or pinning it, is
    slow), and grow when a shard needs more. Each is page-aligned (``O_DIRECT`` writes
    from it); :meth:`close` leaves unpinned blocks to the next pool of this process
    (:func:`release_spare_buffers` frees them).
    """

    def __init__(self, widths: dict[str, int], dtype: torch.dtype, count: int, *, pin: bool = True):
        self.widths, self.dtype, self.pin = widths, dtype, pin
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._blocks: list[torch.Tensor] = []
        for _ in range(count):
            self._free.put(None)

    def acquire(self, rows: int) -> ShardImage:
        """The image of a shard of ``rows`` rows (blocks until a block is free)."""
        layout, spares, need = image_plan(rows, self.widths, self.dtype)
        block = self._free.get()
        if block is None or block.numel() < need:
            if block is not None:  # too small: its memory is freed now, not kept to the end of the run
                self._blocks = [b for b in self._blocks if b is not block]
            # shards of equal prompt counts differ a little in rows: room for 1/8 more
            block = self._new_block(image_plan(rows + rows // 8 + 1, self.widths, self.dtype)[2])
        itemsize = self.dtype.itemsize
        hooks = {}
        for h, d in self.widths.items():
            a = layout.spans[h][0]
            hooks[h] = block[a:a + (spares[h] + 1) * d * itemsize].view(self.dtype).view(spares[h] + 1, d)
        return ShardImage(block, layout, rows, hooks, spares)

    def _new_block(self, need: int) -> torch.Tensor:
        import torch

        if not self.pin:
            with _SPARE_LOCK:
                fits = [i for i, t in enumerate(_SPARE) if t.numel() >= need]
                if fits:
                    block = _SPARE.pop(min(fits, key=lambda i: _SPARE[i].numel()))
                    self._blocks.append(block)
                    return block
        raw = torch.empty(need + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        skip = -raw.data_ptr() % ALIGN
        block = raw[skip:skip + need]  # keeps raw's memory alive
        self._blocks.append(block)
        return block

    def release(self, image: ShardImage) -> None:
        self._free.put(image.block)

    def close(self) -> None:
        """Leave the unpinned blocks to the next pool (only once none is in use)."""
        if self.pin:
            return
        with _SPARE_LOCK:
            _SPARE.extend(self._blocks)
            _SPARE.sort(key=lambda t: -t.numel())
            del _SPARE[_SPARE_SETS:]
        self._blocks = []
