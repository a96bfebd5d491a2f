"""Statistics of a study: over seeds (Student t intervals, the paired t-test) and over test images (McNemar's
exact test, equivalence by two one-sided tests, the power the test set gives).

With a handful of seeds per variant the normal approximation is too narrow;
the t distribution (from :mod:`scipy.stats`) gives the honest width. Two models
answering the same test images are compared pairwise: only the images on which
they disagree carry information (McNemar), and their number sets the power.
scipy is imported when a statistic is first computed, so planning a study does
not pay for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Discordance",
    "Equivalence",
    "Paired",
    "detectable_difference",
    "equivalence",
    "mcnemar",
    "mean_ci",
    "paired_t",
]


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


@dataclass(frozen=True)
class Discordance:
    """Two models on the same ``n`` images: ``b`` right only for the first, ``c`` right only for the second."""

    n: int
    b: int
    c: int

    def __add__(self, other: Discordance) -> Discordance:
        return Discordance(self.n + other.n, self.b + other.b, self.c + other.c)

    @property
    def difference(self) -> float:
        """Accuracy of the first minus the second, (b - c) / n; NaN without images."""
        return (self.b - self.c) / self.n if self.n else math.nan

    @property
    def standard_error(self) -> float:
        """Standard error of :attr:`difference` for paired answers: sqrt(b + c - (b - c)^2 / n) / n."""
        if not self.n:
            return math.nan
        return math.sqrt(max(self.b + self.c - (self.b - self.c) ** 2 / self.n, 0.0)) / self.n


def mcnemar(d: Discordance) -> float:
    """Two-sided p of McNemar's exact test: b ~ Binomial(b + c, 1/2) under equal accuracy (1 when b + c = 0).

    Summing the discordant pairs of several seeds (``Discordance.__add__``) gives the test stratified by seed:
    each image of each seed is one pair, and the conditional test needs only the totals.
    """
    from scipy import stats

    if d.b + d.c == 0:
        return 1.0
    return float(stats.binomtest(d.b, d.b + d.c, 0.5).pvalue)


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests that the accuracy difference lies within ``±margin``: the difference, its
    ``1 - 2 alpha`` interval (inside the margin iff equivalence is shown at ``alpha``) and the TOST p."""

    difference: float
    low: float
    high: float
    margin: float
    p: float


def equivalence(d: Discordance, margin: float = 0.03, alpha: float = 0.05) -> Equivalence:
    """TOST of paired answers (normal approximation with :attr:`Discordance.standard_error`)."""
    from scipy import stats

    diff, se = d.difference, d.standard_error
    if not d.n:
        return Equivalence(math.nan, math.nan, math.nan, margin, math.nan)
    z = float(stats.norm.ppf(1 - alpha))
    if se == 0:
        p = 0.0 if abs(diff) < margin else 1.0
        return Equivalence(diff, diff, diff, margin, p)
    p = max(float(stats.norm.sf((diff + margin) / se)), float(stats.norm.sf((margin - diff) / se)))
    return Equivalence(diff, diff - z * se, diff + z * se, margin, p)


def detectable_difference(d: Discordance, alpha: float = 0.01, power: float = 0.8) -> float:
    """The accuracy difference a two-sided test at ``alpha`` detects with ``power`` on these images, given
    their observed disagreement rate: (z_{1-alpha/2} + z_power) * sqrt((b + c) / n) / sqrt(n)."""
    from scipy import stats

    if not d.n:
        return math.nan
    spread = math.sqrt(max(d.b + d.c, 1) / d.n) / math.sqrt(d.n)
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * spread)
