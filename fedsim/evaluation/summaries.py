"""From patch predictions to the reported figures: patch-to-image aggregation and JSON-ready summaries.

:func:`aggregate_image_probs` averages the patch probabilities of each image,
so the same scores can be reported per patch and per image.
:func:`summarize` turns one prediction set into every figure of the
evaluation report (the scores of :mod:`fedsim.evaluation.scores`,
per-magnification and per-hospital accuracy, the confusion matrix and
patient-bootstrap intervals from :mod:`fedsim.evaluation.bootstrap`) as a dict
that ``json.dumps`` takes.

For evaluation spread over sites, :func:`count_summary` reduces one site's
predictions to counts (confusion matrices, and the confusion matrices of its
bootstrap resamples) that can be summed across sites without per-sample data;
:func:`summary_from_counts` turns the pooled counts into the same keys as
:func:`summarize`. Both paths share :func:`_cm_figures` and :func:`_intervals`,
so pooled and direct summaries agree by construction.

:mod:`fedsim.evaluation` re-exports the public names.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedsim.evaluation.bootstrap import _bootstrap_cms, _percentile_interval
from fedsim.evaluation.scores import (
    _as_labels,
    _check_num_classes,
    _check_same_length,
    _first_seen_index,
    accuracy,
    as_confusion_matrix,
    balanced_accuracy,
    confusion_matrix,
    macro_f1,
    per_class_precision,
    per_class_recall,
    quadratic_weighted_kappa,
)

__all__ = ["aggregate_image_probs", "count_summary", "summarize", "summary_from_counts"]


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
