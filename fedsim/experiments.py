"""Studies: the paper's comparisons as one command, every variant over several seeds.

    python -m fedsim.experiments --preset demo --seeds 3
    python -m fedsim.experiments --preset paper --data /path/to/CRC-HGD --only federation,scales
    python -m fedsim.experiments --preset demo --only fedavg --seeds 1 -- --rounds 1 --device cpu

Every (variant, seed) is one ``train.py`` run under torchrun, in
``OUT/runs/<variant>-s<seed>-<hash>``. The hash covers the run's resolved
settings (those that differ from the config defaults) and its number of ranks,
so variants with identical settings share one run, and a run whose
``final.json`` exists is never started again: an interrupted study continues
where it stopped (train.py itself resumes a half-finished run from its last
round checkpoint). Arguments after ``--`` go to every train.py run.

When all runs have ended, ``OUT/results.csv`` (one row per variant and seed),
``OUT/results.md`` (means with 95% Student t intervals over seeds, and paired
t-tests of the paper's comparisons) and ``OUT/results.png`` (bar chart) are written.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from data.files import write_atomic, write_with
from fedsim.config import ConfigError, DataConfig, RunConfig, load_toml

log = logging.getLogger("fedsim.experiments")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
PRESETS = {"demo": REPO / "configs" / "demo.toml", "paper": REPO / "configs" / "paper.toml"}

#: Settings every variant starts from: the paper's federated configuration.
BASE: dict[str, str] = {"--mode": "federated", "--mu": "0.01", "--bn": "average", "--scales": "dual",
                        "--stain": "macenko"}

#: (name, group, flags that differ from BASE). Variants whose settings resolve alike share a run.
VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("fedprox", "federation", {}),
    ("fedavg", "federation", {"--mu": "0"}),
    ("fedbn", "federation", {"--bn": "local"}),
    ("centralized", "federation", {"--mode": "centralized"}),
    ("dual", "scales", {}),
    ("detail", "scales", {"--scales": "detail"}),
    ("context", "scales", {"--scales": "context"}),
    ("mu-0", "mu", {"--mu": "0"}),
    ("mu-0.001", "mu", {"--mu": "0.001"}),
    ("mu-0.01", "mu", {}),
    ("mu-0.1", "mu", {"--mu": "0.1"}),
    ("macenko", "stain", {}),
    ("none", "stain", {"--stain": "none"}),
)

#: (key in results.csv, label in results.md and results.png): the metrics summarized over seeds.
METRICS: tuple[tuple[str, str], ...] = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                                       ("qwk", "QWK"), ("grade3_recall", "Grade III recall"))

#: Paired comparisons across seeds: (variant, reference).
COMPARISONS: tuple[tuple[str, str], ...] = (("fedprox", "centralized"), ("dual", "detail"),
                                           ("dual", "context"), ("macenko", "none"))

CSV_COLUMNS = ("variant", "group", "seed", "run", "accuracy", "balanced_accuracy", "macro_f1", "qwk",
               "grade3_recall")
TAIL_LINES = 20


class StudyError(ValueError):
    """A bad study setting; reported as one line with exit code 2."""


# ---- Student t distribution ----------------------------------------------------------------


def _nonzero(value: float, tiny: float = 1e-300) -> float:
    """Keeps Lentz's recurrence away from division by zero."""
    return value if abs(value) >= tiny else tiny


