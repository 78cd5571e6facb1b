"""Uncertainty over prompts: a paired percentile bootstrap.

The rates misfeat reports are means over a prompt set (exact answer-set probabilities, one per
prompt), so their uncertainty is that of the prompt sample. :func:`bootstrap_ci` resamples the
prompts with replacement, the same indices for every array it is given (before and after an
intervention are paired: the same prompts), recomputes the statistic and returns the percentile
interval (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from misfeat.errors import MisfeatError


def bootstrap_ci(stat: Callable[..., float], *values: Sequence[float] | Sequence[Sequence[float]],
                 n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of ``stat(*resampled)`` over ``n`` bootstrap draws of the prompts.

    Each of ``values`` holds one value per prompt (shape ``(P,)``) or one row per model (``(M, P)``); every draw
    takes the same ``P`` prompt indices (with replacement) from all of them, and ``stat`` receives numpy arrays of
    the same shapes."""
    import numpy as np

    arrays = [np.asarray(v, dtype=float) for v in values]
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) != 1 or 0 in sizes:
        raise MisfeatError(f"bootstrap_ci: the arrays must share one non-empty prompt axis, got shapes "
                           f"{[a.shape for a in arrays]}")
    if not 0 < level < 1:
        raise MisfeatError(f"bootstrap_ci: level must lie in (0, 1), not {level}")
    (size,) = sizes
    idx = np.random.default_rng(seed).integers(0, size, size=(n, size))
    draws = np.array([stat(*(a[..., i] for a in arrays)) for i in idx])
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def cut(before, after) -> float:
    """1 - (mean rate after) / (mean rate before), the rates averaged over prompts and then over models (the
    figure locate reports for a clamp); 0 where nothing was misaligned before."""
    import numpy as np

    b, a = float(np.mean(before)), float(np.mean(after))
    return 1 - a / b if b > 0 else 0.0


def mean(values) -> float:
    """The mean over prompts (and models): a rate."""
    import numpy as np

    return float(np.mean(values))
