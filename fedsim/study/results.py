"""The study's results: one row per (variant, seed) from the runs' final.json, and the files made of them.

``OUT/results.csv`` holds the rows, ``OUT/results.md`` the means with 95%
Student t intervals over seeds, paired t-tests of the paper's comparisons over
seeds and, where the runs wrote their answers, McNemar's test of the same
comparisons over the test images; ``OUT/results.png`` the means as a bar chart.
On the embedded benchmark, results.md also states each expected outcome with
its result (:mod:`fedsim.study.outcomes`), with the colour control as a row,
and ``cross_site.csv`` / ``cross_site.png`` hold the cross-site matrix.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.files import write_atomic
from fedsim.plots import StudyTable, save_study_chart
from fedsim.study.plan import Plan
from fedsim.study.stats import Paired, mean_ci, paired_t

#: (key in results.csv, label in results.md and results.png): the metrics summarized over seeds.
METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("heldout_accuracy", "held-out accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("qwk", "QWK"),
    ("grade3_recall", "Grade III recall"),
)

#: Paired comparisons across seeds: (variant, reference).
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("fedprox", "centralized"),
    ("dual", "detail"),
    ("dual", "context"),
    ("macenko", "none"),
)

CSV_COLUMNS = (
    "variant",
    "group",
    "seed",
    "run",
    "accuracy",
    "heldout_accuracy",
    "balanced_accuracy",
    "macro_f1",
    "qwk",
    "grade3_recall",
)


def metrics_of(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """:data:`METRICS` without those no run reported (the held-out accuracy of a study without one)."""
    reported = {key for key, _ in METRICS if any(_number(r.get(key)) is not None for r in rows)}
    return tuple(m for m in METRICS if m[0] != "heldout_accuracy" or m[0] in reported)


def read_final(folder: Path) -> dict[str, Any]:
    """A run's final.json, or {} when the run has not finished."""
    path = folder / "final.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def metric_values(final: dict[str, Any]) -> dict[str, Any]:
    """The study's numbers from one final.json (image level); None where absent."""
    image = final.get("image", {})
    values = {key: image.get(key) for key in ("balanced_accuracy", "macro_f1", "qwk")}
    values["accuracy"] = final.get("accuracy", image.get("accuracy"))
    values["heldout_accuracy"] = final.get("heldout_accuracy")
    values["grade3_recall"] = (image.get("per_class_recall") or {}).get("Grade III")
    for magnification, accuracy in (image.get("per_magnification_accuracy") or {}).items():
        values[f"accuracy_mag_{magnification}"] = accuracy
    return values


def result_rows(plan: Plan, failed: dict[str, int]) -> list[dict[str, Any]]:
    """One row per variant and seed; a shared run appears under each of its variants."""
    rows = []
    for job in plan.jobs:
        final = read_final(job.run.folder)
        name = job.run.folder.name
        status = "ok" if final else f"failed (exit {failed[name]})" if name in failed else "missing"
        rows.append(
            {
                "variant": job.variant.name,
                "group": job.variant.group,
                "seed": job.seed,
                "run": name,
                **metric_values(final),
                "status": status,
            }
        )
    return rows


def _number(value: Any) -> float | None:
    """A finite float, or None for missing and undefined (NaN) values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def values_of(rows: list[dict[str, Any]], variant: str, metric: str) -> dict[int, float]:
    """{seed: value} of one variant's finished runs with a defined value."""
    found = {}
    for row in rows:
        value = _number(row.get(metric))
        if row["variant"] == variant and row["status"] == "ok" and value is not None:
            found[row["seed"]] = value
    return found


def summarize_results(rows: list[dict[str, Any]], plan: Plan) -> StudyTable:
    """{group: {variant: {metric: (n, mean, CI half-width)}}} over seeds, in table order."""
    table: StudyTable = {}
    for job in plan.jobs:
        group = table.setdefault(job.variant.group, {})
        if job.variant.name not in group:
            group[job.variant.name] = {
                key: mean_ci(list(values_of(rows, job.variant.name, key).values())) for key, _ in metrics_of(rows)
            }
    return table


def compare(rows: list[dict[str, Any]], a: str, b: str, metric: str) -> Paired:
    """Paired t-test of variant a minus variant b over the seeds both finished."""
    va, vb = values_of(rows, a, metric), values_of(rows, b, metric)
    seeds = sorted(set(va) & set(vb))
    return paired_t([va[s] for s in seeds], [vb[s] for s in seeds])


