"""Figures pooled from per-hospital counts equal figures computed from the samples."""

from __future__ import annotations

import numpy as np

from fedsim import evaluation as metrics

NAMES = ["Grade I", "Grade II", "Grade III"]


def _site(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
    mags = rng.choice(["4x", "10x", "20x", "40x"], n)
    patients = [f"s{seed}-p{i // 6}" for i in range(n)]
    return y, pred, mags, patients


def test_single_site_counts_reproduce_summarize():
    # Prepare
    y, pred, mags, patients = _site(1)
    probs = np.eye(3)[pred]

    # Execute
    direct = metrics.summarize(y, probs, NAMES, magnifications=mags, patients=patients, n_boot=200, seed=5)
    counts = metrics.count_summary(y, pred, 3, magnifications=mags, patients=patients, n_boot=200, seed=5)
    pooled = metrics.summary_from_counts(
        counts["confusion_matrix"],
        NAMES,
        per_magnification=counts["per_magnification"],
        per_hospital_accuracy={},
        bootstrap=counts["bootstrap"],
    )

    # Assert: the same numbers, CIs included (same resamples)
    for key in (
        "n",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "qwk",
        "per_class_recall",
        "per_class_precision",
        "per_magnification_accuracy",
        "confusion_matrix",
        "ci95",
    ):
        assert pooled[key] == direct[key], key


def test_two_sites_pool_like_the_concatenated_samples():
    # Prepare
    a, b = _site(1), _site(2, 80)
    counts = [
        metrics.count_summary(y, p, 3, magnifications=m, patients=pt, n_boot=100, seed=s)
        for s, (y, p, m, pt) in enumerate((a, b))
    ]

    # Execute
    pooled = metrics.summary_from_counts(
        sum(np.asarray(c["confusion_matrix"]) for c in counts),
        NAMES,
        per_magnification={
            m: sum(np.asarray(c["per_magnification"][m]) for c in counts) for m in ("4x", "10x", "20x", "40x")
        },
        per_hospital_accuracy={"A": 0.5},
        bootstrap=sum(np.asarray(c["bootstrap"]) for c in counts),
    )

    # Assert: point figures equal those of all samples together; the CI brackets the estimate
    y = np.concatenate([a[0], b[0]])
    p = np.concatenate([a[1], b[1]])
    mags = np.concatenate([a[2], b[2]])
    direct = metrics.summarize(y, np.eye(3)[p], NAMES, magnifications=mags, n_boot=0)
    for key in ("n", "accuracy", "qwk", "per_magnification_accuracy", "confusion_matrix"):
        assert pooled[key] == direct[key], key
    low, high = pooled["ci95"]["accuracy"]
    assert low <= pooled["accuracy"] <= high and high - low > 0
