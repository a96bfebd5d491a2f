"""Studies: the plan, reuse of finished runs, the statistics, the results files, one real tiny study."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from fedsim import experiments as ex
from fedsim.plots import METRIC_COLORS
from fedsim.study import plan as study_plan
from fedsim.study import runner, stats
from fedsim.study.plan import PRESETS, VARIANTS, Plan, Run, settings_key, train_args, variants
from fedsim.study.results import write_results

TINY = [
    "--rounds",
    "1",
    "--local-epochs",
    "1",
    "--backbone",
    "test_resnet",
    "--batch-size",
    "8",
    "--set",
    "data.synthetic.image_size=256",
    "--set",
    "data.synthetic.patients_per_grade=3",
    "--set",
    "data.synthetic.images_per_patient=2",
    "--set",
    "data.context_size=64",
    "--set",
    "data.detail_size=48",
    "--set",
    "data.context_fov=96",
    "--set",
    "data.patches_per_image=2",
    "--set",
    "data.eval_patches_per_image=2",
    "--set",
    "model.hidden=16",
    "--device",
    "cpu",
]
BASE_NAMES = [name for name, _, _ in VARIANTS]


def make_plan(out: Path, *cli: str) -> Plan:
    args, extra = ex.parse_cli(["--out", str(out), *cli])
    return ex.make_plan(args, extra)


def run_of(plan: Plan, variant: str, seed: int = 0) -> Run:
    return next(job.run for job in plan.jobs if job.variant.name == variant and job.seed == seed)


def fake_final(accuracy: float, grade3: float = 0.5, magnifications: dict | None = None) -> dict:
    image = {
        "accuracy": accuracy,
        "balanced_accuracy": accuracy - 0.01,
        "macro_f1": accuracy - 0.02,
        "qwk": accuracy - 0.1,
        "per_class_recall": {"Grade I": 0.9, "Grade II": 0.8, "Grade III": grade3},
        "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "n": 12,
    }
    if magnifications is not None:
        image["per_magnification_accuracy"] = magnifications
    return {
        "accuracy": accuracy,
        "per_hospital_accuracy": {"H1": accuracy},
        "image": image,
        "patch": image,
        "hospitals": {},
    }


def finish(run: Run, final: dict) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "final.json").write_text(json.dumps(final))


# ---- the plan ------------------------------------------------------------------------------


def test_plan_has_every_variant_for_every_seed(tmp_path, monkeypatch):
    # Prepare: pretend train.py can run one hospital alone
    monkeypatch.setattr(study_plan, "supports_local_only", lambda: True)

    # Execute
    plan = make_plan(tmp_path, "--seeds", "2")

    # Assert
    names = {job.variant.name for job in plan.jobs}
    assert names == {*BASE_NAMES, "local-H1", "local-H2", "local-H3"}
    assert len(plan.jobs) == 2 * len(names)
    groups = {job.variant.name: job.variant.group for job in plan.jobs}
    assert groups["fedbn"] == "federation" and groups["local-H2"] == "federation"
    assert groups["detail"] == "scales" and groups["mu-0.1"] == "mu" and groups["none"] == "stain"
    assert groups["reinhard"] == "stain"


def test_identical_settings_share_one_run(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(study_plan, "supports_local_only", lambda: False)

    # Execute
    plan = make_plan(tmp_path, "--seeds", "2")

    # Assert: the baseline serves four variants, FedAvg two; every other setting runs once per seed
    for seed in (0, 1):
        baseline = run_of(plan, "fedprox", seed)
        assert all(run_of(plan, name, seed) is baseline for name in ("dual", "mu-0.01", "macenko"))
        assert run_of(plan, "mu-0", seed) is run_of(plan, "fedavg", seed)
        assert run_of(plan, "fedavg", seed) is not baseline
        assert run_of(plan, "detail", seed) is not baseline and run_of(plan, "none", seed) is not baseline
        assert run_of(plan, "reinhard", seed) is not baseline
    assert run_of(plan, "fedprox", 0) is not run_of(plan, "fedprox", 1)
    assert len(plan.runs) == 2 * 10
    assert len({run.folder for run in plan.runs}) == len(plan.runs)


def test_run_folders_are_named_variant_seed_hash(tmp_path):
    # Execute
    plan = make_plan(tmp_path / "study", "--seeds", "2", "--only", "federation")

    # Assert
    folder = run_of(plan, "fedavg", 1).folder
    assert folder.parent == (tmp_path / "study" / "runs").resolve()
    assert re.fullmatch(r"fedavg-s1-[0-9a-f]{8}", folder.name), folder.name
    central = run_of(plan, "centralized")
    assert central.nproc == 1 and central.args[central.args.index("--num-hospitals") + 1] == "3"
    assert run_of(plan, "fedavg").nproc == 3


def test_key_follows_resolved_settings_not_spelling():
    # Prepare
    variant = variants(["H1"])[0]
    args = train_args(variant, 0, PRESETS["demo"], None, [], 3)
    key = settings_key(args, 3)

    # Execute / Assert: a default spelled out, or 0 as 0.0, is the same run
    assert settings_key([*args, "--set", "model.scales=dual"], 3) == key
    assert settings_key([*args, "--mu", "0.0"], 3) == settings_key([*args, "--mu", "0"], 3)
    # ... while another setting, seed, number of ranks or round count is not
    assert settings_key([*args, "--scales", "detail"], 3) != key
    assert settings_key([*args, "--seed", "1"], 3) != key
    assert settings_key(args, 2) != key
    assert settings_key(["--rounds", "1", *args], 3) != key


def test_extra_arguments_reach_train_py_before_the_study_settings(tmp_path):
    # Execute
    plan = make_plan(tmp_path, "--only", "fedprox", "--seeds", "1", "--", "--rounds", "1", "--mu", "0.5")

    # Assert: the pass-through comes first, so the variant's --mu wins and the seed and --out are the study's
    cmd = plan.runs[0].command()
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    assert cmd[5] == str(REPO / "train.py")
    assert cmd.index("--rounds") < cmd.index("--seed")
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--mu"] == ["0.5", "0.01"]
    assert cmd[-2:] == ["--out", str(plan.runs[0].folder)]
    # ... and a run on one rank starts train.py itself, with the same arguments
    one = dataclasses.replace(plan.runs[0], nproc=1).command()
    assert one == [sys.executable, str(REPO / "train.py"), *cmd[6:]]


def test_local_only_variants_follow_the_config_key(tmp_path, monkeypatch, caplog):
    # Prepare / Execute: without the key
    monkeypatch.setattr(study_plan, "supports_local_only", lambda: False)
    with caplog.at_level("INFO", logger="fedsim"):
        without = [v.name for v in variants(["H1", "H2"])]
    # ... and with it, named hospitals
    monkeypatch.setattr(study_plan, "supports_local_only", lambda: True)
    plan = make_plan(tmp_path, "--only", "federation", "--seeds", "1", "--hospitals", "A,B")

    # Assert
    assert without == BASE_NAMES and "local-only needs data.only_hospital" in caplog.text
    local = run_of(plan, "local-B")
    assert local.nproc == 1 and 'data.only_hospital="B"' in local.args and "centralized" in local.args
    assert {job.variant.name for job in plan.jobs} >= {"local-A", "local-B"}


def test_bad_options_exit_2(tmp_path, capsys):
    # Execute / Assert
    assert ex.main(["--out", str(tmp_path), "--only", "fedavg,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert ex.main(["--out", str(tmp_path), "--preset", str(tmp_path / "missing.toml")]) == 2
    assert ex.main(["--out", str(tmp_path), "--seeds", "0"]) == 2


# ---- reuse ---------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    # Prepare: one of the two runs is finished
    monkeypatch.setattr(runner, "launch", lambda run: pytest.fail("dry run launched a run"))
    plan = make_plan(tmp_path, "--only", "fedprox,dual,fedavg", "--seeds", "1")
    finish(run_of(plan, "fedavg"), fake_final(0.5))

    # Execute
    code = ex.main(["--out", str(tmp_path), "--only", "fedprox,dual,fedavg", "--seeds", "1", "--dry-run"])

    # Assert
    text = capsys.readouterr().out
    assert code == 0 and "3 jobs -> 2 runs (1 shared): 1 done, 1 to run" in text
    assert re.search(r"done\s+" + run_of(plan, "fedavg").folder.name, text)
    assert re.search(r"to run\s+" + run_of(plan, "fedprox").folder.name + r"\s+\[fedprox, dual\]", text)
    assert not (tmp_path / "results.csv").exists()


def test_finished_runs_are_found_by_hash_and_skipped(tmp_path):
    # Prepare: FedAvg finished earlier under the name of a variant with the same settings
    first = make_plan(tmp_path, "--only", "fedavg,fedbn", "--seeds", "1")
    key = run_of(first, "fedavg").folder.name.rsplit("-", 1)[1]
    earlier = tmp_path / "runs" / f"mu-0-s0-{key}"
    earlier.mkdir(parents=True)
    (earlier / "final.json").write_text(json.dumps(fake_final(0.7)))
    launched = []

    def launcher(run: Run) -> int:
        launched.append(run.folder.name)
        finish(run, fake_final(0.6))
        return 0

    # Execute
    plan = make_plan(tmp_path, "--only", "fedavg,fedbn", "--seeds", "1")
    failed = runner.run_all(plan, launcher)

    # Assert
    assert run_of(plan, "fedavg").folder == earlier and run_of(plan, "fedavg").done
    assert failed == {} and launched == [run_of(plan, "fedbn").folder.name]


def test_failed_run_is_reported_and_the_study_goes_on(tmp_path, monkeypatch, caplog):
    # Prepare: FedBN's run fails with exit code 3; the others succeed
    def launcher(run: Run) -> int:
        run.folder.mkdir(parents=True, exist_ok=True)
        if run.folder.name.startswith("fedbn"):
            (run.folder / "log.txt").write_text("starting\nTraceback: boom in round 1\n")
            return 3
        finish(run, fake_final(0.6))
        return 0

    monkeypatch.setattr(runner, "launch", launcher)
    cli = ["--out", str(tmp_path), "--only", "fedbn,fedavg,fedprox", "--seeds", "1"]

    # Execute
    with caplog.at_level("INFO", logger="fedsim"):
        code = ex.main(cli)

    # Assert
    assert code == 1
    assert re.search(r"fedbn-s0-\w+ \(fedbn\) failed with exit code 3", caplog.text)
    assert "boom in round 1" in caplog.text
    rows = {row["variant"]: row for row in csv.DictReader((tmp_path / "results.csv").open())}
    assert rows["fedbn"]["status"] == "failed (exit 3)" and rows["fedbn"]["accuracy"] == ""
    assert rows["fedavg"]["status"] == "ok" and rows["fedprox"]["status"] == "ok"

    # Execute again: only the failed run is retried
    launched = []
    monkeypatch.setattr(runner, "launch", lambda run: launched.append(run.folder.name) or 3)
    assert ex.main(cli) == 1 and len(launched) == 1 and launched[0].startswith("fedbn-s0-")


# ---- statistics ----------------------------------------------------------------------------


def _t_central_mass(t: float, df: int) -> float:
    """P(-|t| <= T <= |t|) for Student's t, by Simpson's rule on its density: independent of scipy."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t) / 2000
    ys = [scale * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(2001)]
    return 2 * h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))


