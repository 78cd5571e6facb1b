"""The tokenised-prompt cache: tokenise a prompt set once per tokenizer, reuse it in every run.

Where it sits: prompts -> **tokens** (this cache) -> feeder (plan, batches) -> forward.

Caching several hooks, checkpoints or runs over one prompt set tokenises the same records
with the same tokenizer each time; on a GPU that tokenising, not the forward, bounded the
cache (``docs/benchmarks.md``). The first run that tokenises a whole set saves its flat
arrays (4 bytes a token); later runs load them instead of calling the tokenizer.

A file is named by a hash of everything that decides the token ids: the prompt set's hash
(its records), the tokenisation key (:meth:`Tokenizing.key`: tokenizer, chat format, BOS
policy, responses or not) and the model's context length (over-long records are refused).
It holds a BLAKE3 digest of its arrays, checked on load: a damaged or foreign file is a
miss (and is replaced), never wrong tokens. Files are written under a unique temporary
name and renamed, so concurrent runs (torchrun ranks) never see half a file.

Where: ``$MISFEAT_TOKEN_CACHE`` (``off`` disables it), else ``$MISFEAT_HOME/tokens``, else
``$XDG_CACHE_HOME/misfeat/tokens`` (``~/.cache``). The least recently used files are
removed beyond :data:`LIMIT_BYTES`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from misfeat.activations.plan import Encodings

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

LIMIT_BYTES = 2 << 30  # 2 GiB: about 500M tokens
_FORMAT = "misfeat-tokens-1"
_ARRAYS = ("tokens", "offsets", "n_prompt")


def cache_dir() -> Path | None:
    """The cache directory, or None when ``MISFEAT_TOKEN_CACHE=off``."""
    explicit = os.environ.get("MISFEAT_TOKEN_CACHE")
    if explicit is not None:
        return None if explicit.strip().lower() in ("", "off", "0", "no", "false") else Path(explicit).expanduser()
    home = os.environ.get("MISFEAT_HOME")
    if home:
        return Path(home).expanduser() / "tokens"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "misfeat" / "tokens"


def cache_key(prompt_hash: str, tokenizing_key: str, n_ctx: int) -> str:
    """The name of a prompt set's tokens under one tokenisation."""
    return hashlib.sha256(f"{_FORMAT}|{prompt_hash}|{tokenizing_key}|{n_ctx}".encode()).hexdigest()[:32]


def _digest(arrays: dict[str, np.ndarray]) -> str:
    import blake3

    digest = blake3.blake3()
    for name in _ARRAYS:
        digest.update(name.encode())
        digest.update(memoryview(arrays[name]).cast("B"))
    return digest.hexdigest()


def load(key: str, n_prompts: int) -> Encodings | None:
    """The cached tokens of ``key`` (``n_prompts`` prompts), or None (absent, damaged, disabled)."""
    import numpy as np

    root = cache_dir()
    path = root / f"{key}.npz" if root is not None else None
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAYS}
            stored = bytes(npz["digest"]).decode()
        ok = (len(arrays["n_prompt"]) == n_prompts and len(arrays["offsets"]) == n_prompts + 1
              and int(arrays["offsets"][-1]) == len(arrays["tokens"]) and stored == _digest(arrays))
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        logger.warning("ignoring damaged token cache %s (%s)", path, err)
        ok = False
    return Encodings(0, arrays["tokens"], arrays["offsets"], arrays["n_prompt"]) if kept(path, ok) else None


def save(key: str, enc: Encodings) -> Path | None:
    """Save a whole set's tokens under ``key`` (atomically); None when the cache is off or unwritable."""
    import numpy as np

    root = cache_dir()
    if root is None:
        return None
    arrays = {"tokens": np.ascontiguousarray(enc.tokens, dtype=np.int32),
              "offsets": np.ascontiguousarray(enc.offsets, dtype=np.int64),
              "n_prompt": np.ascontiguousarray(enc.n_prompt, dtype=np.int64)}
    path = root / f"{key}.npz"
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays, digest=np.frombuffer(_digest(arrays).encode(),
                                                                                    dtype=np.uint8)))
        _prune(root, keep=path)
    except OSError as err:  # a cache: never fail the run for it
        logger.warning("could not save the tokenised prompts to %s (%s)", root, err)
        return None
    return path


def kept(path: Path, ok: bool) -> bool:
    """The end of a cache file's check: one that failed is removed, one that passed is touched
    (the least recently used go first when the cache is pruned)."""
    if not ok:
        path.unlink(missing_ok=True)
        return False
    os.utime(path)
    return True


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a cache file whole or not at all: ``write(f)`` into a temporary file beside
    ``path``, then renamed over it (creates the directory; OSError for the caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _prune(root: Path, keep: Path, limit: int = LIMIT_BYTES) -> None:
    files = sorted((p for p in root.glob("*.npz") if p != keep), key=lambda p: p.stat().st_mtime)
    total = keep.stat().st_size + sum(p.stat().st_size for p in files)
    for p in files:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
