"""Evaluation: from a model's predictions to the figures of eval.json, final.json and the text report.

Modules, from the scores up (the first five import no torch):

* :mod:`~fedsim.evaluation.scores`: the confusion matrix and the scores computed from it (accuracy, balanced
  accuracy, macro F1, quadratic weighted kappa, per-class recall and precision), with the conventions for the
  corner cases (numpy);
* :mod:`~fedsim.evaluation.bootstrap`: percentile intervals that resample whole patients (numpy);
* :mod:`~fedsim.evaluation.summaries`: patch-to-image aggregation and the JSON-ready summaries, per site or
  pooled from counts (numpy);
* :mod:`~fedsim.evaluation.report`: a summary as a plain-text report (plain Python);
* :mod:`~fedsim.evaluation.schema`: the keys of a test report and the check that a report has them (plain Python);
* :mod:`~fedsim.evaluation.levels`: predictions at patch and image level, their summaries for training, eval.py
  and the final report, and the pooling of hospitals' counts (numpy);
* :mod:`~fedsim.evaluation.offline`: eval.py's evaluation of a saved checkpoint (torch).

Public API (loaded on first use, so ``import fedsim.evaluation`` costs nothing and a report can be read and
recomputed without torch):
    confusion_matrix, accuracy, balanced_accuracy, macro_f1, quadratic_weighted_kappa, per_class_recall,
    per_class_precision, as_confusion_matrix      (scores)
    bootstrap_ci                                  (bootstrap)
    aggregate_image_probs, summarize, count_summary, summary_from_counts   (summaries)
    format_report                                 (report)
    REPORT_KEYS, check_report_schema              (schema)
    EvalError, evaluate_checkpoint                (offline; loads torch)
"""

from __future__ import annotations

from fedsim.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "accuracy": "fedsim.evaluation.scores",
    "as_confusion_matrix": "fedsim.evaluation.scores",
    "balanced_accuracy": "fedsim.evaluation.scores",
    "confusion_matrix": "fedsim.evaluation.scores",
    "macro_f1": "fedsim.evaluation.scores",
    "per_class_precision": "fedsim.evaluation.scores",
    "per_class_recall": "fedsim.evaluation.scores",
    "quadratic_weighted_kappa": "fedsim.evaluation.scores",
    "bootstrap_ci": "fedsim.evaluation.bootstrap",
    "aggregate_image_probs": "fedsim.evaluation.summaries",
    "count_summary": "fedsim.evaluation.summaries",
    "summarize": "fedsim.evaluation.summaries",
    "summary_from_counts": "fedsim.evaluation.summaries",
    "format_report": "fedsim.evaluation.report",
    "REPORT_KEYS": "fedsim.evaluation.schema",
    "check_report_schema": "fedsim.evaluation.schema",
    "EvalError": "fedsim.evaluation.offline",
    "evaluate_checkpoint": "fedsim.evaluation.offline",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