@pytest.mark.parametrize(
    ("values", "level", "table_t"),
    [
        ([0.5, 0.7], 0.95, 12.706),
        ([0.80, 0.83, 0.86], 0.95, 4.303),
        ([i / 10 for i in range(10)], 0.95, 2.262),
        ([i / 31 for i in range(31)], 0.95, 2.042),
        ([0.1, 0.4, 0.2, 0.5, 0.3], 0.90, 2.132),
    ],
)
def test_confidence_interval_matches_t_tables(values, level, table_t):
    # Execute
    n, mean, half = stats.mean_ci(values, level)

    # Assert: half-width = t(level, n-1) * s / sqrt(n), with t from printed tables and from the density
    sd = statistics.stdev(values)
    assert n == len(values) and mean == pytest.approx(sum(values) / len(values))
    assert half == pytest.approx(table_t * sd / math.sqrt(n), rel=2e-4)
    assert _t_central_mass(half * math.sqrt(n) / sd, n - 1) == pytest.approx(level, abs=1e-9)


@pytest.mark.parametrize(("t", "table_p"), [(2.0, 0.0734), (-2.0, 0.0734), (2.228, 0.05), (0.0, 1.0)])
def test_paired_p_value_matches_t_tables(t, table_p):
    # Prepare: differences t + e with e = -5..5, so n = 11, sd = sqrt(11) and the t statistic is t itself
    spread = [float(e) for e in range(-5, 6)]
    a, b = [0.5 + t + e for e in spread], [0.5] * 11

    # Execute
    test = stats.paired_t(a, b)

    # Assert
    assert test.n == 11 and test.diff == pytest.approx(t)
    assert test.p == pytest.approx(table_p, abs=1e-4)
    assert test.p == pytest.approx(1 - _t_central_mass(t, 10), abs=1e-9)
    half = stats.mean_ci(spread)[2]
    assert (test.low, test.high) == pytest.approx((t - half, t + half))


