"""Convert a store between format versions (checksum algorithms); the rows are not touched.

Where it sits: beside the store (``shards.py`` files, ``store.py`` manifest); used by hand.

- version 1 (misfeat 0.1, issue 4): every shard checksum is ``sha256``;
- version 2 (issue 20): ``blake3`` (5x faster to compute), ``sha256`` still accepted.

This misfeat reads both. :func:`migrate_store` with ``version=1`` makes a store that an
older misfeat (which refuses version 2) can open and verify; ``version=2`` re-hashes a
version 1 store with BLAKE3 so that verifying it costs a fifth. Each shard's old checksum
is verified before its new one is recorded, and the manifest is replaced atomically, so
an interrupted migration leaves a valid store of the old or the new version.
"""

from __future__ import annotations

import os
from pathlib import Path

from misfeat.activations.shards import (
    MANIFEST_FILE,
    ShardRecord,
    StoreError,
    file_checksum,
    verify_shard,
    write_json_atomic,
)
from misfeat.activations.store import read_manifest, with_shards

_ALGO = {1: "sha256", 2: "blake3"}


def migrate_store(path: str | os.PathLike, version: int = 2, *, fsync: bool = True) -> int:
    """Rewrite the complete store at ``path`` as format ``version`` (1 or 2); returns the
    number of shards whose checksum changed."""
    if version not in _ALGO:
        raise StoreError(f"version={version}: a store can be migrated to version 1 (sha256) or 2 (blake3)")
    directory = Path(path)
    doc = read_manifest(directory)
    if doc is None:
        raise StoreError(f"{directory} holds no activation store ({MANIFEST_FILE} is missing)")
    if not doc.get("complete"):
        raise StoreError(f"{directory} is an incomplete store; finish it first (re-run the same `misfeat cache` "
                         "command), then migrate it")
    algo = _ALGO[version]
    records, changed = {}, 0
    for raw in doc["shards"]:
        record = ShardRecord.from_json(raw)
        if not record.checksum.startswith(f"{algo}:"):
            verify_shard(directory, record)  # never re-hash a damaged shard into a valid-looking one
            record = ShardRecord(**{**record.to_json(), "checksum": file_checksum(directory / record.file, algo)})
            changed += 1
        records[record.index] = record
    write_json_atomic(directory / MANIFEST_FILE, {**with_shards(doc, records, True), "version": version},
                      fsync=fsync)
    return changed
