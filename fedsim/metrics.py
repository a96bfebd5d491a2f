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
import os
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from data.files import write_with

__all__ = [
    "confusion_matrix",
    "accuracy",
    "balanced_accuracy",
    "per_class_recall",
    "per_class_precision",
    "macro_f1",
    "quadratic_weighted_kappa",
    "aggregate_image_probs",
    "bootstrap_ci",
    "summarize",
    "save_confusion_matrix_png",
    "format_report",
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


def _as_cm(cm: ArrayLike) -> np.ndarray:
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
    m = _as_cm(cm)
    total = m.sum()
    return float(np.trace(m) / total) if total > 0 else math.nan


def per_class_recall(cm: ArrayLike) -> np.ndarray:
    """Recall (sensitivity) of every class; NaN for a class absent from ``y_true``."""
    m = _as_cm(cm)
    support = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)


def per_class_precision(cm: ArrayLike) -> np.ndarray:
    """Precision of every class.

    A class that is never predicted has no false positives, but its precision
    is 0/0; it is reported as 0.0 (scikit-learn's ``zero_division=0``) so the
    value stays finite and a model that ignores a class is not rewarded.
    """
    m = _as_cm(cm)
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
    m = _as_cm(cm)
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
    m = _as_cm(cm)
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


def count_summary(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int, *, magnifications: Sequence[Hashable],
                  patients: Sequence[Hashable], n_boot: int = 1000, seed: int = 0) -> dict:
    """Aggregate counts of one site's predictions, poolable across sites without per-sample data.

    Returns ``confusion_matrix``, ``per_magnification`` ({magnification: confusion
    matrix}) and ``bootstrap`` (``n_boot`` confusion matrices of patient resamples).
    Summing these over sites, resample by resample, gives a bootstrap stratified
    by site, from which :func:`summary_from_counts` draws the intervals.
    """
    t, p = _as_labels(y_true, num_classes, "y_true"), _as_labels(y_pred, num_classes, "y_pred")
    mags = np.asarray([str(m) for m in magnifications])
    out = {"confusion_matrix": confusion_matrix(t, p, num_classes).tolist(),
           "per_magnification": {m: confusion_matrix(t[mags == m], p[mags == m], num_classes).tolist()
                                 for m in sorted(set(mags.tolist()))}}
    out["bootstrap"] = _bootstrap_cms(t, p, patients, num_classes, n_boot, seed).tolist() if n_boot and len(t) else []
    return out


def summary_from_counts(cm: ArrayLike, class_names: Sequence[str], *, per_magnification: dict[str, ArrayLike],
                        per_hospital_accuracy: dict[str, float], bootstrap: ArrayLike | None = None) -> dict:
    """The keys of :func:`summarize`, computed from pooled counts instead of samples."""
    m = _as_cm(cm)
    summary = {
        **_cm_figures(m, class_names),
        "per_magnification_accuracy": {k: accuracy(v) for k, v in sorted(per_magnification.items())},
        "per_hospital_accuracy": dict(per_hospital_accuracy),
        "confusion_matrix": np.rint(m).astype(np.int64),
        "ci95": _intervals(np.asarray(bootstrap if bootstrap is not None else [], dtype=np.float64)),
    }
    return _json_ready(summary)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
def _load_font(size: int):
    """Pillow's built-in font at ``size`` px (scalable on Pillow >= 10.1), no font file needed."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn with ``font``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _shade(value: float) -> tuple[int, int, int]:
    """Colour for a row-normalised value: white at 0, dark blue at 1."""
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(c) for c in np.rint(low + (high - low) * value))


def _draw_centered(draw, box: tuple[int, int, int, int], lines: list[tuple[str, Any]], fill) -> None:
    """Draw ``(text, font)`` lines stacked and centred inside ``box`` = (x0, y0, x1, y1)."""
    sizes = [_text_size(draw, text, font) for text, font in lines]
    gap = 4
    y = (box[1] + box[3] - sum(h for _, h in sizes) - gap * (len(lines) - 1)) / 2
    for (text, font), (w, h) in zip(lines, sizes):
        draw.text(((box[0] + box[2] - w) / 2, y), text, font=font, fill=fill, anchor="lt")
        y += h + gap


def _draw_cells(draw, m: np.ndarray, origin: tuple[int, int], cell: int, fonts: tuple[Any, Any]) -> None:
    """Shade and label every cell with its count and row percentage."""
    totals = m.sum(axis=1)
    for i, j in np.ndindex(*m.shape):
        frac = m[i, j] / totals[i] if totals[i] > 0 else 0.0
        x0, y0 = origin[0] + j * cell, origin[1] + i * cell
        box = (x0, y0, x0 + cell, y0 + cell)
        draw.rectangle(box, fill=_shade(frac), outline=(90, 90, 90))
        pct = f"{100 * frac:.1f}%" if totals[i] > 0 else "n/a"
        text_fill = (255, 255, 255) if frac > 0.5 else (0, 0, 0)
        _draw_centered(draw, box, [(str(int(m[i, j])), fonts[0]), (pct, fonts[1])], text_fill)


def _draw_vertical_text(image, text: str, font, center: tuple[int, int]) -> None:
    """Paste ``text`` rotated 90 degrees counter-clockwise, centred at ``center``."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(image)
    w, h = _text_size(probe, text, font)
    label = Image.new("RGB", (w + 4, h + 4), (255, 255, 255))
    ImageDraw.Draw(label).text((2, 2), text, font=font, fill=(0, 0, 0), anchor="lt")
    label = label.rotate(90, expand=True)
    image.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2))


