"""Classification metrics for ordinal tumour grading, in plain numpy.

Everything is computed from a confusion matrix whose rows are the true class
and whose columns are the predicted class, so a metric never has to look at
the raw labels again. That also makes the patient-level bootstrap cheap: a
resample is a weighted sum of per-patient confusion matrices.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "accuracy",
    "aggregate_image_probs",
    "as_confusion_matrix",
    "balanced_accuracy",
    "bootstrap_ci",
    "confusion_matrix",
    "count_summary",
    "macro_f1",
    "per_class_precision",
    "per_class_recall",
    "quadratic_weighted_kappa",
    "summarize",
    "summary_from_counts",
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


# --------------------------------------------------------------------------- #
# Image-level aggregation
# --------------------------------------------------------------------------- #
def aggregate_image_probs(patch_probs: ArrayLike, image_ids: Sequence[Hashable]) -> tuple[np.ndarray, list]:
    """Average patch class probabilities into one probability vector per image.

    Args:
        patch_probs: ``(n_patches, num_classes)`` probabilities (or any scores).
        image_ids: Hashable id of the image each patch was cut from.

    Returns:
        ``(image_probs, ids)``: an ``(n_images, num_classes)`` float64 array of
        per-image means and the image ids, both in first-seen order.

    Raises:
        ValueError: If ``patch_probs`` is not 2-D, is not finite, or its length
            differs from ``image_ids``.
    """
    probs = np.asarray(patch_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"patch_probs must be 2-D (n_patches, num_classes), got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("patch_probs must be finite")
    _check_same_length(patch_probs=probs, image_ids=image_ids)
    inverse, ids = _first_seen_index(image_ids)
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=len(ids))
    return sums / counts[:, None], ids


# --------------------------------------------------------------------------- #
# Patient-level bootstrap
# --------------------------------------------------------------------------- #
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
        metric: Function of a ``(k, k)`` confusion matrix, e.g. :func:`accuracy`.
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


# --------------------------------------------------------------------------- #
# Summary dictionary
# --------------------------------------------------------------------------- #
def _json_ready(value: Any) -> Any:
    """Recursively turn numpy values into Python ones and NaN/inf into None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _accuracy_by(keys: Sequence[Hashable], correct: np.ndarray) -> dict:
    """Accuracy within each distinct key, in sorted key order when keys sort."""
    _check_same_length(keys=keys, labels=correct)
    inverse, uniques = _first_seen_index(keys)
    hits = np.bincount(inverse, weights=correct, minlength=len(uniques))
    totals = np.bincount(inverse, minlength=len(uniques))
    result = {u: float(h / n) for u, h, n in zip(uniques, hits, totals)}
    try:
        return dict(sorted(result.items()))
    except TypeError:  # mixed key types: keep first-seen order
        return result