def test_statistics_of_degenerate_samples():
    # Execute / Assert: no spread gives a zero-width interval, and a certain answer of the test
    assert stats.mean_ci([0.7, 0.7, 0.7]) == (3, pytest.approx(0.7), 0.0)
    same = stats.paired_t([0.8, 0.7], [0.8, 0.7])
    assert (same.n, same.diff, same.low, same.high, same.p) == (2, 0.0, 0.0, 0.0, 1.0)
    shifted = stats.paired_t([0.75, 0.5], [0.5, 0.25])
    assert (shifted.diff, shifted.low, shifted.high, shifted.p) == (0.25, 0.25, 0.25, 0.0)
    # ... and fewer than two values leave the interval and the test undefined
    one = stats.paired_t([0.8], [0.7])
    assert one.n == 1 and all(math.isnan(v) for v in (one.low, one.high, one.p))
    none = stats.paired_t([], [])
    assert none.n == 0 and all(math.isnan(v) for v in (none.diff, none.low, none.high, none.p))


def test_confidence_interval_contains_the_mean_and_shrinks_with_seeds():
    # Prepare: the same spread, three seeds and twelve
    few = [0.80, 0.83, 0.86]
    many = few * 4

    # Execute
    n_few, mean_few, half_few = stats.mean_ci(few)
    n_many, mean_many, half_many = stats.mean_ci(many)

    # Assert
    assert (n_few, n_many) == (3, 12)
    assert mean_few == pytest.approx(0.83) and mean_many == pytest.approx(0.83)
    assert half_few == pytest.approx(4.303 * 0.03 / math.sqrt(3), rel=1e-3)
    assert 0 < half_many < half_few
    assert math.isnan(stats.mean_ci([0.8])[2]) and stats.mean_ci([])[0] == 0