def _render_confusion_matrix(m: np.ndarray, class_names: Sequence[str], title: str):
    """Lay out the figure: title, y-axis ("true") on the left, x-axis ("predicted") below."""
    from PIL import Image, ImageDraw

    font, small = _load_font(16), _load_font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_size(probe, n, font)[0] for n in class_names)
    line_h = _text_size(probe, "Ag%", font)[1]
    pad, k = 12, m.shape[0]
    cell = max(90, name_w + 12)  # wide enough for the column labels
    title_w = _text_size(probe, title, font)[0] + 2 * pad if title else 0
    x0, y0 = pad + line_h + pad + name_w + pad, pad + (line_h + pad if title else 0)
    width = max(x0 + k * cell + pad, title_w)  # a long title widens the canvas
    height = y0 + k * cell + 2 * (line_h + pad) + pad
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if title:
        # Centred over the grid, but shifted if it would run off the canvas.
        cx = min(max(x0 + k * cell / 2, title_w / 2), width - title_w / 2)
        draw.text((cx, pad), title, font=font, fill=(0, 0, 0), anchor="mt")
    _draw_cells(draw, m, (x0, y0), cell, (font, small))
    for i, name in enumerate(class_names):
        draw.text((x0 - pad, y0 + (i + 0.5) * cell), name, font=font, fill=(0, 0, 0), anchor="rm")
        draw.text((x0 + (i + 0.5) * cell, y0 + k * cell + pad), name, font=font, fill=(0, 0, 0), anchor="mt")
    axis_y = y0 + k * cell + line_h + 2 * pad
    draw.text((x0 + k * cell / 2, axis_y), "predicted", font=font, fill=(0, 0, 0), anchor="mt")
    _draw_vertical_text(image, "true", font, (pad + line_h // 2, y0 + k * cell // 2))
    return image


def save_confusion_matrix_png(
    cm: ArrayLike, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Draw a confusion matrix as a PNG with Pillow.

    Cells are shaded by their row-normalised value (the fraction of that true
    class) and show the count and that percentage. The file is written
    atomically (:func:`data.files.write_with`: temporary file, fsync, rename),
    so a reader never sees a half-written image.

    Args:
        cm: ``(k, k)`` confusion matrix, rows = true class.
        class_names: ``k`` class names, used on both axes.
        path: Destination file; missing parent directories are created.
        title: Optional title drawn above the matrix.

    Raises:
        ValueError: If ``cm`` is not a square count matrix or the number of
            names differs from its size.
        data.files.WriteError: The disk is full or the folder cannot be written (one line).
    """
    m = _as_cm(cm)
    if len(class_names) != m.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {m.shape[0]}x{m.shape[0]} confusion matrix")
    image = _render_confusion_matrix(m, [str(n) for n in class_names], title)
    write_with(path, lambda fh: image.save(fh, format="PNG"))


# --------------------------------------------------------------------------- #
# Text report
# --------------------------------------------------------------------------- #
def _fmt(value: Any, digits: int = 4) -> str:
    """Format a metric value, showing None (undefined) as ``n/a``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _headline_lines(summary: dict) -> list[str]:
    """The four headline metrics with their confidence intervals."""
    ci = summary.get("ci95", {})
    rows = [
        ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro F1", "macro_f1"),
        ("QWK", "qwk"),
    ]
    lines = []
    for label, key in rows:
        line = f"  {label:<18} {_fmt(summary.get(key)):>7}"
        if key in ci and ci[key][0] is not None:
            line += f"   95% CI [{_fmt(ci[key][0])}, {_fmt(ci[key][1])}]"
        lines.append(line)
    return lines


def _class_lines(summary: dict) -> list[str]:
    """Per-class recall / precision table."""
    recall, precision = summary.get("per_class_recall", {}), summary.get("per_class_precision", {})
    width = max([len("class")] + [len(n) for n in recall])
    lines = [f"  {'class':<{width}}  {'recall':>7}  {'precision':>9}"]
    for name in recall:
        lines.append(f"  {name:<{width}}  {_fmt(recall[name]):>7}  {_fmt(precision.get(name)):>9}")
    return lines


def _group_lines(label: str, accuracies: dict) -> list[str]:
    """Accuracy per magnification or hospital; nothing when not available."""
    if not accuracies:
        return []
    width = max(len(str(key)) for key in accuracies)
    return [f"{label}:"] + [f"  {str(key):<{width}}  {_fmt(acc)}" for key, acc in accuracies.items()]


def _matrix_lines(summary: dict) -> list[str]:
    """The confusion matrix as an aligned table, rows = true, columns = predicted."""
    names = list(summary.get("per_class_recall", {}))
    cm = summary.get("confusion_matrix", [])
    if not cm or len(names) != len(cm):
        return []
    corner = "true\\pred"
    width = max(len(n) for n in names + [str(c) for row in cm for c in row] + [corner])
    header = f"  {corner:<{width}}" + "".join(f"  {n:>{width}}" for n in names)
    body = ["  " + f"{n:<{width}}" + "".join(f"  {c:>{width}}" for c in row) for n, row in zip(names, cm)]
    return ["confusion matrix:", header] + body


def format_report(summary: dict, title: str = "") -> str:
    """Render a :func:`summarize` dict as a multi-line plain-text report.

    Args:
        summary: Output of :func:`summarize` (possibly after a JSON round trip).
        title: Optional first line.

    Returns:
        The report, without a trailing newline.
    """
    lines = [title, "=" * len(title)] if title else []
    lines.append(f"n = {summary.get('n', 'n/a')}")
    lines += _headline_lines(summary)
    lines += ["per class:"] + _class_lines(summary)
    lines += _group_lines("accuracy per magnification", summary.get("per_magnification_accuracy", {}))
    lines += _group_lines("accuracy per hospital", summary.get("per_hospital_accuracy", {}))
    lines += _matrix_lines(summary)
    return "\n".join(lines)
