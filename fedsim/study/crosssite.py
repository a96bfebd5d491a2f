"""Cross-site evaluation: every model of the study on every hospital's test images and on the held-out ones.

The rows are the federated global model (``fedprox``), the pooled model (``centralized``) and each hospital's
local-only model (``local-<H>``, trained on that hospital alone); the columns are the hospitals' test splits
and the held-out hospital. Every cell is read from the run's ``final.json``: each hospital tested the model
on its own images and only its figures left it. Values are means over the seeds that finished.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from data.files import write_atomic

#: The models a cross-site matrix shows, by variant name, in row order (local-<H> rows follow these).
MODELS = ("fedprox", "centralized")
HELDOUT_COLUMN = "held out"


def cross_site(finals: dict[str, dict[int, dict]]) -> tuple[list[str], list[str], list]:
    """(row names, column names, matrix of mean accuracies) from ``finals[variant][seed]`` = final.json."""
    models = [m for m in MODELS if m in finals] + sorted(v for v in finals if v.startswith("local-"))
    sites: list[str] = []
    for variant in models:
        for final in finals[variant].values():
            sites += [h for h in final.get("per_hospital_accuracy", {}) if h not in sites]
    heldout = any("heldout_accuracy" in f for v in models for f in finals[v].values())
    columns = sites + ([HELDOUT_COLUMN] if heldout else [])
    matrix = []
    for variant in models:
        line = []
        for column in columns:
            values = [_cell(final, column) for final in finals[variant].values()]
            values = [v for v in values if v is not None]
            line.append(statistics.fmean(values) if values else math.nan)
        matrix.append(line)
    return models, columns, matrix


def _cell(final: dict, column: str) -> float | None:
    value = (
        final.get("heldout_accuracy")
        if column == HELDOUT_COLUMN
        else final.get("per_hospital_accuracy", {}).get(column)
    )
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_cross_site(out: Path, finals: dict[str, dict[int, dict]]) -> tuple[list[str], list[str], list] | None:
    """``cross_site.csv`` (one row per model and seed, and its mean) and ``cross_site.png``; None (nothing
    written) when the study has none of the models."""
    from fedsim.plots import save_heatmap_png

    models, columns, matrix = cross_site(finals)
    if not models or not columns:
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "seed", *columns])
    for variant, means in zip(models, matrix):
        for seed, final in sorted(finals[variant].items()):
            writer.writerow([variant, seed, *("" if (v := _cell(final, c)) is None else f"{v:.4f}" for c in columns)])
        writer.writerow([variant, "mean", *("" if math.isnan(v) else f"{v:.4f}" for v in means)])
    write_atomic(out / "cross_site.csv", buffer.getvalue())
    save_heatmap_png(out / "cross_site.png", matrix, models, columns, "test accuracy: model (row) on site (column)")
    return models, columns, matrix
