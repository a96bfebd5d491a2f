"""Statistics over seeds: Student t confidence intervals of a mean and the paired t-test.

With a handful of seeds per variant the normal approximation is too narrow;
the t distribution (from :mod:`scipy.stats`) gives the honest width. scipy is
imported when a statistic is first computed, so planning a study does not pay for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Paired", "mean_ci", "paired_t"]


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[int, float, float]:
    """(n, mean, half-width of the Student t interval); the half-width is NaN below two values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return 0, math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return n, mean, math.nan
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return n, mean, half


@dataclass(frozen=True)
class Paired:
    """A paired t-test of a - b: pairs, mean difference, its 95% interval, two-sided p."""

    n: int
    diff: float
    low: float
    high: float
    p: float


def paired_t(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t-test of two equally long samples (the same seeds under two settings).

    Degenerate cases get a definite answer instead of scipy's NaN and warning:
    fewer than two pairs give NaN bounds and p; identical differences give a
    zero-width interval and p = 1 (all differences 0) or p = 0 (otherwise).
    """
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n, mean, half = mean_ci(diffs)
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan)
    sd = statistics.stdev(diffs)
    if sd == 0:
        return Paired(n, mean, mean, mean, 1.0 if mean == 0 else 0.0)
    # The t distribution directly rather than ttest_rel, which warns about nearly equal differences.
    t = mean / (sd / math.sqrt(n))
    return Paired(n, mean, mean - half, mean + half, float(2.0 * stats.t.sf(abs(t), n - 1)))
