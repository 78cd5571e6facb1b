"""Read a JSONL prompt file once per content: later runs neither parse nor hash its records.

Where it sits: prompt file -> **prompt_files** -> tokens (the tokenised-prompt cache) -> feeder.

A cached run over a JSONL path needs, before its first batch, only the set's size, its hash
(the manifest's ``prompts.hash``, which also names its tokens in the tokenised-prompt cache)
and whether any record has a response. Parsing every line and hashing every record for that
cost as much as the rest of a cached run's host work (``docs/benchmarks.md``). So the first
read of a file records those three facts under the BLAKE3 digest of the file's bytes (~1 ms
for a few MB); a later read of the same bytes takes them from there and returns a set whose
records are parsed only if something reads them (tokenising when the token cache misses,
the ``response`` check). The hash recorded is :attr:`PromptSet.hash`, the same value a fresh
read gives. An edited file has another digest: it is read, hashed and tokenised again. A
damaged or foreign index file is a miss.

The index files live beside the tokenised prompts (``tokens.cache_dir()``, ``files/``);
``MISFEAT_TOKEN_CACHE=off`` disables both.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from misfeat.activations import tokens as token_cache
from misfeat.data import PromptRecord, PromptSet, parse_jsonl
from misfeat.errors import PromptFileError

logger = logging.getLogger(__name__)

_FORMAT = "misfeat-prompt-file-1"
_KEEP = 1000  # index files kept (least recently used go first); each is ~200 bytes


def _digest(data: bytes) -> str:
    import blake3

    return blake3.blake3(data, max_threads=1).hexdigest()


def _index_dir() -> Path | None:
    root = token_cache.cache_dir()
    return None if root is None else root / "files"


class IndexedPromptFile(PromptSet):
    """A JSONL prompt file read before with the same bytes: ``len``, :attr:`hash` and
    :attr:`any_response` come from the index; the records are parsed on first use (once,
    thread-safe), from bytes checked against the digest."""

    def __init__(self, path: Path, digest: str, n: int, prompt_hash: str, any_response: bool):
        object.__setattr__(self, "name", path.stem)
        object.__setattr__(self, "meta", {"path": str(path)})
        self.__dict__.update(hash=prompt_hash, any_response=any_response)  # the cached properties
        self.__dict__.update(_path=path, _file_digest=digest, _n=n, _records=None, _lock=threading.Lock())

    @property
    def records(self) -> tuple[PromptRecord, ...]:
        with self._lock:
            if self._records is None:
                data = self._path.read_bytes()
                if _digest(data) != self._file_digest:
                    raise PromptFileError(f"{self._path} changed while it was being used; run again")
                self.__dict__["_records"] = parse_jsonl(data, self._path).records
            return self._records

    def __len__(self) -> int:
        return self._n


def read_prompt_file(path: str | os.PathLike) -> PromptSet:
    """:func:`misfeat.data.read_jsonl`, without parsing or hashing a file whose bytes were read before."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    data = path.read_bytes()
    root = _index_dir()
    if root is None:
        return parse_jsonl(data, path)
    digest = _digest(data)
    known = _load(root, digest)
    if known is not None:
        return IndexedPromptFile(path, digest, known["n"], known["hash"], known["any_response"])
    pset = parse_jsonl(data, path)
    _save(root, digest, {"n": len(pset), "hash": pset.hash, "any_response": pset.any_response})
    return pset


def _load(root: Path, digest: str) -> dict[str, Any] | None:
    path = root / f"{digest[:32]}.json"
    try:
        doc = json.loads(path.read_text())
        ok = (doc.get("format") == _FORMAT and doc.get("digest") == digest and isinstance(doc.get("n"), int)
              and isinstance(doc.get("hash"), str) and isinstance(doc.get("any_response"), bool))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("ignoring damaged prompt-file index %s (%s)", path, err)
        ok = False
    return doc if token_cache.kept(path, ok) else None


def _save(root: Path, digest: str, facts: dict[str, Any]) -> None:
    """Record ``facts`` of the file with ``digest`` (atomically; a cache: errors only warn)."""
    doc = json.dumps({"format": _FORMAT, "digest": digest, **facts}).encode()
    try:
        token_cache.write_atomically(root / f"{digest[:32]}.json", lambda f: f.write(doc))
        files = sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in files[:-_KEEP]:
            old.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("could not save the prompt-file index in %s (%s)", root, err)
