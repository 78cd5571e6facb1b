"""The files of an activation store: names, the shard format, atomic writes, checksums.

This is the one module that knows how a store directory is laid out::

    DIR/manifest.json                 what the store holds (see store.py)
    DIR/shard-00000.safetensors       rows of prompts [first_prompt, end_prompt)
    DIR/shard-00001.safetensors       ...
    DIR/progress-rank001.json         during a torchrun run only: shards a rank finished

A shard is a plain safetensors file (readable by ``safetensors.torch.load_file``) with
one ``[rows, d]`` tensor per hook plus three ``[rows]`` row-metadata tensors
(``prompt_index`` int64, ``position`` int32, ``token_id`` int32). It is written here
rather than by ``safetensors.torch.save`` so the bytes go straight from memory to the
file (a cache run lays each shard out in page-aligned memory exactly as on disk and writes it
with ``O_DIRECT``: :func:`write_image`) and the checksum is computed on those same bytes as
they are written, never by reading the file back.

Every file is written to ``NAME.tmp`` and renamed: a reader or a resumed run sees a
complete file or none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = "manifest.json"
STORE_FORMAT = "misfeat-activations"
STORE_VERSION = 2  # 1: sha256 checksums (misfeat <= 0.1 reads only those); 2: blake3 (or sha256)
# BLAKE3: cryptographic like sha256 (256-bit, collision resistant) and 5x faster on one core
# here (4.3 GB/s vs 0.81 GB/s with SHA-NI): at 1.5 kB a row (d 768, bfloat16) sha256 alone
# capped a writer thread at ~0.5M rows/s, below the disk. Version 1 stores (sha256) still verify.
CHECKSUM = "blake3"
CHECKSUMS = ("blake3", "sha256")
WRITE_CHUNK = 1 << 20  # hashed then written while it is still in the CPU cache
META_TENSORS = ("prompt_index", "position", "token_id")
TMP_SUFFIX = ".tmp"
_HEADER_LIMIT = 100 << 20  # a header larger than this is corruption, not a store

# safetensors dtype codes <-> (torch dtype name, item size)
_ST_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4)}
_TORCH_TO_ST = {name: code for code, (name, _) in _ST_DTYPES.items()}


class StoreError(MisfeatError):
    """An activation store is missing, incomplete, corrupted or does not match the request."""


class DiskFullError(StoreError):
    """The disk filled up while writing; what was complete before is kept."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def journal_name(rank: int) -> str:
    return f"progress-rank{rank:03d}.json"


def is_store_file(name: str) -> bool:
    """Files a store owns (removed by ``overwrite`` and by a fresh start)."""
    base = name.removesuffix(TMP_SUFFIX)
    return (base == MANIFEST_FILE or (base.startswith("shard-") and base.endswith(".safetensors"))
            or (base.startswith("progress-rank") and base.endswith(".json")))


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard as the manifest lists it (prompts ``[first_prompt, end_prompt)``;
    ``tokens``: the real tokens forwarded for it)."""

    index: int
    file: str
    first_prompt: int
    end_prompt: int
    rows: int
    tokens: int
    bytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardRecord:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a shard file (absolute byte offsets)."""

    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int
    end: int


# --- writing -------------------------------------------------------------------------


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    import torch

    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def new_digest(algo: str = CHECKSUM):
    """A hash object of ``algo`` (``blake3`` or ``sha256``) with ``update`` and ``hexdigest``."""
    if algo == "blake3":
        import blake3

        return blake3.blake3()
    if algo not in CHECKSUMS:
        raise StoreError(f"unknown checksum algorithm {algo!r} (this misfeat knows {', '.join(CHECKSUMS)})")
    return hashlib.new(algo)


# The data section of a shard starts at a multiple of ALIGN (the header is padded with spaces,
# which safetensors allows), so a shard laid out in page-aligned memory goes to the disk with
# O_DIRECT: the disk reads it straight from that memory, with no copy into the page cache
# (that copy was most of a plain writer's CPU here, ~0.35 ns a byte).
ALIGN = 4096


@dataclass(frozen=True)
class ShardLayout:
    """Where everything lies in a shard file: ``head`` (the 8-byte length and the JSON
    header, padded to the data's start), each tensor's absolute ``[start, end)``, the size."""

    head: bytes
    spans: dict[str, tuple[int, int]]
    size: int


def shard_layout(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> ShardLayout:
    """The layout of a shard holding ``tensors`` (``{name: (torch dtype name, shape)}``):
    the row metadata first, then the others in the given order (with 16 bytes a row of
    metadata ahead of them, every tensor starts at a multiple of its item size and can be
    mapped in place)."""
    names = [n for n in META_TENSORS if n in tensors] + [n for n in tensors if n not in META_TENSORS]
    header: dict[str, Any] = {"__metadata__": {"format": STORE_FORMAT}}
    offset, local = 0, {}
    for name in names:
        dtype, shape = tensors[name]
        count = 1
        for dim in shape:
            count *= dim
        size = count * _ST_DTYPES[_TORCH_TO_ST[dtype]][1]
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        local[name] = (offset, offset + size)
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)
    base = 8 + len(head)
    return ShardLayout(len(head).to_bytes(8, "little") + head, {n: (base + a, base + b) for n, (a, b) in local.items()},
                       base + offset)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], *, fsync: bool = True,
                checksum: str = CHECKSUM, done_reading: Callable[[], None] | None = None) -> tuple[int, str]:
    """Write CPU ``tensors`` as a safetensors file at ``path`` atomically (:func:`shard_layout`).

    Returns ``(size in bytes, checksum)``; the checksum (``algo:hex``) covers every byte of the file.
    ``done_reading`` is called once every byte is in the kernel's hands, before the fsync: the
    tensors' memory can be reused from then on. Raises :class:`DiskFullError` (temp file
    removed) when the disk is full. (A cache run writes a :func:`write_image` instead: the
    same bytes.)
    """
    from misfeat.models import dtype_name

    layout = shard_layout({n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()})
    chunks = [layout.head, *(_bytes_of(tensors[n]) for n in sorted(layout.spans, key=lambda n: layout.spans[n]))]
    digest = new_digest(checksum)
    # the directory is synced by the manifest (or journal) write that records this shard
    with atomic_file(path, fsync=fsync, sync_dir=False) as f:
        for chunk in chunks:
            view = memoryview(chunk)
            for a in range(0, len(view), WRITE_CHUNK):
                piece = view[a:a + WRITE_CHUNK]
                digest.update(piece)
                f.write(piece)
        f.flush()
        if done_reading is not None:
            done_reading()
    return layout.size, f"{checksum}:{digest.hexdigest()}"


