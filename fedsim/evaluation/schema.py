"""The keys of a test report (eval.json and final.json alike), the check that a report has them all, its headline.

:data:`REPORT_KEYS` are the top-level keys, :data:`LEVEL_KEYS` those of each level's summary
(``report["image"]``, ``report["patch"]``), :data:`CI_KEYS` the figures with a 95% interval;
:func:`check_report_schema` lists the keys a report lacks, :func:`headline` adds the top-level
figures to a report. Plain Python, so a report can be checked without numpy or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CI_KEYS", "LEVEL_COUNTS", "LEVEL_KEYS", "REPORT_KEYS", "check_report_schema", "headline"]

#: Top-level keys of every test report: eval.json and final.json alike.
REPORT_KEYS: tuple[str, ...] = ("image", "patch", "accuracy", "n_images", "n_patches", "per_hospital_accuracy")
#: Keys of each level's summary (``report["image"]``, ``report["patch"]``), as summaries.summarize gives them.
LEVEL_KEYS: tuple[str, ...] = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "qwk",
    "per_class_recall",
    "per_class_precision",
    "per_magnification_accuracy",
    "per_hospital_accuracy",
    "confusion_matrix",
    "ci95",
)
#: The count each level carries under its own name too.
LEVEL_COUNTS: dict[str, str] = {"image": "n_images", "patch": "n_patches"}
#: The metrics with a 95% interval in ``ci95``.
CI_KEYS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "qwk")


def check_report_schema(report: dict[str, Any]) -> list[str]:
    """The keys an eval.json / final.json lacks, dotted (``image.qwk``, ``patch.ci95.accuracy``); [] when complete."""
    if not isinstance(report, dict):
        return list(REPORT_KEYS)
    missing = [key for key in REPORT_KEYS if key not in report]
    for level, count in LEVEL_COUNTS.items():
        summary = report.get(level)
        if not isinstance(summary, dict):
            continue
        missing += [f"{level}.{key}" for key in (*LEVEL_KEYS, count) if key not in summary]
        ci = summary.get("ci95")
        if isinstance(ci, dict):
            missing += [f"{level}.ci95.{key}" for key in CI_KEYS if key not in ci]
    return missing


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """Add the top-level figures final.json has (image level): accuracy, n_images, n_patches, per_hospital_accuracy."""
    result["accuracy"] = result["image"]["accuracy"]
    result["n_images"] = result["image"]["n"]
    result["n_patches"] = result["patch"]["n"]
    result["per_hospital_accuracy"] = result["image"]["per_hospital_accuracy"]
    return result
