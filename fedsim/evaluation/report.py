"""A plain-text report of one prediction set's figures, for people reading a terminal or a log.

It reads the dict that :func:`fedsim.evaluation.summaries.summarize` (or
:func:`fedsim.evaluation.summaries.summary_from_counts`) returns, also after a
JSON round trip, so undefined values arrive as None and are shown as ``n/a``.
Plain Python: not even numpy is imported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


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
    return [f"{label}:"] + [f"  {key!s:<{width}}  {_fmt(acc)}" for key, acc in accuracies.items()]


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
    """Render a :func:`fedsim.evaluation.summaries.summarize` dict as a multi-line plain-text report.

    Args:
        summary: Output of :func:`fedsim.evaluation.summaries.summarize` (possibly after a JSON round trip).
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
