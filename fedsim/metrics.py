"""Classification metrics for ordinal tumour grading, in plain numpy: one import for all of them.

This module only re-exports; the code lives in three modules, by what it does:

* :mod:`fedsim.scores`: the confusion matrix and the scores computed from it
  (:func:`confusion_matrix`, :func:`accuracy`, :func:`balanced_accuracy`,
  :func:`macro_f1`, :func:`quadratic_weighted_kappa`, per-class recall and
  precision, :func:`as_confusion_matrix`), with the conventions for the corner
  cases (absent classes, empty matrices);
* :mod:`fedsim.bootstrap`: :func:`bootstrap_ci`, percentile intervals that
  resample whole patients rather than correlated patches;
* :mod:`fedsim.summaries`: :func:`aggregate_image_probs` (patch to image) and
  the JSON-ready summaries, per site or pooled from counts
  (:func:`summarize`, :func:`count_summary`, :func:`summary_from_counts`).

Nothing here imports torch, so evaluation reports can be read and recomputed
without it.
"""

from __future__ import annotations

from fedsim.bootstrap import bootstrap_ci
from fedsim.scores import (
    accuracy,
    as_confusion_matrix,
    balanced_accuracy,
    confusion_matrix,
    macro_f1,
    per_class_precision,
    per_class_recall,
    quadratic_weighted_kappa,
)
from fedsim.summaries import aggregate_image_probs, count_summary, summarize, summary_from_counts

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
