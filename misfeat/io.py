"""Small I/O helpers shared by every stage: atomic JSON, run-directory file names, progress.

Every command that produces results writes ``DIR/summary.json`` (machine-readable) and
prints a table; the file names of a run directory are defined here and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

SUMMARY_FILE = "summary.json"
PLOT_FILE = "plot.png"
SAMPLES_FILE = "samples.jsonl"
EXAMPLES_FILE = "examples.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"

T = TypeVar("T")


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, numpy/torch scalars numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(_clean(row)) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


PROGRESS_EVERY_S = 10.0  # seconds between progress log lines when stderr is not a terminal


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", disable: bool | None = None, **kwargs: Any):
    """Progress of a long loop: a tqdm bar on a terminal; otherwise (a log file, a CI job,
    a notebook's captured stderr) an INFO log line every ``MISFEAT_PROGRESS_EVERY`` seconds
    (default 10) with the count, rate and time left, and one when the loop ends, for loops
    that ran at least that long. ``MISFEAT_PROGRESS=1`` forces the bar, ``0`` turns both off;
    ``disable=True`` turns off this one."""
    import sys

    from tqdm.auto import tqdm

    env = os.environ.get("MISFEAT_PROGRESS")
    if disable or env == "0":
        return tqdm(iterable, total=total, disable=True, **kwargs)
    if env == "1" or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False, **kwargs)
    every = float(os.environ.get("MISFEAT_PROGRESS_EVERY", PROGRESS_EVERY_S))
    return _log_bar()(iterable, desc=desc, total=total, unit=unit, mininterval=every, **kwargs)


_LOG_BAR: type | None = None


def _log_bar() -> type:
    """A tqdm whose display is a log line (built on first use: tqdm is imported lazily)."""
    global _LOG_BAR
    if _LOG_BAR is None:
        import logging
        import time

        from tqdm import tqdm

        log = logging.getLogger("misfeat.progress")

        class LogBar(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._every = kwargs["mininterval"]
                self._logged = False
                super().__init__(*args, file=_NullFile(), leave=False, **kwargs)

            def display(self, msg: str | None = None, pos: int | None = None) -> None:
                if getattr(self, "_closing", False):
                    return
                if time.time() - getattr(self, "start_t", time.time()) >= self._every:
                    log.info("%s", self.format_meter(**self.format_dict))
                    self._logged = True

            def close(self) -> None:
                if self.disable or not hasattr(self, "_logged"):
                    return
                if self._logged or time.time() - self.start_t >= self._every:
                    log.info("%s (done)", self.format_meter(**self.format_dict))
                self._closing = True
                super().close()

        _LOG_BAR = LogBar
    return _LOG_BAR


class _NullFile:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """A plain-text table of ``rows`` (a list of dicts) for the terminal."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else "nan"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