def fmt(value: Any, digits: int = 3) -> str:
    """A figure to ``digits`` decimals; ``n/a`` when missing or undefined."""
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _fmt_ci(n: int, mean: float, half: float) -> str:
    if n == 0:
        return "n/a"
    return f"{mean:.3f} ± {fmt(half)}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def render_markdown(rows: list[dict[str, Any]], plan: Plan) -> str:
    """results.md: a table per group, then the paired comparisons."""
    ok = sum(row["status"] == "ok" for row in rows)
    intro = (
        f"{ok} of {len(rows)} variant-seed results finished ({len(plan.runs)} distinct runs). "
        "Values: mean over seeds ± half-width of the 95% Student t interval (image level, test split)."
    )
    lines = ["# Study results", "", intro, ""]
    header = ["variant", "n seeds", *(label for _, label in metrics_of(rows))]
    for group, table in summarize_results(rows, plan).items():
        lines += [f"## {group}", "", _md_row(header), _md_row(["---"] * len(header))]
        for variant, stats in table.items():
            n = max(stat[0] for stat in stats.values())
            lines.append(_md_row([variant, str(n), *(_fmt_ci(*stats[key]) for key, _ in metrics_of(rows))]))
        lines.append("")
    return "\n".join(lines + _comparison_lines(rows, plan)).rstrip("\n") + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _comparison_lines(rows: list[dict[str, Any]], plan: Plan) -> list[str]:
    """Paired comparisons whose two variants are both in the plan."""
    present = {job.variant.name for job in plan.jobs}
    pairs = [(a, b) for a, b in COMPARISONS if a in present and b in present]
    if not pairs:
        return []
    header = ["comparison", "metric", "n pairs", "mean difference", "95% CI", "p (paired t, two-sided)"]
    lines = ["## Paired comparisons over seeds", "", _md_row(header), _md_row(["---"] * len(header))]
    for a, b in pairs:
        for key, label in metrics_of(rows):
            test = compare(rows, a, b, key)
            ci = "n/a" if math.isnan(test.low) else f"[{test.low:+.3f}, {test.high:+.3f}]"
            diff = "n/a" if test.n == 0 else f"{test.diff:+.3f}"
            lines.append(_md_row([f"{a} vs {b}", label, str(test.n), diff, ci, _fmt_p(test.p)]))
    return lines + [""]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv, with a column per magnification found in any final.json."""
    extra = sorted({key for row in rows for key in row if key.startswith("accuracy_mag_")})
    columns = [*CSV_COLUMNS, *extra, "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    write_atomic(path, buffer.getvalue())


def finished_runs(plan: Plan) -> tuple[dict[str, dict[int, Path]], dict[str, dict[int, dict]]]:
    """``folders[variant][seed]`` and ``finals[variant][seed]`` of every finished job."""
    folders: dict[str, dict[int, Path]] = {}
    finals: dict[str, dict[int, dict]] = {}
    for job in plan.jobs:
        final = read_final(job.run.folder)
        if final:
            folders.setdefault(job.variant.name, {})[job.seed] = job.run.folder
            finals.setdefault(job.variant.name, {})[job.seed] = final
    return folders, finals


def image_comparison_lines(folders: dict[str, dict[int, Path]], hospitals: list[str]) -> list[str]:
    """McNemar's test of the paper's comparisons on the hospitals' test images, where both variants wrote
    answers."""
    from fedsim.study.outcomes import comparison_line
    from fedsim.study.paired import compare_runs

    found = []
    for a, b in COMPARISONS:
        if a in folders and b in folders:
            c = compare_runs(folders[a], folders[b], a, b, "test", hospitals)
            if c.total.n:
                found.append(comparison_line(c))
    if not found:
        return []
    return ["## Paired comparisons over test images", "", *found, ""]


def hospitals_of(folders: dict[str, dict[int, Path]]) -> list[str]:
    """The hospitals that wrote answers in any finished run."""
    names = {p.parent.name for runs in folders.values() for f in runs.values() for p in f.glob("hospitals/*/*.csv")}
    return sorted(names)


def write_results(plan: Plan, failed: dict[str, int]) -> list[dict[str, Any]]:
    """results.csv, results.md and results.png in the study folder (and on the benchmark the cross-site
    matrix); returns the rows."""
    from fedsim.study.crosssite import write_cross_site
    from fedsim.study.outcomes import benchmark_context, outcome_lines

    plan.out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(plan, failed)
    write_csv(plan.out / "results.csv", rows)
    folders, finals = finished_runs(plan)
    text = render_markdown(rows, plan)
    context = benchmark_context(folders)
    extra = image_comparison_lines(folders, context["hospitals"] if context else hospitals_of(folders))
    if context is not None:
        args = (context["hospitals"], context["heldout"], context["ceiling"], context["colour"])
        extra = [*outcome_lines(folders, finals, *args), *extra]
        matrix = write_cross_site(plan.out, finals)
        if matrix is not None:
            extra += cross_site_lines(*matrix)
    if extra:
        text = text.rstrip("\n") + "\n\n" + "\n".join(extra).rstrip("\n") + "\n"
    write_atomic(plan.out / "results.md", text)
    save_study_chart(plan.out / "results.png", summarize_results(rows, plan), metrics_of(rows))
    return rows


def cross_site_lines(models: list[str], columns: list[str], matrix: list) -> list[str]:
    """The cross-site matrix as a markdown table (means over seeds)."""
    lines = ["## Cross-site evaluation", "", "Test accuracy, mean over seeds: model (row) on site (column).", ""]
    lines += [_md_row(["model", *columns]), _md_row(["---"] * (len(columns) + 1))]
    lines += [_md_row([m, *(fmt(v) for v in values)]) for m, values in zip(models, matrix)]
    return lines + [""]
