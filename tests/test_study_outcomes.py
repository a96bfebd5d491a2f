"""The study's image-level statistics (McNemar, equivalence, power), the paired answers of two runs, the
cross-site matrix and the benchmark's outcome section, against values worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsim.study import crosssite, outcomes
from fedsim.study.paired import answers, compare_runs, discordance
from fedsim.study.stats import Discordance, detectable_difference, equivalence, mcnemar

# ---- statistics ---------------------------------------------------------------------------------------------


def test_mcnemar_is_the_exact_binomial_test_of_the_disagreements():
    # b = 8 of 10 disagreements: 2 * P(X >= 8 | n = 10, p = 1/2) = 2 * (45 + 10 + 1) / 1024
    assert mcnemar(Discordance(100, 8, 2)) == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar(Discordance(100, 2, 8)) == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar(Discordance(50, 0, 0)) == 1.0
    assert mcnemar(Discordance(100, 5, 5)) == pytest.approx(1.0)


def test_discordance_difference_and_standard_error():
    d = Discordance(100, 10, 4)
    assert d.difference == pytest.approx(0.06)
    assert d.standard_error == pytest.approx(math.sqrt(14 - 36 / 100) / 100)
    total = d + Discordance(50, 1, 2)
    assert (total.n, total.b, total.c) == (150, 11, 6)
    assert math.isnan(Discordance(0, 0, 0).difference)


def test_equivalence_by_two_one_sided_tests():
    from scipy.stats import norm

    close = Discordance(1000, 20, 22)  # difference -0.002, se = sqrt(42 - 0.004) / 1000
    se = math.sqrt(42 - 4 / 1000) / 1000
    e = equivalence(close, margin=0.03)
    assert e.difference == pytest.approx(-0.002)
    assert e.p == pytest.approx(max(norm.sf((-0.002 + 0.03) / se), norm.sf((0.03 + 0.002) / se)))
    assert e.p < 0.001 and -0.03 < e.low < e.high < 0.03
    far = equivalence(Discordance(100, 10, 4), margin=0.03)  # 0.06 away: not equivalent
    assert far.p > 0.5 and far.high > 0.03


def test_detectable_difference_shrinks_with_images():
    d = Discordance(400, 25, 15)  # 40 disagreements of 400
    expected = (2.5758293035489 + 0.8416212335729) * math.sqrt(40 / 400) / math.sqrt(400)
    assert detectable_difference(d, alpha=0.01, power=0.8) == pytest.approx(expected, rel=1e-9)
    assert detectable_difference(Discordance(1600, 100, 60)) < detectable_difference(d)


# ---- fake finished runs -------------------------------------------------------------------------------------


def _run(folder: Path, answers_by_hospital: dict[str, list[tuple[int, int]]], final: dict, drifts=()) -> Path:
    for hospital, pairs in answers_by_hospital.items():
        rows = ["name,path,patient,label,prediction"]
        rows += [
            f"{hospital}_test_{i:05d}.jpg,/d/{hospital}_{i}.jpg,{hospital}-{i},{y},{p}"
            for i, (y, p) in enumerate(pairs)
        ]
        path = folder / "hospitals" / hospital / "predictions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    (folder / "final.json").write_text(json.dumps(final))
    if drifts:
        clients = [{"hospital": f"H{i + 1}", "drift": d, "num_samples": 100 * (3 - i)} for i, d in enumerate(drifts)]
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 0, "clients": clients}) + "\n")
    return folder


def test_answers_pair_the_same_images_of_two_runs(tmp_path):
    a = _run(tmp_path / "a", {"H1": [(0, 0), (1, 1), (2, 0)], "HOLDOUT": [(0, 0)]}, {})
    b = _run(tmp_path / "b", {"H1": [(0, 1), (1, 1), (2, 2)], "HOLDOUT": [(0, 1)]}, {})
    first, second = answers(a, ["H1"]), answers(b, ["H1"])
    assert first == {
        ("H1", "H1_test_00000.jpg"): True,
        ("H1", "H1_test_00001.jpg"): True,
        ("H1", "H1_test_00002.jpg"): False,
    }
    d = discordance(first, second)
    assert (d.n, d.b, d.c) == (3, 1, 1)
    c = compare_runs({0: a, 1: a}, {0: b, 1: b}, "a", "b", "held-out", ["HOLDOUT"])
    assert (c.total.n, c.total.b, c.total.c) == (2, 2, 0) and sorted(c.per_seed) == [0, 1]


def test_cross_site_matrix_means_over_seeds(tmp_path):
    finals = {
        "fedprox": {
            0: {"per_hospital_accuracy": {"H1": 0.8, "H2": 0.6}, "heldout_accuracy": 0.5},
            1: {"per_hospital_accuracy": {"H1": 0.6, "H2": 0.8}, "heldout_accuracy": 0.7},
        },
        "local-H1": {0: {"per_hospital_accuracy": {"H1": 0.9, "H2": 0.3}, "heldout_accuracy": None}},
    }
    models, columns, matrix = crosssite.write_cross_site(tmp_path, finals)
    assert models == ["fedprox", "local-H1"] and columns == ["H1", "H2", "held out"]
    assert matrix[0] == pytest.approx([0.7, 0.7, 0.6]) and matrix[1][:2] == pytest.approx([0.9, 0.3])
    assert math.isnan(matrix[1][2])
    lines = (tmp_path / "cross_site.csv").read_text().splitlines()
    assert lines[0] == "model,seed,H1,H2,held out" and "fedprox,mean,0.7000,0.7000,0.6000" in lines
    assert "local-H1,0,0.9000,0.3000," in lines and (tmp_path / "cross_site.png").stat().st_size > 0


def test_outcome_section_states_each_expectation_and_its_test(tmp_path):
    right, wrong = (0, 0), (0, 1)
    test = {h: [right] * 40 for h in ("H1", "H2", "H3")}
    half = {h: [right] * 20 + [wrong] * 20 for h in ("H1", "H2", "H3")}
    folders, finals = {}, {}

    def add(variant, answers_by_hospital, accuracy, heldout=None, drifts=()):
        final = {"accuracy": accuracy, "heldout_accuracy": heldout, "per_hospital_accuracy": {}}
        folder = _run(tmp_path / variant, answers_by_hospital, final, drifts)
        folders[variant], finals[variant] = {0: folder}, {0: final}

    add("dual", test, 0.9)
    add("context", half, 0.5)
    add("fedprox", test, 0.9, drifts=(1.0, 1.0, 1.0))
    add("centralized", test, 0.9)
    add("mu-0", test, 0.9, drifts=(3.0, 3.0, 3.0))
    add("mu-0.01", test, 0.9, drifts=(2.0, 2.0, 2.0))
    add("macenko", {"HOLDOUT": [right] * 30}, 0.9, heldout=1.0)
    add("none", {"HOLDOUT": [wrong] * 30}, 0.9, heldout=0.0)
    add("local-H3", half, 0.5)
    add("local-H1", test, 0.9)
    colour = {0: {"pooled": 0.34, "H1": 0.36, "H2": 0.33, "H3": 0.31}}
    text = "\n".join(outcomes.outcome_lines(folders, finals, ["H1", "H2", "H3"], ["HOLDOUT"], 0.923, colour))
    assert "Expected: dual near the ceiling (0.923)" in text
    assert "- colour control: 0.340 (1 seed); highest single hospital 0.360" in text
    # dual right on all 120 images, context on 60: b = 60, c = 0
    assert (
        "dual vs context on test images: difference +0.500 over 120 paired answers" in text
        and "significant at 0.01" in text
    )
    assert "macenko vs none on held-out images: difference +1.000 over 30 paired answers" in text
    assert "monotonic decrease of the mean drift with mu: yes" in text
    assert "equivalence shown" in text  # identical answers: difference 0 with no spread
    assert (
        "smallest hospital: H3 (100 training tiles); lowest local-only accuracy: local-H3 (0.500): as expected" in text
    )


def test_a_benchmark_study_runs_two_at_a_time_and_writes_its_outcomes(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "study"
    env = {**os.environ, "FEDSIM_CACHE": str(tmp_path / "cache")}
    only = "fedprox,context,macenko,none"
    cmd = [sys.executable, "-m", "fedsim.experiments", "--preset", "benchmark-demo", "--seeds", "1"]
    cmd += ["--only", only, "--out", str(out), "--", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "benchmark demo seed 0 ready" in proc.stderr  # rendered once, before the runs
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["variant"] for r in rows} == {"fedprox", "macenko", "context", "none"}
    assert all(r["status"] == "ok" and 0 <= float(r["heldout_accuracy"]) <= 1 for r in rows)
    text = (out / "results.md").read_text()
    assert "## Expected outcomes" in text and "held-out accuracy" in text
    assert "- colour control: " in text and "macenko vs none on held-out images" in text
    assert (out / "cross_site.csv").read_text().splitlines()[0] == "model,seed,H1,H2,H3,held out"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 3  # fedprox = macenko: one run
