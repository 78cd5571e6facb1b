"""Directories of misfeat checkpoints (a fine-tune's steps, the organism's ``em-steps``): the one lister."""

from __future__ import annotations

import os
import re
from pathlib import Path

from misfeat.models import CHECKPOINT_FILE, ModelLoadError


def checkpoint_step(path: str | os.PathLike, default: int) -> int:
    """The step number at the end of a checkpoint's name (``step-0012`` -> 12), else ``default``."""
    match = re.search(r"(\d+)\D*$", str(path).rstrip("/"))
    return int(match.group(1)) if match else default


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The misfeat checkpoints directly under ``directory``, in step order."""
    directory = Path(directory)
    found = [p for p in directory.iterdir() if (p / CHECKPOINT_FILE).is_file()] if directory.is_dir() else []
    if not found:
        raise ModelLoadError(f"no misfeat checkpoints under {directory} (directories with {CHECKPOINT_FILE})")
    return sorted(found, key=lambda p: checkpoint_step(p, 0))
