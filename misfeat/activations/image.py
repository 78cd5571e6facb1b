r"""A shard file laid out in memory, and writing it to the disk without another copy.

Where it sits: producer (fills an image's rows) -> **image** -> store's writer (writes it) ->
shards.py (the file format, atomic files).

The pool (``buffers.py``) hands out :class:`ShardImage`\ s: page-aligned blocks laid out byte for
byte like the shard file (:func:`~misfeat.activations.shards.shard_layout`). The forward copies
each hook's rows into their places; the writer puts the header and the row metadata in and
:func:`write_image` writes the block as it is: with ``O_DIRECT`` when the run fsyncs, so the disk
reads the block itself (no copy into the page cache, which was most of a plain writer's CPU
here) while a thread of its own hashes it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from misfeat.activations.shards import (
    ALIGN,
    CHECKSUM,
    WRITE_CHUNK,
    ShardLayout,
    atomic_file,
    new_digest,
    shard_layout,
)

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class ShardImage:
    """A shard file laid out in page-aligned host memory exactly as on disk
    (:func:`~misfeat.activations.shards.shard_layout`): the forward copies each hook's rows
    into ``hooks[h][:rows]`` in place, the writer puts the header and the row metadata in
    and writes ``block[:layout.size]`` as it is (``O_DIRECT``: no other copy).

    ``hooks[h]`` is ``[spares[h] + 1, d]``: row ``spares[h]`` lies past the end of the file's
    bytes and takes the padding of batches that copy every position."""

    block: torch.Tensor  # uint8, page-aligned, at least the file's size rounded up to a page
    layout: ShardLayout
    rows: int
    hooks: dict[str, torch.Tensor]
    spares: dict[str, int]

    def put_head_and_meta(self, meta: dict[str, np.ndarray]) -> None:
        """Write the header and the ``[rows]`` metadata arrays into their places."""
        import numpy as np

        raw = self.block.numpy()
        raw[:len(self.layout.head)] = np.frombuffer(self.layout.head, dtype=np.uint8)
        for name, values in meta.items():
            a, b = self.layout.spans[name]
            raw[a:b] = np.ascontiguousarray(values).view(np.uint8)

    def file_bytes(self) -> memoryview:
        return memoryview(self.block.numpy())


def image_plan(rows: int, widths: dict[str, int], dtype: torch.dtype) -> tuple[ShardLayout, dict[str, int], int]:
    """``(layout, spares, bytes)``: a shard of ``rows`` rows, each hook's spare row (the first
    whole row past the file's page-rounded end) and the memory its image needs (a bound
    that grows with ``rows``: each spare row ends within two rows of that end)."""
    from misfeat.models import dtype_name

    name, itemsize = dtype_name(dtype), dtype.itemsize
    tensors = {"prompt_index": ("int64", (rows,)), "position": ("int32", (rows,)), "token_id": ("int32", (rows,))}
    tensors.update({h: (name, (rows, d)) for h, d in widths.items()})
    layout = shard_layout(tensors)
    size = layout.size + (-layout.size % ALIGN)
    spares = {h: -(-(size - layout.spans[h][0]) // (d * itemsize)) for h, d in widths.items()}
    return layout, spares, size + 2 * max(widths.values()) * itemsize


_DIRECT = {"ok": hasattr(os, "O_DIRECT")}  # False once a filesystem refused it: buffered from then on


def write_image(path: Path, image: memoryview, size: int, *, fsync: bool = True, checksum: str = CHECKSUM,
                done_reading: Callable[[], None] | None = None) -> str:
    """Write the first ``size`` bytes of ``image`` (a whole shard file laid out in memory,
    page-aligned, at least ``size`` rounded up to :data:`ALIGN` long) at ``path`` atomically;
    returns the checksum of those bytes, hashed as they are written.

    With ``fsync`` (the bytes must reach the disk anyway) and where the filesystem allows it,
    the file is written with ``O_DIRECT`` from ``image`` itself, the tail rounded up to
    :data:`ALIGN` and cut back by ``ftruncate``; otherwise (``fsync=False``, tmpfs, no
    ``O_DIRECT``) with plain writes. The bytes are the same either way.
    """
    if fsync and _DIRECT["ok"]:
        try:
            return _write_image(path, image, size, fsync=fsync, checksum=checksum, done_reading=done_reading,
                                direct=True)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            _DIRECT["ok"] = False  # this filesystem (or alignment) refuses O_DIRECT: the temp file is gone
    return _write_image(path, image, size, fsync=fsync, checksum=checksum, done_reading=done_reading,
                        direct=False)


def _write_image(path: Path, image: memoryview, size: int, *, fsync: bool, checksum: str,
                 done_reading: Callable[[], None] | None, direct: bool) -> str:
    digest = new_digest(checksum)
    end = size + (-size % ALIGN) if direct else size
    # O_DIRECT: the disk reads the memory while the CPU hashes it (on a thread of its own: both
    # release the GIL); buffered: each chunk is hashed, then copied while it is in the CPU cache
    hasher = threading.Thread(target=digest.update, args=(image[:size],), daemon=True) if direct else None
    with atomic_file(path, fsync=fsync, sync_dir=False, direct=direct) as f:
        if hasher is not None:
            hasher.start()
        try:
            for a in range(0, end, WRITE_CHUNK):
                b = min(end, a + WRITE_CHUNK)
                if hasher is None:
                    digest.update(image[a:b])
                while a < b:  # a raw file: a write may be short
                    a += f.write(image[a:b])
        finally:
            if hasher is not None:
                hasher.join()  # before the memory is handed back, even on an error
        if end != size:
            os.ftruncate(f.fileno(), size)
        if done_reading is not None:
            done_reading()
    return f"{checksum}:{digest.hexdigest()}"
