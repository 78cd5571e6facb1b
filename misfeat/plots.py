"""Figures: one place that sets up matplotlib (headless) and saves a figure as a PNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def figure(path: str | Path, size: tuple[float, float] = (6, 3.6)) -> Iterator[Any]:
    """``with figure("out/plot.png") as ax: ax.plot(...)``: a single-axes figure, saved on exit
    (tight layout, 120 dpi, parent directories created) and closed, also on error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=120)
    try:
        yield ax
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