def _beta_fraction(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function, evaluated with Lentz's method."""
    c, d = 1.0, 1.0 / _nonzero(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, max_iter + 1):
        # Each step folds in one even and one odd term of the fraction.
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / _nonzero(1.0 + num * d)
            c = _nonzero(1.0 + num / c)
            h *= c * d
        if abs(c * d - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}) did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b).

    Args:
        a: First shape parameter, > 0.
        b: Second shape parameter, > 0.
        x: Point in [0, 1].

    Raises:
        ValueError: On x outside [0, 1] or non-positive shapes.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges quickly only below (a+1)/(a+b+2); above it use I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) of a t statistic."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float, tol: float = 1e-10) -> float:
    """The t with P(T <= t) = p, found by bisection on :func:`t_cdf`.

    Raises:
        ValueError: When p is not strictly between 0 and 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df, tol)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    while high - low > tol * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[int, float, float]:
    """(n, mean, half-width of the Student t interval); the half-width is NaN below two values."""
    n = len(values)
    if n == 0:
        return 0, math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return n, mean, math.nan
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return n, mean, half


@dataclass(frozen=True)
class Paired:
    """A paired t-test of a - b: pairs, mean difference, its 95% interval, two-sided p."""

    n: int
    diff: float
    low: float
    high: float
    p: float


def paired_t(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t-test of two equally long samples (the same seeds under two settings)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n, mean, half = mean_ci(diffs)
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan)
    sd = statistics.stdev(diffs)
    if sd == 0:
        # Identical differences: the test degenerates to "certainly equal" or "certainly not".
        return Paired(n, mean, mean, mean, 1.0 if mean == 0 else 0.0)
    return Paired(n, mean, mean - half, mean + half, t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1))


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One setting of the study; its flags follow the common arguments of every run."""

    name: str
    group: str
    flags: tuple[str, ...]

    @property
    def centralized(self) -> bool:
        """Centralized runs pool the data on one rank."""
        return self.flags[self.flags.index("--mode") + 1] == "centralized"


@dataclass
class Run:
    """One train.py run, shared by every (variant, seed) whose settings resolve alike."""

    folder: Path
    nproc: int
    args: list[str]
    jobs: list[tuple[str, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """A run is complete once train.py has written its final.json (it writes it last)."""
        return (self.folder / "final.json").is_file()

    def command(self) -> list[str]:
        """The torchrun command line of the run."""
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                str(TRAIN), *self.args, "--out", str(self.folder)]


@dataclass(frozen=True)
class Job:
    """One variant at one seed, and the run that produces its numbers."""

    variant: Variant
    seed: int
    run: Run


@dataclass
class Plan:
    """Every job of the study and the distinct runs behind them, in table order."""

    jobs: list[Job]
    runs: list[Run]
    out: Path


def supports_local_only() -> bool:
    """Local-only training needs train.py to restrict a run to one hospital's data."""
    return "only_hospital" in {f.name for f in dataclasses.fields(DataConfig)}


def variants(hospitals: Sequence[str]) -> list[Variant]:
    """The study's variants; ``local-<H>`` for each hospital when train.py can run one alone."""
    table = list(VARIANTS)
    if supports_local_only():
        local = [(f"local-{h}", "federation", {"--mode": "centralized", "--set": f"data.only_hospital={json.dumps(h)}"})
                 for h in hospitals]
        at = [name for name, _, _ in table].index("centralized") + 1
        table[at:at] = local
    else:
        log.info("local-only needs data.only_hospital; skipping the local-<hospital> variants")
    return [Variant(name, group, tuple(x for pair in {**BASE, **flags}.items() for x in pair))
            for name, group, flags in table]


def select(available: list[Variant], only: str | None) -> list[Variant]:
    """Variants named in ``only`` (variant or group names, comma separated); all when empty."""
    if not only:
        return available
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.name for v in available} | {v.group for v in available}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        hint = " (local-only needs data.only_hospital)" if unknown[0].startswith("local-") else ""
        raise StudyError(f"--only: unknown variant or group {unknown[0]!r}{hint}; choose from: "
                         f"{', '.join(sorted(known))}")
    return [v for v in available if v.name in wanted or v.group in wanted]


def train_args(variant: Variant, seed: int, preset: Path, data: str | None, extra: Sequence[str],
               hospitals: int) -> list[str]:
    """train.py arguments of one job; the variant's flags and the seed come last so that they win."""
    args = ["--config", str(preset)]
    if data:
        args += ["--data", data]
    return [*args, *extra, "--num-hospitals", str(hospitals), *variant.flags, "--seed", str(seed)]


