"""The embedded benchmark's expected outcomes, each stated before its result, with its test and its power.

The benchmark is built so that each of the paper's questions has a known answer (:mod:`data.benchmark`):
if an outcome does not come out, the simulator's machinery is suspect, not the question. Comparisons of two
models are paired on the same test images (McNemar's exact test over every seed's disagreements,
:mod:`fedsim.study.paired`); federated against centralized is an equivalence test with a stated margin
(two one-sided tests). Each comparison also states the smallest accuracy difference its images detect with
80% power at alpha = 0.01, given how often the two models disagreed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from fedsim.study.paired import Comparison, compare_runs
from fedsim.study.stats import detectable_difference, equivalence, mean_ci

#: Significance level the outcomes are judged at.
ALPHA = 0.01
#: Equivalence margin of federated vs centralized accuracy (two one-sided tests at 5% each).
MARGIN = 0.03
#: Bounds the design promises: a single stream reads one component (at most 5/9 plus noise), colour nothing.
SINGLE_BOUND, COLOUR_BOUND = 0.60, 0.40

Folders = dict[str, dict[int, Path]]  # variant -> seed -> run folder (finished runs only)


def _ci(values: list[float]) -> str:
    n, mean, half = mean_ci(values)
    if n == 0:
        return "n/a"
    return f"{mean:.3f} ± {half:.3f} ({n} seeds)" if n > 1 else f"{mean:.3f} (1 seed)"


def _accuracies(finals: dict[int, dict], key: str = "accuracy") -> list[float]:
    return [float(f[key]) for f in finals.values() if isinstance(f.get(key), (int, float))]


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def comparison_line(c: Comparison) -> str:
    """One markdown line: the accuracy difference, McNemar's p over every seed, the detectable difference."""
    total = c.total
    if not total.n:
        return f"- {c.a} vs {c.b} ({c.scope}): no paired answers"
    verdict = "significant" if c.p < ALPHA else "not significant"
    seeds = ", ".join(f"s{seed} {_p(c.seed_p(seed))}" for seed in sorted(c.per_seed))
    return (
        f"- {c.a} vs {c.b} on {c.scope} images: difference {total.difference:+.3f} over {total.n} paired answers "
        f"(right only for {c.a}: {total.b}, only for {c.b}: {total.c}); McNemar p {_p(c.p)}, {verdict} at "
        f"{ALPHA}; per seed {seeds}; detectable with 80% power: {detectable_difference(total, ALPHA):.3f}"
    )