def _summary_probs(probs: ArrayLike, n: int, k: int) -> np.ndarray:
    """Validate the ``(n, k)`` score matrix passed to :func:`summarize`."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape != (n, k):
        raise ValueError(f"probs must have shape ({n}, {k}) to match y_true and class_names, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs must be finite")
    return arr


def _ci95(y_true: np.ndarray, y_pred: np.ndarray, patients: Sequence | None, k: int, n_boot: int, seed: int) -> dict:
    """95 % patient-bootstrap intervals of accuracy, balanced accuracy and QWK."""
    if n_boot == 0 or len(y_true) == 0:
        return _intervals([])
    groups = range(len(y_true)) if patients is None else patients
    return _intervals(_bootstrap_cms(y_true, y_pred, groups, k, n_boot, seed))


def _intervals(cms) -> dict:
    """95 % percentile intervals of the CI metrics over bootstrap confusion matrices (one shared set of
    resamples keeps the three comparable); [None, None] without resamples."""
    names = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "qwk": quadratic_weighted_kappa}
    if len(cms) == 0:
        return {name: [None, None] for name in names}
    return {name: list(_percentile_interval(np.array([fn(cm) for cm in cms]), 0.95)) for name, fn in names.items()}


def _cm_figures(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """The figures that follow from a confusion matrix alone."""
    return {
        "n": int(cm.sum()),
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "qwk": quadratic_weighted_kappa(cm),
        "per_class_recall": dict(zip(class_names, per_class_recall(cm))),
        "per_class_precision": dict(zip(class_names, per_class_precision(cm))),
    }


def summarize(
    y_true: ArrayLike,
    probs: ArrayLike,
    class_names: Sequence[str],
    *,
    magnifications: Sequence[Hashable] | None = None,
    hospitals: Sequence[Hashable] | None = None,
    patients: Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every evaluation metric of one prediction set, as a JSON-ready dict.

    Predictions are the argmax of ``probs``. Keys: ``n``, ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``qwk``, ``per_class_recall`` and
    ``per_class_precision`` (``{class_name: value}``),
    ``per_magnification_accuracy`` and ``per_hospital_accuracy``
    (``{str(key): accuracy}``, empty when not given), ``confusion_matrix``
    (list of lists, rows = true) and ``ci95`` (``{"accuracy" | "balanced_accuracy"
    | "qwk": [low, high]}``). Undefined values (NaN) become None, so
    ``json.dumps(..., allow_nan=False)`` always succeeds.

    Args:
        y_true: True class labels, ``n`` of them.
        probs: ``(n, len(class_names))`` class probabilities or scores.
        class_names: Name of every class, in label order.
        magnifications: Optional magnification of every sample.
        hospitals: Optional hospital (client) of every sample.
        patients: Optional patient of every sample; the bootstrap resamples
            patients. When None every sample is its own group.
        n_boot: Bootstrap resamples; 0 skips the intervals (they become None).
        seed: Seed of the bootstrap.

    Raises:
        ValueError: On inconsistent shapes or invalid labels.
    """
    k = len(class_names)
    t = _as_labels(y_true, _check_num_classes(k), "y_true")
    p = np.argmax(_summary_probs(probs, len(t), k), axis=1)
    for name, values in (("magnifications", magnifications), ("hospitals", hospitals), ("patients", patients)):
        if values is not None:
            _check_same_length(y_true=t, **{name: values})
    cm = confusion_matrix(t, p, k)
    correct = (t == p).astype(np.float64)
    summary = {
        **_cm_figures(cm, class_names),
        "per_magnification_accuracy": {} if magnifications is None else _accuracy_by(magnifications, correct),
        "per_hospital_accuracy": {} if hospitals is None else _accuracy_by(hospitals, correct),
        "confusion_matrix": cm,
        "ci95": _ci95(t, p, patients, k, n_boot, seed),
    }
    return _json_ready(summary)


def count_summary(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    num_classes: int,
    *,
    magnifications: Sequence[Hashable],
    patients: Sequence[Hashable],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Aggregate counts of one site's predictions, poolable across sites without per-sample data.

    Returns ``confusion_matrix``, ``per_magnification`` ({magnification: confusion
    matrix}) and ``bootstrap`` (``n_boot`` confusion matrices of patient resamples).
    Summing these over sites, resample by resample, gives a bootstrap stratified
    by site, from which :func:`summary_from_counts` draws the intervals.
    """
    t, p = _as_labels(y_true, num_classes, "y_true"), _as_labels(y_pred, num_classes, "y_pred")
    mags = np.asarray([str(m) for m in magnifications])
    out = {
        "confusion_matrix": confusion_matrix(t, p, num_classes).tolist(),
        "per_magnification": {
            m: confusion_matrix(t[mags == m], p[mags == m], num_classes).tolist() for m in sorted(set(mags.tolist()))
        },
    }
    out["bootstrap"] = _bootstrap_cms(t, p, patients, num_classes, n_boot, seed).tolist() if n_boot and len(t) else []
    return out


def summary_from_counts(
    cm: ArrayLike,
    class_names: Sequence[str],
    *,
    per_magnification: dict[str, ArrayLike],
    per_hospital_accuracy: dict[str, float],
    bootstrap: ArrayLike | None = None,
) -> dict:
    """The keys of :func:`summarize`, computed from pooled counts instead of samples."""
    m = as_confusion_matrix(cm)
    summary = {
        **_cm_figures(m, class_names),
        "per_magnification_accuracy": {k: accuracy(v) for k, v in sorted(per_magnification.items())},
        "per_hospital_accuracy": dict(per_hospital_accuracy),
        "confusion_matrix": np.rint(m).astype(np.int64),
        "ci95": _intervals(np.asarray(bootstrap if bootstrap is not None else [], dtype=np.float64)),
    }
    return _json_ready(summary)