def test_paired_t_test():
    # Differences 1..5: mean 3, t = 3 / (sqrt(2.5) / sqrt(5)), df 4
    test = stats.paired_t([1.5, 2.5, 3.5, 4.5, 5.5], [0.5] * 5)
    assert test.n == 5 and test.diff == pytest.approx(3.0)
    assert test.p == pytest.approx(0.01324, abs=1e-5)
    assert test.low == pytest.approx(3 - 2.776 * math.sqrt(0.5), abs=1e-3) and test.high > 3
    assert stats.paired_t([0.8, 0.7], [0.8, 0.7]).p == 1.0
    assert math.isnan(stats.paired_t([0.8], [0.7]).p)


# ---- results files -------------------------------------------------------------------------


def _finish_all(plan: Plan) -> None:
    """Fake final.json per run: centralized ~0.03 below the baseline, detail further below, seed noise."""
    offsets = {"centralized": -0.03, "detail": -0.08, "context": -0.05, "none": -0.04}
    noise = [0.0, 0.013, -0.007]
    for run in plan.runs:
        name, seed = run.jobs[0]
        accuracy = 0.8 + offsets.get(name, 0.0) + noise[seed] * (2 if name in offsets else 1)
        finish(run, fake_final(accuracy, grade3=0.6 + 0.1 * seed, magnifications={"40x": 0.9, "100x": 0.7}))


