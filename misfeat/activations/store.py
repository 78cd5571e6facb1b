"""The writing side of an activation store: its config, its manifest, resume, the shard writer.

Where it sits: producer (forward) -> **store** (this module + shards.py) -> reader.

The manifest (``manifest.json``) says what a store holds and how it was made; it holds
no timestamp or host name, so an interrupted-and-resumed run writes the same bytes as
an uninterrupted one. A resume is refused when anything that changes the rows differs
(model fingerprint, prompt set, hooks, dtype, positions, autocast, tokenisation); the
batch size and shard size of the first run are kept, because they fix the batches and
the shard boundaries.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.activations.image import write_image
from misfeat.activations.shards import (
    MANIFEST_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    DiskFullError,
    ShardRecord,
    StoreError,
    journal_name,
    read_json_file,
    shard_name,
    verify_shard,
    write_json_atomic,
)
from misfeat.data import POSITIONS
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import numpy as np

    from misfeat.activations.image import ShardImage
    from misfeat.activations.plan import ShardSpec

logger = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 32.0
STORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CacheConfig:
    """How to cache. Every field is also a ``misfeat cache`` flag.

    Attributes:
        positions: which tokens become rows: ``response``, ``prompt``, ``last`` (the last
            prompt token) or ``all`` (never padding).
        dtype: the dtype rows are stored in: ``float32`` (default) or ``bfloat16``.
        batch_tokens: padded tokens per forward batch (default: 2048 on CPU, 65536 on CUDA).
        shard_mb: target shard size in MiB; a shard holds whole prompts.
        autocast: CUDA only: run the forward under bfloat16 autocast.
        chat_format: how records are rendered (``auto``: the set's or the model's own).
        fsync: fsync each shard and manifest before renaming (survives power loss too).
        queue_shards: finished shards that may wait for the writer before the forward waits.
        overwrite: delete an existing store in the output directory instead of resuming.
    """

    positions: str = "all"
    dtype: str = "float32"
    batch_tokens: int | None = None
    shard_mb: float = DEFAULT_SHARD_MB
    autocast: bool = False
    chat_format: str = "auto"
    fsync: bool = True
    queue_shards: int = 2
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise MisfeatError(f"positions={self.positions!r}: use one of {', '.join(POSITIONS)}")
        if self.dtype not in STORE_DTYPES:
            raise MisfeatError(f"store dtype {self.dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise MisfeatError(f"batch_tokens={self.batch_tokens}: must be a positive number of tokens")
        if not self.shard_mb > 0:
            raise MisfeatError(f"shard_mb={self.shard_mb}: must be positive")
        if self.queue_shards < 1:
            raise MisfeatError("queue_shards must be at least 1")


# --- the manifest --------------------------------------------------------------------

# what must be equal to resume: (what to call it, path into the manifest)
_IDENTITY = (
    ("model (fingerprint)", ("model", "fingerprint")),
    ("prompt set (hash)", ("prompts", "hash")),
    ("hooks", ("hooks",)),
    ("dtype", ("dtype",)),
    ("positions", ("positions",)),
    ("autocast", ("autocast",)),
    ("tokenised rows (tokenizer or chat format)", ("rows_key",)),
)


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences that forbid resuming ``old`` with ``new``."""
    out = []
    for label, path in _IDENTITY:
        a, b = _get(old, path), _get(new, path)
        if path == ("rows_key",) and any(_get(old, p) != _get(new, p) for p in (("prompts", "hash"), ("positions",))):
            continue  # rows_key hashes those too: name the tokenisation only when it is the cause
        if a != b:
            if path == ("hooks",):
                a = [f"{h['name']}[{h['d']}]" for h in a or []]
                b = [f"{h['name']}[{h['d']}]" for h in b or []]
            out.append(f"{label}: store has {a!r}, this run {b!r}")
    return out


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    doc = read_json_file(path)
    if doc.get("format") != STORE_FORMAT or doc.get("version", 0) > STORE_VERSION:
        raise StoreError(f"{path} is not a misfeat activation store this version can read "
                         f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
    return doc


def with_shards(manifest: dict[str, Any], records: dict[int, ShardRecord], complete: bool) -> dict[str, Any]:
    """The manifest listing ``records``; row and token totals once ``complete``."""
    doc = dict(manifest)
    doc["complete"] = complete
    if complete:
        doc["n_rows"] = sum(r.rows for r in records.values())
        doc["n_tokens"] = sum(r.tokens for r in records.values())
    doc["shards"] = [records[i].to_json() for i in sorted(records)]
    return doc


def read_journals(directory: Path) -> list[ShardRecord]:
    out = []
    for path in sorted(directory.glob("progress-rank*.json")):
        out += [ShardRecord.from_json(r) for r in read_json_file(path).get("shards", [])]
    return out


def resume_records(directory: Path, manifest: dict[str, Any], specs: list[ShardSpec], *,
                   overwrite: bool) -> dict[int, ShardRecord]:
    """The shards of an earlier run that this run can keep (verified); ``{}`` for a fresh start.

    Raises :class:`StoreError` naming each difference when the directory holds a store
    made differently. A recorded shard that is missing or fails verification is dropped
    (and recomputed) with a warning.
    """
    old = None if overwrite else read_manifest(directory)
    if old is None:
        return {}
    diffs = manifest_differences(old, manifest)
    if diffs:
        raise StoreError(
            f"{directory} already holds an activation store made differently, so this run cannot resume it: "
            + "; ".join(diffs) + ". Re-run with the original settings to resume, or pass --overwrite "
            "(overwrite=True) to replace it, or choose another output directory"
        )
    by_index = {s.index: s for s in specs}
    kept: dict[int, ShardRecord] = {}
    for record in [*(ShardRecord.from_json(r) for r in old.get("shards", [])), *read_journals(directory)]:
        spec = by_index.get(record.index)
        if spec is None or (spec.first_prompt, spec.end_prompt) != (record.first_prompt, record.end_prompt):
            logger.warning("ignoring %s: it does not match this run's shard plan", record.file)
            continue
        if record.index in kept:
            continue
        try:
            verify_shard(directory, record)
        except StoreError as err:
            logger.warning("recomputing %s: %s", record.file, err)
            continue
        kept[record.index] = record
    if kept:
        logger.info("resuming %s: %d of %d shards already complete", directory, len(kept), len(specs))
    return kept


class ProgressLog:
    """Records finished shards: in the manifest (one process) or a per-rank journal (torchrun).

    Called by the writer threads, one shard at a time (a lock), so writes never interleave;
    shards may finish out of order (the manifest lists whichever are complete). In one
    process, the write that records the last shard marks the manifest complete.

    A write (with its two fsyncs, file and directory) costs about as much as writing a
    32 MiB shard on this machine's disk, so while more shards wait for the writer
    (``busy``) the record is rewritten at most every ``interval`` seconds; otherwise, for
    the last shard and at :meth:`flush`, at once. A run killed in between recomputes at
    most that much work, and the record never lists a shard that is not whole.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], records: dict[int, ShardRecord], *,
                 rank: int, world_size: int, fsync: bool, interval: float = 1.0):
        self.directory, self.manifest, self.fsync = directory, manifest, fsync
        self.records = dict(records)
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.mine: dict[int, ShardRecord] = {}
        self.wrote_complete = False
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._pending = False

    def __call__(self, record: ShardRecord, *, busy: bool = False) -> None:
        with self._lock:
            self.records[record.index] = record
            self.mine[record.index] = record
            self._pending = True
            complete = self.world_size == 1 and len(self.records) == self.manifest["n_shards"]
            if complete or not busy or time.monotonic() - self._last >= self.interval:
                self._write()

    def flush(self) -> None:
        """Record every shard finished so far (called once the writer has stopped)."""
        with self._lock:
            if self._pending:
                self._write()

    def _write(self) -> None:
        if self.world_size == 1:
            complete = len(self.records) == self.manifest["n_shards"]
            write_json_atomic(self.directory / MANIFEST_FILE, with_shards(self.manifest, self.records, complete),
                              fsync=self.fsync)
            self.wrote_complete = complete
        else:
            doc = {"rank": self.rank, "shards": [self.mine[i].to_json() for i in sorted(self.mine)]}
            write_json_atomic(self.directory / journal_name(self.rank), doc, fsync=self.fsync)
        self._pending = False
        self._last = time.monotonic()


# --- the background writer -----------------------------------------------------------


@dataclass
class _Job:
    spec: ShardSpec
    rows: int
    tokens: int
    image: ShardImage
    meta: dict[str, np.ndarray]  # prompt_index, position, token_id per row
    ready: Any = None  # a torch.cuda.Event to wait for before reading the tensors
    release: Callable[[], None] | None = None

    def done_reading(self) -> None:
        """Hand the tensors' memory back (once): called when their bytes are written, before the
        fsync, so the forward refills a buffer while the disk flushes it."""
        release, self.release = self.release, None
        if release is not None:
            release()


class ShardWriter:
    """Writes finished shards on background threads with a bounded queue.

    The forward thread hands over a shard and goes on computing the next one; hashing,
    writing and fsync (which release the GIL) overlap with it. Several threads keep a fast
    disk busy when one shard's fsync would otherwise idle it (a GPU makes shards faster
    than one thread writes them). The first error (e.g. :class:`DiskFullError`) is
    re-raised in the forward thread at the next ``submit`` or at ``close``; jobs queued
    behind a failure are dropped, never half-written.
    """

    def __init__(self, directory: Path, on_written: Callable[..., None], *, depth: int = 2,
                 fsync: bool = True, threads: int = 1, cuda_device: Any = None):
        """``cuda_device``: the GPU whose copies the threads wait for (made current in them,
        so a rank's writers never open a CUDA context on GPU 0)."""
        self.directory, self.on_written, self.fsync = directory, on_written, fsync
        self.cuda_device = cuda_device
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._threads = [threading.Thread(target=self._loop, name=f"misfeat-shard-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, spec: ShardSpec, image: ShardImage, meta: dict[str, np.ndarray], *, rows: int, tokens: int,
               ready: Any = None, release: Callable[[], None] | None = None) -> None:
        """Write ``image`` (its hooks' rows filled) with the row metadata ``meta`` as shard ``spec``."""
        self.check()
        self._queue.put(_Job(spec, rows, tokens, image, meta, ready, release))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop the threads, and raise the first error if any."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self.check()

    def _loop(self) -> None:
        if self.cuda_device is not None:
            try:
                import torch

                torch.cuda.set_device(self.cuda_device)
            except BaseException as err:  # noqa: BLE001 - reported at the next submit; jobs are drained
                self.error = err
        while (job := self._queue.get()) is not None:
            try:
                if self.error is None:
                    self._write(job)
            except BaseException as err:  # handed to the forward thread
                if self.error is None:
                    self.error = err
            finally:
                job.done_reading()

    def _write(self, job: _Job) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        spec = job.spec
        name = shard_name(spec.index)
        job.image.put_head_and_meta(job.meta)
        size = job.image.layout.size
        checksum = write_image(self.directory / name, job.image.file_bytes(), size, fsync=self.fsync,
                               done_reading=job.done_reading)
        record = ShardRecord(spec.index, name, spec.first_prompt, spec.end_prompt, job.rows, job.tokens, size,
                             checksum)
        self.on_written(record, busy=not self._queue.empty())  # busy: more shards wait to be written


def disk_full_message(err: DiskFullError, directory: Path, done: int, total: int) -> str:
    return (f"{err}. {done} of {total} shards are complete and safe in {directory} (listed in "
            f"{MANIFEST_FILE}; nothing already written was lost). Free some space and re-run the same "
            "command: it resumes from there")
