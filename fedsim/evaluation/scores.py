"""Confusion-matrix scores for ordinal tumour grading, in plain numpy, and the input checks they share.

Everything is computed from a confusion matrix whose rows are the true class
and whose columns are the predicted class, so a metric never has to look at
the raw labels again. That also makes the patient-level bootstrap
(:mod:`fedsim.evaluation.bootstrap`) cheap: a resample is a weighted sum of
per-patient confusion matrices, scored by the same functions.

Conventions for the corner cases (all chosen so that no metric raises on a
small or lopsided test split):

* recall of a class absent from ``y_true`` is NaN, and such classes are left
  out of the balanced accuracy;
* precision of a class that is never predicted is 0.0;
* F1 of a class is 0.0 when its precision and recall are both 0, and the macro
  F1 averages over the classes present in ``y_true`` or in ``y_pred``;
* quadratic weighted kappa is 1.0 when the expected disagreement is 0 (see
  :func:`quadratic_weighted_kappa`);
* a metric of an empty confusion matrix is NaN.

The underscore helpers (label and length checks, first-seen grouping) are also
used by :mod:`fedsim.evaluation.bootstrap` and :mod:`fedsim.evaluation.summaries`,
so that every entry point rejects bad input with the same messages.
:mod:`fedsim.evaluation` re-exports the public names of all three modules.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "accuracy",
    "as_confusion_matrix",
    "balanced_accuracy",
    "confusion_matrix",
    "macro_f1",
    "per_class_precision",
    "per_class_recall",
    "quadratic_weighted_kappa",
]


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` as an int, or raise if it is not a positive integer."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _as_labels(y: ArrayLike, num_classes: int, name: str) -> np.ndarray:
    """Convert class labels to a 1-D int64 array, checking they lie in ``[0, num_classes)``.

    Float input is accepted only when every value is a whole number, so that
    ``[0.0, 2.0]`` works but ``[0.5]`` is reported instead of silently truncated.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError(f"{name} must hold whole-number class labels")
    labels = arr.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        raise ValueError(f"{name} has label {labels[bad][0]} outside [0, {num_classes})")
    return labels


def as_confusion_matrix(cm: ArrayLike) -> np.ndarray:
    """Return ``cm`` as a float64 square matrix of non-negative counts, or raise."""
    arr = np.asarray(cm, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square and non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("confusion matrix entries must be finite and non-negative")
    return arr


def _check_same_length(**arrays: Sequence) -> int:
    """Return the common length of the keyword arguments, or raise naming them."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def _first_seen_index(ids: Sequence[Hashable]) -> tuple[np.ndarray, list]:
    """Map ids to ``0..m-1`` in first-seen order.

    Returns:
        ``(inverse, uniques)`` with ``uniques[inverse[i]] == ids[i]``.
    """
    index: dict[Hashable, int] = {}
    # np.ndarray elements (e.g. np.str_) hash like their Python values, so
    # mixing lists and arrays of the same ids gives the same groups.
    inverse = np.fromiter((index.setdefault(i, len(index)) for i in ids), dtype=np.int64, count=len(ids))
    return inverse, list(index)


# --------------------------------------------------------------------------- #
# Point metrics
# --------------------------------------------------------------------------- #
def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Count (true, predicted) label pairs.

    Args:
        y_true: True class labels, integers in ``[0, num_classes)``.
        y_pred: Predicted class labels, same length and range.
        num_classes: Number of classes ``k``.

    Returns:
        A ``(k, k)`` int64 matrix; entry ``[i, j]`` counts samples of true class
        ``i`` predicted as ``j``.

    Raises:
        ValueError: On mismatched lengths, non-integer labels or labels out of range.
    """
    k = _check_num_classes(num_classes)
    t = _as_labels(y_true, k, "y_true")
    p = _as_labels(y_pred, k, "y_pred")
    _check_same_length(y_true=t, y_pred=p)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(cm: ArrayLike) -> float:
    """Fraction of samples on the diagonal; NaN for an empty matrix."""
    m = as_confusion_matrix(cm)
    total = m.sum()
    return float(np.trace(m) / total) if total > 0 else math.nan


def per_class_recall(cm: ArrayLike) -> np.ndarray:
    """Recall (sensitivity) of every class; NaN for a class absent from ``y_true``."""
    m = as_confusion_matrix(cm)
    support = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)


def per_class_precision(cm: ArrayLike) -> np.ndarray:
    """Precision of every class.

    A class that is never predicted has no false positives, but its precision
    is 0/0; it is reported as 0.0 (scikit-learn's ``zero_division=0``) so the
    value stays finite and a model that ignores a class is not rewarded.
    """
    m = as_confusion_matrix(cm)
    predicted = m.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(predicted > 0, np.diag(m) / predicted, 0.0)


def balanced_accuracy(cm: ArrayLike) -> float:
    """Mean recall over the classes present in ``y_true``; NaN if there are none."""
    recall = per_class_recall(cm)
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else math.nan


def macro_f1(cm: ArrayLike) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or predicted.

    F1 is computed as ``2 TP / (2 TP + FP + FN)``, which equals the harmonic
    mean of precision and recall whenever both are defined and is 0 when both
    are 0 (a class that is present but never correctly predicted). Classes
    neither present nor predicted carry no information and are skipped.
    """
    m = as_confusion_matrix(cm)
    denom = m.sum(axis=1) + m.sum(axis=0)  # 2 TP + FN + FP
    active = denom > 0
    if not active.any():
        return math.nan
    return float(np.mean(2.0 * np.diag(m)[active] / denom[active]))


def quadratic_weighted_kappa(cm: ArrayLike) -> float:
    """Cohen's kappa with quadratic disagreement weights ``(i - j)^2``.

    Confusing Grade I with Grade III costs four times as much as confusing
    neighbouring grades, which suits ordinal labels. The value is
    ``1 - sum(W * O) / sum(W * E)`` where ``O`` is the observed joint
    distribution and ``E`` the outer product of its marginals.

    Degenerate case: the expected disagreement ``sum(W * E)`` is 0 only when
    every true label and every prediction are the same single class. The
    observed disagreement is then 0 too, so agreement is perfect and 1.0 is
    returned (scikit-learn would return NaN from 0/0). An empty matrix gives NaN.
    """
    m = as_confusion_matrix(cm)
    n = m.sum()
    if n == 0:
        return math.nan
    k = m.shape[0]
    grades = np.arange(k, dtype=np.float64)
    # The usual 1/(k-1)^2 normalisation of the weights cancels in the ratio.
    weights = (grades[:, None] - grades[None, :]) ** 2
    observed = float((weights * m).sum()) / n
    expected = float(m.sum(axis=1) @ weights @ m.sum(axis=0)) / (n * n)
    if expected == 0.0:
        return 1.0
    return 1.0 - observed / expected
