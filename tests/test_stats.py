"""The paired bootstrap of misfeat.stats: hand-computed cases and scipy.stats.bootstrap as the reference."""

import numpy as np
import pytest

from misfeat import stats
from misfeat.errors import MisfeatError


def test_cases_computed_by_hand():
    assert stats.bootstrap_ci(stats.mean, [0.3] * 10) == pytest.approx((0.3, 0.3))  # no spread, no interval
    before = np.linspace(0.2, 1.0, 30)
    # paired: halving every prompt's rate halves every resample's mean, so the cut is 50% in every draw; unpaired
    # resampling would not keep it exact
    assert stats.bootstrap_ci(stats.cut, before, before / 2) == pytest.approx((0.5, 0.5))
    assert stats.cut([0.8, 0.4], [0.2, 0.1]) == pytest.approx(0.75) and stats.cut([0, 0], [0.1, 0]) == 0.0
    rows = np.array([[0.8, 0.6], [0.4, 0.2]])  # two models x two prompts: rates averaged over prompts and models
    assert stats.cut(rows, rows / 4) == pytest.approx(0.75)
    lo, hi = stats.bootstrap_ci(stats.mean, [0.0, 1.0] * 20, n=4000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / 40 ** 0.5, rel=0.15)  # the normal interval
    with pytest.raises(MisfeatError, match="share one non-empty prompt axis"):
        stats.bootstrap_ci(stats.cut, [0.1, 0.2], [0.1])
    with pytest.raises(MisfeatError, match="level"):
        stats.bootstrap_ci(stats.mean, [0.1], level=1.5)


def test_the_interval_matches_scipy_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    before = rng.beta(5, 2, 84)
    after = before * rng.beta(1, 6, 84)  # a clamp that cuts most, unevenly
    ours = stats.bootstrap_ci(stats.cut, before, after, n=10000)
    ref = scipy_stats.bootstrap((before, after), stats.cut, paired=True, vectorized=False, n_resamples=10000,
                                method="percentile", confidence_level=0.95, rng=0).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.007)
    assert ours[0] < stats.cut(before, after) < ours[1]