@functools.lru_cache(maxsize=1)
def _train_cli() -> Any:
    """train.py as a module, for its argument parsing (cheap: training imports are deferred)."""
    spec = importlib.util.spec_from_file_location("_fedsim_train_cli", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.mu": 0.01, ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolved_settings(args: Sequence[str]) -> dict[str, Any]:
    """The settings train.py would run with, as far as they differ from the config defaults.

    Only the differences count, so a setting added to the config later (with a
    default) leaves the hashes, and with them the finished runs, valid.

    Raises:
        ConfigError: When train.py would reject the arguments.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            cfg = _train_cli().parse_args(list(args))
    except SystemExit:
        raise ConfigError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments")
    defaults = _flatten(RunConfig().to_dict())
    settings = {k: v for k, v in _flatten(cfg.to_dict()).items() if defaults.get(k, object()) != v}
    for key in ("out", "train.resume"):  # where a run writes and how it starts do not change its results
        settings.pop(key, None)
    return settings


def settings_key(args: Sequence[str], nproc: int) -> str:
    """Short hash of a run's resolved settings and rank count (the seed is one of the settings)."""
    try:
        settings: Any = resolved_settings(args)
    except ConfigError as err:
        # train.py reports the bad setting when the run starts; the raw arguments still name it.
        log.warning("train.py would reject %s: %s", shlex.join(args), err)
        settings = {"argv": list(args)}
    blob = json.dumps({"nproc": nproc, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def find_folder(root: Path, name: str, seed: int, key: str) -> Path:
    """The run's folder: an existing one with the same hash (finished first), else a new name."""
    found = sorted(root.glob(f"*-s{seed}-{key}"), key=lambda p: (not (p / "final.json").is_file(), p.name))
    return found[0] if found else root / f"{name}-s{seed}-{key}"


def build_plan(chosen: Sequence[Variant], seeds: int, preset: Path, data: str | None,
               extra: Sequence[str], nproc: int, out: Path) -> Plan:
    """Jobs for every chosen variant and seed, with identical settings mapped to one run."""
    runs: dict[str, Run] = {}
    jobs = []
    for variant in chosen:
        for seed in range(seeds):
            args = train_args(variant, seed, preset, data, extra, nproc)
            ranks = 1 if variant.centralized else nproc
            key = settings_key(args, ranks)
            if key not in runs:
                runs[key] = Run(find_folder(out / "runs", variant.name, seed, key), ranks, args)
            runs[key].jobs.append((variant.name, seed))
            jobs.append(Job(variant, seed, runs[key]))
    return Plan(jobs, list(runs.values()), out)


def describe(plan: Plan) -> str:
    """Human-readable plan: each run, its state and the variants it serves."""
    done = sum(run.done for run in plan.runs)
    lines = [f"{len(plan.jobs)} jobs -> {len(plan.runs)} runs ({len(plan.jobs) - len(plan.runs)} shared): "
             f"{done} done, {len(plan.runs) - done} to run; out {plan.out}"]
    for run in plan.runs:
        state = "done" if run.done else "resume" if (run.folder / "checkpoints").is_dir() else "to run"
        served = ", ".join(sorted({name for name, _ in run.jobs}, key=[n for n, _ in run.jobs].index))
        reused = f"  (reused by {len(run.jobs) - 1})" if len(run.jobs) > 1 else ""
        lines.append(f"  {state:<7} {run.folder.name:<28} [{served}]{reused}")
        lines.append(f"          ranks={run.nproc} train.py {shlex.join(run.args)}")
    return "\n".join(lines)


# ---- running -------------------------------------------------------------------------------


def launch(run: Run) -> int:
    """Run train.py under torchrun, its output appended to the run's log.txt; returns the exit code."""
    run.folder.mkdir(parents=True, exist_ok=True)
    cmd = run.command()
    # Append: an earlier, interrupted attempt keeps its log above this one.
    with open(run.folder / "log.txt", "a") as fh:
        fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode


def log_tail(folder: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a run's log.txt."""
    path = folder / "log.txt"
    if not path.is_file():
        return "(no log.txt)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_all(plan: Plan, launcher: Callable[[Run], int] | None = None) -> dict[str, int]:
    """Run every unfinished run in turn; returns {folder name: exit code} of the failed ones."""
    launcher = launcher or launch
    todo = [run for run in plan.runs if not run.done]
    log.info("%d runs, %d already done, %d to run", len(plan.runs), len(plan.runs) - len(todo), len(todo))
    failed: dict[str, int] = {}
    for i, run in enumerate(todo, 1):
        names = ", ".join(sorted({name for name, _ in run.jobs}))
        log.info("[%d/%d] %s (%s) on %d rank(s); log in %s", i, len(todo), run.folder.name, names, run.nproc,
                 run.folder / "log.txt")
        started = time.monotonic()
        code = launcher(run)
        seconds = time.monotonic() - started
        if code == 0 and run.done:
            accuracy = read_final(run.folder).get("accuracy")
            log.info("[%d/%d] %s (%s) done in %.0f s, accuracy %s", i, len(todo), run.folder.name, names,
                     seconds, _fmt(accuracy))
            continue
        failed[run.folder.name] = code
        log.error("[%d/%d] %s (%s) failed with exit code %d after %.0f s%s; last lines of its log:\n%s",
                  i, len(todo), run.folder.name, names, code, seconds,
                  "" if code else " without final.json", log_tail(run.folder))
    return failed


# ---- results -------------------------------------------------------------------------------


def read_final(folder: Path) -> dict[str, Any]:
    """A run's final.json, or {} when the run has not finished."""
    path = folder / "final.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def metric_values(final: dict[str, Any]) -> dict[str, Any]:
    """The study's numbers from one final.json (image level); None where absent."""
    image = final.get("image", {})
    values = {key: image.get(key) for key in ("balanced_accuracy", "macro_f1", "qwk")}
    values["accuracy"] = final.get("accuracy", image.get("accuracy"))
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
        rows.append({"variant": job.variant.name, "group": job.variant.group, "seed": job.seed, "run": name,
                     **metric_values(final), "status": status})
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


def summarize(rows: list[dict[str, Any]], plan: Plan) -> dict[str, dict[str, dict[str, tuple[int, float, float]]]]:
    """{group: {variant: {metric: (n, mean, CI half-width)}}} in table order."""
    table: dict[str, dict[str, dict[str, tuple[int, float, float]]]] = {}
    for job in plan.jobs:
        group = table.setdefault(job.variant.group, {})
        if job.variant.name not in group:
            group[job.variant.name] = {key: mean_ci(list(values_of(rows, job.variant.name, key).values()))
                                       for key, _ in METRICS}
    return table


def compare(rows: list[dict[str, Any]], a: str, b: str, metric: str) -> Paired:
    """Paired t-test of variant a minus variant b over the seeds both finished."""
    va, vb = values_of(rows, a, metric), values_of(rows, b, metric)
    seeds = sorted(set(va) & set(vb))
    return paired_t([va[s] for s in seeds], [vb[s] for s in seeds])


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _fmt_ci(n: int, mean: float, half: float) -> str:
    if n == 0:
        return "n/a"
    return f"{mean:.3f} ± {_fmt(half)}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def render_markdown(rows: list[dict[str, Any]], plan: Plan) -> str:
    """results.md: a table per group, then the paired comparisons."""
    ok = sum(row["status"] == "ok" for row in rows)
    lines = ["# Study results", "",
             f"{ok} of {len(rows)} variant-seed results finished ({len(plan.runs)} distinct runs). "
             "Values: mean over seeds ± half-width of the 95% Student t interval (image level, test split).", ""]
    header = ["variant", "n seeds", *(label for _, label in METRICS)]
    for group, table in summarize(rows, plan).items():
        lines += [f"## {group}", "", _md_row(header), _md_row(["---"] * len(header))]
        for variant, stats in table.items():
            n = max(stat[0] for stat in stats.values())
            lines.append(_md_row([variant, str(n), *(_fmt_ci(*stats[key]) for key, _ in METRICS)]))
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
        for key, label in METRICS:
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


def write_results(plan: Plan, failed: dict[str, int]) -> list[dict[str, Any]]:
    """results.csv, results.md and results.png in the study folder; returns the rows."""
    plan.out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(plan, failed)
    write_csv(plan.out / "results.csv", rows)
    text = render_markdown(rows, plan)
    write_atomic(plan.out / "results.md", text)
    render_png(plan.out / "results.png", summarize(rows, plan))
    return rows


# ---- the chart -----------------------------------------------------------------------------

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
PANEL_HEIGHT = 300
LEGEND_HEIGHT = 36
SLOT = 100  # pixels per variant: four bars and a gap
GREY = (90, 90, 90)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def _axis_low(table: dict[str, dict[str, dict[str, tuple[int, float, float]]]]) -> float:
    """Bottom of the y axis: 0, or lower in steps of 0.25 when a mean is negative (QWK can be).

    Intervals do not move the axis: with two seeds they are wide, and they are clipped instead.
    """
    means = [mean for group in table.values() for stats in group.values() for n, mean, _ in stats.values() if n]
    return max(-1.0, math.floor(min([0.0, *means]) * 4) / 4)


def render_png(path: Path, table: dict[str, dict[str, dict[str, tuple[int, float, float]]]]) -> None:
    """results.png: a panel per group, four metric bars per variant with 95% interval error bars."""
    from PIL import Image, ImageDraw

    font = _font(12)
    width = 80 + SLOT * max([1, *(len(group) for group in table.values())])
    cols = min(2, max(1, len(table)))
    rows = max(1, math.ceil(len(table) / cols))
    legend = _legend(ImageDraw.Draw(Image.new("RGB", (1, 1))), font)  # measure only
    image = Image.new("RGB", (max(width * cols, legend + 10), LEGEND_HEIGHT + PANEL_HEIGHT * rows), "white")
    draw = ImageDraw.Draw(image)
    _legend(draw, font)
    low = _axis_low(table)
    for i, (group, stats) in enumerate(table.items()):
        origin = (width * (i % cols), LEGEND_HEIGHT + PANEL_HEIGHT * (i // cols))
        _panel(draw, font, origin, width, group, stats, low)
    write_with(path, lambda fh: image.save(fh, format="PNG"))


def _legend(draw: Any, font: Any) -> int:
    """Colour key of the metrics; returns its width in pixels."""
    x = 10
    for (_, label), color in zip(METRICS, COLORS):
        draw.rectangle((x, 12, x + 12, 24), fill=color)
        draw.text((x + 16, 11), label, fill="black", font=font)
        x += 32 + int(draw.textlength(label, font=font))
    note = "error bars: 95% t interval over seeds"
    draw.text((x, 11), note, fill=GREY, font=font)
    return x + int(draw.textlength(note, font=font))


def _panel(draw: Any, font: Any, origin: tuple[int, int], width: int, group: str,
           stats: dict[str, dict[str, tuple[int, float, float]]], low: float) -> None:
    """One group: grid, axis, and per variant its bars, name and number of seeds."""
    left, top = origin[0] + 50, origin[1] + 26
    right, bottom = origin[0] + width - 20, origin[1] + PANEL_HEIGHT - 44

    def y(value: float) -> float:
        return bottom - (min(max(value, low), 1.0) - low) / (1.0 - low) * (bottom - top)

    draw.text((left, origin[1] + 6), group, fill="black", font=font)
    for step in range(int(round((1.0 - low) * 4)) + 1):
        tick = low + step * 0.25
        draw.line((left, y(tick), right, y(tick)), fill=(225, 225, 225))
        draw.text((origin[0] + 10, y(tick) - 7), f"{tick:.2f}", fill=GREY, font=font)
    draw.line((left, top, left, bottom), fill="black")
    for j, (variant, metrics) in enumerate(stats.items()):
        x = left + 10 + j * SLOT
        _bars(draw, x, metrics, y, low)
        n = max(stat[0] for stat in metrics.values())
        for k, text in enumerate((variant, f"n={n}")):
            draw.text((x + (SLOT - 20 - draw.textlength(text, font=font)) / 2, bottom + 6 + 15 * k),
                      text, fill="black" if k == 0 else GREY, font=font)


def _bars(draw: Any, x: float, metrics: dict[str, tuple[int, float, float]], y: Callable[[float], float],
          low: float) -> None:
    """Four bars from zero to each metric's mean, with the interval as an error bar."""
    bar = (SLOT - 20) / len(METRICS)
    for k, ((key, _), color) in enumerate(zip(METRICS, COLORS)):
        n, mean, half = metrics[key]
        if n == 0:
            continue
        x0 = x + k * bar
        top, base = sorted((y(mean), y(0.0)))
        draw.rectangle((x0 + 1, top, x0 + bar - 2, base), fill=color)
        if math.isfinite(half):
            mid = x0 + bar / 2
            ends = (mean + half, mean - half)
            draw.line((mid, y(ends[0]), mid, y(ends[1])), fill="black", width=1)
            # A clipped end gets no cap, so that it does not read as the interval's bound.
            for end in ends:
                if low <= end <= 1.0:
                    draw.line((mid - 4, y(end), mid + 4, y(end)), fill="black", width=1)


# ---- command line --------------------------------------------------------------------------


def parse_cli(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The study's own options, and the train.py arguments after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m fedsim.experiments",
                                     description="Run the paper's comparisons over seeds and summarize them.",
                                     epilog="Arguments after -- are passed to every train.py run.")
    parser.add_argument("--preset", default="demo", help="demo, paper, or a TOML preset path (default demo)")
    parser.add_argument("--data", help="dataset for train.py --data (default: embedded synthetic data)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 for every variant (default 3)")
    parser.add_argument("--out", help="study folder (default runs/study-<preset name>)")
    parser.add_argument("--only", help="comma-separated variants or groups (federation, scales, mu, stain)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is done; run nothing")
    parser.add_argument("--nproc", type=int, default=3, help="ranks, i.e. hospitals, of federated runs (default 3)")
    parser.add_argument("--hospitals", help="hospital names for the local-only variants (default H1..H<nproc>)")
    return parser.parse_args(argv), extra


#: train.py flags that the study sets itself (they come last, so the study's values win).
STUDY_FLAGS = {*BASE, "--seed", "--out", "--num-hospitals", "--config"}


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    """Check the options and build the plan.

    Raises:
        StudyError: On a missing, unreadable, non-UTF-8 or malformed preset, a missing data path,
            or counts below one.
    """
    preset = Path(PRESETS.get(args.preset, args.preset)).resolve()
    if not preset.is_file():
        raise StudyError(f"--preset {args.preset}: no such preset or file (presets: {', '.join(PRESETS)})")
    try:  # every run reads it: a preset that is not UTF-8 or not TOML stops the study before any plan
        load_toml(preset)
    except ConfigError as err:
        raise StudyError(f"--preset {args.preset}: {err}") from None
    if args.seeds < 1 or args.nproc < 1:
        raise StudyError("--seeds and --nproc must be at least 1")
    if args.data and not Path(args.data).exists():
        raise StudyError(f"--data {args.data}: no such file or folder")
    overridden = sorted(STUDY_FLAGS & set(extra))
    if overridden:
        log.warning("the study sets %s itself; those train.py arguments are overridden", ", ".join(overridden))
    hospitals = ([h.strip() for h in args.hospitals.split(",") if h.strip()] if args.hospitals
                 else [f"H{i}" for i in range(1, args.nproc + 1)])
    chosen = select(variants(hospitals), args.only)
    out = Path(args.out or Path("runs") / f"study-{preset.stem}").resolve()
    data = str(Path(args.data).resolve()) if args.data else None
    return build_plan(chosen, args.seeds, preset, data, extra, args.nproc, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Plan, run what is not done, write the results; exit code 0, 1 (a run failed) or 2 (bad option)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    args, extra = parse_cli(argv)
    try:
        plan = make_plan(args, extra)
    except StudyError as err:
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(plan))
        return 0
    failed = run_all(plan)
    write_results(plan, failed)
    if failed:
        log.error("%d run(s) failed: %s (see their log.txt)", len(failed), ", ".join(failed))
    log.info("results: %s", ", ".join(str(plan.out / name) for name in ("results.csv", "results.md", "results.png")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