class atomic_file:  # noqa: N801 - used like open()
    """``with atomic_file(path) as f``: write ``path.tmp``, fsync, rename onto ``path``.

    On any error the temp file is removed and ``path`` is left as it was; ``ENOSPC``
    becomes :class:`DiskFullError`.
    """

    def __init__(self, path: Path, *, fsync: bool = True, sync_dir: bool = True, direct: bool = False):
        """``direct``: open with ``O_DIRECT``, unbuffered (writes of aligned memory, offsets and sizes only)."""
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.fsync, self.sync_dir, self.direct = fsync, sync_dir, direct

    def __enter__(self):
        if not self.direct:
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in __exit__
            return self.file
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            self.tmp.unlink(missing_ok=True)
            raise _as_disk_full(err, self.path) from err
        self.file = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed in __exit__
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                if self.fsync:
                    os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                if self.fsync and self.sync_dir:
                    _fsync_dir(self.path.parent)
        except BaseException as err:
            self._discard()
            raise _as_disk_full(err, self.path) from err
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise _as_disk_full(exc, self.path) from exc

    def _discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def _as_disk_full(err: BaseException, path: Path) -> BaseException:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on device writing {path}")
    return err


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, *, fsync: bool = True) -> None:
    """Deterministic JSON (fixed key order as built, no timestamps) written atomically."""
    data = (json.dumps(obj, indent=1) + "\n").encode()
    with atomic_file(path, fsync=fsync) as f:
        f.write(data)


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is unreadable or corrupted ({err}); delete the store directory and "
                         "re-run `misfeat cache`") from None


def remove_store_files(directory: Path, names: Iterable[str] | None = None) -> list[str]:
    """Delete the store files in ``directory`` (all of them, or those in ``names``)."""
    removed = []
    for p in sorted(directory.iterdir()) if directory.is_dir() else []:
        if p.is_file() and is_store_file(p.name) and (names is None or p.name in names):
            p.unlink()
            removed.append(p.name)
    return removed


# --- reading and verifying -----------------------------------------------------------


def read_header(path: Path, *, expected_bytes: int | None = None) -> dict[str, TensorEntry]:
    """Parse and check a shard's safetensors header; raise :class:`StoreError` if it is damaged.

    Checks the file size (against ``expected_bytes`` when given), the header length and
    JSON, known dtypes, and that the tensors tile the data section exactly.
    """
    fix = ("delete it and re-run `misfeat cache` with the same arguments: the run resumes and "
           "recomputes only the missing shards")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"shard {path} is missing; {fix}") from None
    if expected_bytes is not None and size != expected_bytes:
        what = "truncated" if size < expected_bytes else "longer than recorded"
        raise StoreError(f"shard {path} is {what} ({size} bytes, manifest says {expected_bytes}); {fix}")
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or n > min(_HEADER_LIMIT, size - 8):
            raise StoreError(f"shard {path} has no valid safetensors header; {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"shard {path} has a corrupted safetensors header; {fix}") from None
    entries: dict[str, TensorEntry] = {}
    base, expect = 8 + n, 0
    try:
        items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                       key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in items:
            dtype, itemsize = _ST_DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            count = 1
            for dim in shape:
                count *= dim
            if start != expect or end - start != count * itemsize:
                raise ValueError(name)
            entries[name] = TensorEntry(dtype, shape, base + start, base + end)
            expect = end
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StoreError(f"shard {path} has an inconsistent safetensors header; {fix}") from None
    if base + expect != size:
        raise StoreError(f"shard {path} is truncated or padded ({size} bytes, header describes "
                         f"{base + expect}); {fix}")
    return entries


def file_checksum(path: Path, algo: str = CHECKSUM) -> str:
    digest = new_digest(algo)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return f"{algo}:{digest.hexdigest()}"


def verify_shard(directory: Path, record: ShardRecord, *, checksum: bool = True) -> dict[str, TensorEntry]:
    """Check one recorded shard: size, header, row counts, and (``checksum``) its bytes."""
    path = directory / record.file
    entries = read_header(path, expected_bytes=record.bytes)
    for name in META_TENSORS:
        if name not in entries or entries[name].shape != (record.rows,):
            raise StoreError(f"shard {path} lacks {name}[{record.rows}]: it is not the shard the manifest "
                             "describes; delete it and re-run `misfeat cache` with the same arguments")
    if checksum:
        algo = record.checksum.split(":", 1)[0]
        if algo not in CHECKSUMS or file_checksum(path, algo) != record.checksum:
            raise StoreError(
                f"shard {path} is corrupted (its {algo} checksum differs from the manifest's); delete "
                "it and re-run `misfeat cache` with the same arguments to recompute it"
            )
    return entries