def test_results_files_from_finished_runs(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(study_plan, "supports_local_only", lambda: False)
    plan = make_plan(tmp_path, "--seeds", "3")
    _finish_all(plan)

    # Execute
    write_results(plan, {})

    # Assert: csv
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == len(plan.jobs) == 3 * len(BASE_NAMES)
    assert {"accuracy_mag_40x", "accuracy_mag_100x", "grade3_recall", "qwk", "macro_f1"} <= set(rows[0])
    dual = [r for r in rows if r["variant"] == "dual"]
    fedprox = [r for r in rows if r["variant"] == "fedprox"]
    assert [r["accuracy"] for r in dual] == [r["accuracy"] for r in fedprox]
    assert float(fedprox[1]["accuracy"]) == pytest.approx(0.813)
    assert float(fedprox[2]["grade3_recall"]) == pytest.approx(0.8)
    assert all(r["status"] == "ok" for r in rows)
    # markdown: a table per group, the paired comparisons with the paired t-test's numbers
    text = (tmp_path / "results.md").read_text()
    for heading in ("## federation", "## scales", "## mu", "## stain"):
        assert heading in text
    _, mean, half = stats.mean_ci([0.8, 0.813, 0.793])
    assert f"| fedprox | 3 | {mean:.3f} ± {half:.3f} |" in text
    test = stats.paired_t([0.8, 0.813, 0.793], [0.77, 0.796, 0.756])
    assert f"| fedprox vs centralized | accuracy | 3 | {test.diff:+.3f} | [{test.low:+.3f}, {test.high:+.3f}] |" in text
    for pair in ("dual vs detail", "dual vs context", "macenko vs none"):
        assert f"| {pair} | QWK | 3 |" in text
    # chart: every metric has bars (far more pixels of its colour than its legend square); no temporary files
    with Image.open(tmp_path / "results.png") as image:
        counts = {colour: count for count, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    shown = METRIC_COLORS[:4]  # accuracy, balanced accuracy, QWK, Grade III recall: no held-out hospital here
    assert all(counts.get(colour, 0) > 13 * 13 * 10 for colour in shown), counts
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_seed_reports_na(tmp_path):
    # Prepare
    plan = make_plan(tmp_path, "--seeds", "1", "--only", "scales")
    _finish_all(plan)

    # Execute
    write_results(plan, {})

    # Assert
    text = (tmp_path / "results.md").read_text()
    assert "| dual | 1 | 0.800 ± n/a |" in text
    assert "| dual vs detail | accuracy | 1 | +0.080 | n/a | n/a |" in text
    assert "fedprox vs centralized" not in text


# ---- one real study ------------------------------------------------------------------------


def _study(out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSIM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "fedsim.experiments",
        "--out",
        str(out),
        "--only",
        "fedavg",
        "--seeds",
        "1",
        "--nproc",
        "2",
        "--",
        *TINY,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_real_study_runs_once_and_is_reused(tmp_path):
    # Execute: a one-variant, one-seed study of two hospitals
    first = _study(tmp_path / "study", tmp_path / "cache")

    # Assert
    assert first.returncode == 0, first.stderr[-4000:]
    (folder,) = (tmp_path / "study" / "runs").iterdir()
    assert folder.name.startswith("fedavg-s0-") and (folder / "final.json").is_file()
    assert "--nproc_per_node=2" in (folder / "log.txt").read_text()
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and 0 <= float(rows[0]["accuracy"]) <= 1
    assert (tmp_path / "study" / "results.md").is_file() and (tmp_path / "study" / "results.png").is_file()
    stamp = (folder / "log.txt").stat().st_mtime_ns

    # Execute again: nothing re-runs
    second = _study(tmp_path / "study", tmp_path / "cache")

    # Assert
    assert second.returncode == 0, second.stderr[-4000:]
    assert "1 already done, 0 to run" in second.stderr
    assert (folder / "log.txt").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "study" / "runs").iterdir()] == [folder.name]