def mean_drift(folder: Path) -> float | None:
    """Mean client drift ||w_k - w_g|| over every round and trained client of a run (metrics.jsonl)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    drifts = []
    for line in path.read_text().splitlines():
        if line.strip():
            drifts += [c["drift"] for c in json.loads(line)["clients"] if isinstance(c.get("drift"), (int, float))]
    return statistics.fmean(drifts) if drifts else None


def outcome_lines(
    folders: Folders,
    finals: dict[str, dict[int, dict]],
    hospitals: list[str],
    heldout: list[str],
    ceiling: float,
    colour: dict[int, dict[str, float]],
) -> list[str]:
    """The "Expected outcomes" section of results.md, for the variants the study ran."""

    def compare(a: str, b: str, scope: str = "test") -> Comparison | None:
        if a not in folders or b not in folders:
            return None
        names = heldout if scope == "held-out" else hospitals
        return compare_runs(folders[a], folders[b], a, b, scope, names)

    lines = ["## Expected outcomes", ""]
    # 1. scales and the colour control
    lines += [
        "### 1. Both scales are needed; colour is not enough",
        "",
        f"Expected: dual near the ceiling ({ceiling:.3f}); context only and detail only at most "
        f"{SINGLE_BOUND:.2f}; the colour-statistics control at most {COLOUR_BOUND:.2f}.",
        "",
    ]
    for variant in ("dual", "context", "detail"):
        if variant in finals:
            lines.append(f"- {variant}: accuracy {_ci(_accuracies(finals[variant]))}")
    if colour:
        pooled = [c["pooled"] for c in colour.values()]
        worst = max(v for c in colour.values() for k, v in c.items() if k != "pooled")
        lines.append(f"- colour control: {_ci(pooled)}; highest single hospital {worst:.3f}")
    lines += [comparison_line(c) for c in (compare("dual", "context"), compare("dual", "detail")) if c]
    # 2. stain normalization on the unseen stain
    lines += [
        "",
        "### 2. Stain normalization helps on an unseen stain",
        "",
        "Expected: Macenko or Reinhard above no normalization on the held-out hospital, by a significant margin; "
        "if normalization hurts, normalization is broken.",
        "",
    ]
    for variant in ("macenko", "reinhard", "none"):
        if variant in finals:
            lines.append(f"- {variant}: held-out accuracy {_ci(_accuracies(finals[variant], 'heldout_accuracy'))}")
    lines += [
        comparison_line(c)
        for c in (compare("macenko", "none", "held-out"), compare("reinhard", "none", "held-out"))
        if c
    ]
    # 3. FedBN under site shift
    lines += [
        "",
        "### 3. FedBN under site shift",
        "",
        "Expected: FedBN at least FedAvg on the hospitals' own test images (the benchmark's hospitals differ in "
        "stain, dye gains, blur and JPEG quality). The no-shift arm is not part of this study.",
        "",
    ]
    for variant in ("fedbn", "fedavg"):
        if variant in finals:
            lines.append(f"- {variant}: accuracy {_ci(_accuracies(finals[variant]))}")
    lines += [comparison_line(c) for c in (compare("fedbn", "fedavg"),) if c]
    # 4. FedProx's mechanism
    lines += [
        "",
        "### 4. FedProx reins in client drift",
        "",
        "Expected: the mean client drift falls monotonically as mu grows; any accuracy effect is reported, "
        "not targeted.",
        "",
    ]
    mus = sorted((float(v.split("-", 1)[1]), v) for v in folders if v.startswith("mu-"))
    means = []
    for mu, variant in mus:
        drifts = [d for d in (mean_drift(f) for f in folders[variant].values()) if d is not None]
        means.append(statistics.fmean(drifts) if drifts else math.nan)
        lines.append(f"- mu {mu:g}: mean drift {_ci(drifts)}; accuracy {_ci(_accuracies(finals[variant]))}")
    if len(means) > 1:
        falling = all(a > b for a, b in zip(means, means[1:]))
        lines.append(f"- monotonic decrease of the mean drift with mu: {'yes' if falling else 'no'}")
    # 5. FL vs centralized, local-only
    lines += [
        "",
        "### 5. Federated against centralized and local-only",
        "",
        f"Expected: FedProx within ±{MARGIN:.2f} of centralized at equal compute (two one-sided tests); each "
        "local-only model below FedProx, worst at the smallest hospital.",
        "",
    ]
    fl_vs_central = compare("fedprox", "centralized")
    if fl_vs_central and fl_vs_central.total.n:
        e = equivalence(fl_vs_central.total, MARGIN)
        shown = "shown" if e.p < 0.05 else "not shown"
        lines.append(
            f"- fedprox vs centralized: difference {e.difference:+.3f}, 90% interval [{e.low:+.3f}, {e.high:+.3f}] "
            f"against the margin ±{MARGIN:.2f}: equivalence {shown} (TOST p {_p(e.p)}; "
            f"{fl_vs_central.total.n} paired answers)"
        )
    local = sorted(v for v in folders if v.startswith("local-"))
    for variant in local:
        c = compare(variant, "fedprox")
        if c:
            lines.append(comparison_line(c))
    sizes = training_sizes(folders.get("fedprox", {}))
    scored = {v: statistics.fmean(_accuracies(finals[v])) for v in local if _accuracies(finals[v])}
    if sizes and scored:
        smallest = min(sizes, key=sizes.get)
        worst = min(scored, key=scored.get)
        same = worst == f"local-{smallest}"
        lines.append(
            f"- smallest hospital: {smallest} ({sizes[smallest]} training tiles); lowest local-only accuracy: "
            f"{worst} ({scored[worst]:.3f}): {'as expected' if same else 'not the smallest hospital'}"
        )
    return lines + [""]


def training_sizes(folders: dict[int, Path]) -> dict[str, int]:
    """Each hospital's training samples, from the first round of a federated run's metrics.jsonl."""
    for folder in folders.values():
        path = folder / "metrics.jsonl"
        if path.is_file() and path.read_text().strip():
            first = json.loads(path.read_text().splitlines()[0])
            return {c["hospital"]: int(c["num_samples"]) for c in first["clients"]}
    return {}


def benchmark_context(folders: Folders) -> dict[str, Any] | None:
    """For a study on the embedded benchmark: its hospitals, held-out hospitals and ceiling, and the colour
    control of every seed's rendered data (pooled and per hospital, on the test tiles); None otherwise."""
    configs = {seed: folder / "config.json" for runs in folders.values() for seed, folder in runs.items()}
    configs = {seed: path for seed, path in configs.items() if path.is_file()}
    if not configs:
        return None
    from fedsim.config import from_dict

    trees = {seed: from_dict(json.loads(path.read_text())) for seed, path in sorted(configs.items())}
    if any(cfg.data.source != "benchmark" or cfg.data.path for cfg in trees.values()):
        return None
    from data.benchmark import HELDOUT, ceiling
    from fedsim.sources import benchmark_root, benchmark_spec

    colour = {}
    for seed, cfg in trees.items():
        spec = benchmark_spec(cfg)
        colour[seed] = colour_control_accuracy(benchmark_root(cfg, spec), spec)
    spec = benchmark_spec(next(iter(trees.values())))
    return {
        "hospitals": list(spec.hospital_names),
        "heldout": [HELDOUT],
        "ceiling": ceiling(spec.noise),
        "colour": colour,
    }


def colour_control_accuracy(root: Path, spec) -> dict[str, float]:
    """The colour-statistics logistic regression fitted on the training tiles, scored on the test tiles of the
    training hospitals: pooled and per hospital."""
    import numpy as np

    from data.benchmark.controls import colour_control, control_data

    data = control_data(root, spec)
    _, predicted = colour_control(data, "grade")
    test = (data.split == "test") & np.isin(data.hospital, list(spec.hospital_names))
    out = {"pooled": float(np.mean(predicted[test] == data.grade[test]))}
    for name in spec.hospital_names:
        rows = test & (data.hospital == name)
        out[name] = float(np.mean(predicted[rows] == data.grade[rows]))
    return out
