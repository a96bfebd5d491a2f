"""Patient-level bootstrap confidence intervals of the confusion-matrix scores, in plain numpy.

Patches or images from one patient are correlated, so resampling them
individually would understate the uncertainty; every resample here draws whole
groups (patients) with replacement. A resample is represented by its confusion
matrix alone, so any score of :mod:`fedsim.evaluation.scores` applies to it,
and the stack of resampled matrices can be summed across sites (see
:func:`fedsim.evaluation.summaries.count_summary`) to pool intervals without
sharing per-sample data.

:func:`bootstrap_ci` is the public entry point; :func:`_bootstrap_cms` and
:func:`_percentile_interval` are shared with :mod:`fedsim.evaluation.summaries`,
which draws one set of resamples for all the intervals of a summary.
:mod:`fedsim.evaluation` re-exports :func:`bootstrap_ci`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from fedsim.evaluation.scores import _as_labels, _check_num_classes, _check_same_length, _first_seen_index

__all__ = ["bootstrap_ci"]


def _bootstrap_cms(
    y_true: ArrayLike, y_pred: ArrayLike, groups: Sequence[Hashable], num_classes: int, n_boot: int, seed: int
) -> np.ndarray:
    """Confusion matrices of ``n_boot`` resamples of whole groups, shape ``(n_boot, k, k)``.

    Each resample draws as many groups as there are, with replacement. Instead
    of materialising the resampled labels, it counts how often each group was
    drawn and multiplies that ``(n_boot, n_groups)`` count matrix by the stack
    of per-group confusion matrices: one small matmul for all resamples.
    """
    k = _check_num_classes(num_classes)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    t = _as_labels(y_true, k, "y_true")
    p = _as_labels(y_pred, k, "y_pred")
    if _check_same_length(y_true=t, y_pred=p, groups=groups) == 0:
        raise ValueError("cannot bootstrap an empty sample")
    g, uniques = _first_seen_index(groups)
    n_groups = len(uniques)
    per_group = np.bincount(g * k * k + t * k + p, minlength=n_groups * k * k).reshape(n_groups, k * k)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    offsets = np.arange(n_boot)[:, None] * n_groups
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    # float64 matmul goes through BLAS and is exact for counts below 2**53.
    cms = counts.astype(np.float64) @ per_group.astype(np.float64)
    return np.rint(cms).astype(np.int64).reshape(n_boot, k, k)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Central percentile interval of the finite ``values``; NaNs if none are finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _check_level(level: float) -> None:
    """Raise unless ``level`` is a probability strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def bootstrap_ci(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    groups: Sequence[Hashable],
    metric: Callable[[np.ndarray], float],
    num_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval that resamples groups, not samples.

    Patches or images from one patient are correlated, so resampling them
    individually would understate the uncertainty; here whole groups
    (patients) are drawn with replacement and all their samples come along.

    Args:
        y_true: True class labels.
        y_pred: Predicted class labels.
        groups: Group id (e.g. patient) of every sample.
        metric: Function of a ``(k, k)`` confusion matrix, e.g. :func:`fedsim.evaluation.scores.accuracy`.
        num_classes: Number of classes ``k``.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling generator, for reproducible intervals.
        level: Coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``. Resamples where the metric is NaN are ignored; if all
        are, both bounds are NaN.

    Raises:
        ValueError: On invalid labels, mismatched lengths, empty input,
            ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    _check_level(level)
    cms = _bootstrap_cms(y_true, y_pred, groups, num_classes, n_boot, seed)
    values = np.fromiter((metric(cm) for cm in cms), dtype=np.float64, count=len(cms))
    return _percentile_interval(values, level)
