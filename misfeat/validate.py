"""Checks every command runs before any work: the output directory, numbers, and whether an
SAE fits the model or cache it is used with. Each raises one :class:`MisfeatError` that
names the problem and the fix; the CLI prints it as one line.

The policy for existing outputs, shared by every command (see the README): a directory
holding a previous result is refused unless ``--overwrite`` (replace it) or ``--resume``
(continue it, after checking that the configuration and data match) is given; two
processes never write one ``--out`` at once (:func:`lock_out`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from misfeat.errors import MisfeatError

logger = logging.getLogger(__name__)


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output directory that is a file or cannot be written, before any work.

    Nothing is created: the nearest existing directory on the path is probed with a
    temporary file (removed at once), which also catches read-only file systems for root.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MisfeatError(f"{what} {path} is an existing file, not a directory; give a directory path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MisfeatError(f"{what} {path} cannot be created: {existing} is a file; give a directory path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".misfeat-probe-"):
            pass
    except OSError as err:
        raise MisfeatError(f"{what} {path} is not writable ({existing}: {err.strerror}); give a writable "
                           "directory") from None
    return path


RESULT_FILES = ("summary.json", "cfg.json", "run.json", "manifest.json", "checkpoints")


def check_no_results(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output directory that already holds a misfeat result (a summary, an SAE, a
    run or a store), so that nothing is overwritten unless ``--overwrite`` says so."""
    path = Path(path)
    found = [name for name in RESULT_FILES if (path / name).exists()]
    found += [f"{sub.name}/cfg.json" for sub in sorted(path.glob("*/")) if (sub / "cfg.json").is_file()][:1]
    if found:
        raise MisfeatError(f"{what} {path} already holds results ({', '.join(found)}); pass --overwrite to replace "
                           "them, --resume to continue that run (where the command has it), or choose another "
                           "directory")


def lock_out(path: str | os.PathLike, what: str = "--out") -> Any:
    """Take an exclusive lock on the output directory ``path`` for this process's lifetime.

    Returns the open lock file (keep it; the lock goes when it is closed or the process
    ends, also on a crash). A second process on the same directory is refused at once,
    before it writes anything, with the first one's pid. The lock file lives in the
    temporary directory (named by a hash of the resolved path), so ``path`` gets no file.
    """
    import fcntl

    path = Path(path)
    handle = open(lock_path(path), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise MisfeatError(f"{what} {path} is in use by another misfeat process (pid {holder}); wait for it to "
                           "finish or choose another directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of output directory ``path`` (in the temporary directory; see :func:`lock_out`)."""
    import hashlib

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    locks = Path(tempfile.gettempdir()) / "misfeat-locks"
    locks.mkdir(exist_ok=True)
    return locks / f"{key}.lock"


def check_finite(values: Iterable[float] | Any, what: str) -> None:
    """Refuse NaN or infinite numbers (a list of floats or a tensor) naming ``what``."""
    if hasattr(values, "isfinite"):  # a tensor
        import torch

        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise MisfeatError(f"{what} holds {bad} NaN or infinite value(s); give finite numbers")
        return
    bad = [v for v in values if not math.isfinite(float(v))]
    if bad:
        raise MisfeatError(f"{what} must be finite numbers, got {', '.join(str(v) for v in bad)}")


# --- SAE compatibility -------------------------------------------------------------------


def sae_origin(sae: Any) -> dict[str, Any]:
    """The model an SAE was trained on, as recorded in its metadata (empty for foreign SAEs)."""
    meta = sae.cfg.metadata
    return {key: getattr(meta, key, None) for key in ("model_fingerprint", "model_architecture")
            if getattr(meta, key, None)}


def check_sae_fits(sae: Any, *, width: int, where: str, hooks: Iterable[str] | None = None,
                   fingerprint: str | None = None, architecture: str | None = None, force: bool = False,
                   other_weights: int = logging.INFO) -> None:
    """Refuse an SAE used where it does not belong: the wrong width or a hook ``where`` lacks
    (always an error), or another model than the one it was trained on.

    A different architecture (configuration hash) is an error, a warning with ``force``;
    the same architecture with other weights (a fine-tune of the SAE's model, the usual
    case of model diffing) is logged at level ``other_weights``."""
    d_in, hook = int(sae.cfg.d_in), sae.cfg.metadata.hook_name
    if d_in != width:
        raise MisfeatError(f"the SAE reads vectors of width {d_in} but {where} has width {width}; use an SAE "
                           "trained on this model's activations")
    if hooks is not None and hook not in (hooks := list(hooks)):
        raise MisfeatError(f"the SAE is for hook {hook}, which {where} does not hold ({', '.join(hooks)})")
    origin = sae_origin(sae)
    trained_arch = origin.get("model_architecture")
    if trained_arch and architecture and trained_arch != architecture:
        message = (f"the SAE was trained on another model (architecture {trained_arch}) than {where} "
                   f"(architecture {architecture}); its latents mean nothing there")
        if not force:
            raise MisfeatError(message + "; use an SAE of this model, or --force to use it anyway")
        logger.warning("%s (--force given: going on)", message)
    elif origin.get("model_fingerprint") and fingerprint and origin["model_fingerprint"] != fingerprint:
        logger.log(other_weights, "the SAE was trained on model %s, %s is model %s (other weights, same "
                   "architecture: fine for a fine-tune of the SAE's model)", origin["model_fingerprint"], where,
                   fingerprint)


def check_sae_model(sae: Any, model: Any, force: bool = False, where: str = "the model") -> None:
    """:func:`check_sae_fits` for a loaded model."""
    from misfeat.models import architecture_fingerprint, fingerprint

    check_sae_fits(sae, width=int(model.cfg.d_model), where=where, hooks=model.hook_dict,
                   fingerprint=fingerprint(model), architecture=architecture_fingerprint(model), force=force)


def check_sae_store(sae: Any, store: Any, force: bool = False) -> None:
    """:func:`check_sae_fits` for an activation store (its manifest records its model)."""
    hook = sae.cfg.metadata.hook_name
    if hook not in store.hooks:
        raise MisfeatError(f"the SAE is for hook {hook}, which the cache {store.path} does not hold "
                           f"({', '.join(store.hooks)})")
    model = store.manifest.get("model", {})
    check_sae_fits(sae, width=store.d_of(hook), where=f"the cache {store.path}", fingerprint=model.get("fingerprint"),
                   architecture=model.get("architecture"), force=force, other_weights=logging.WARNING)
