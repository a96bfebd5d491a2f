"""The embedded benchmark (data.benchmark): known answers, by construction and as rendered.

One module-scoped demo-size dataset (3 hospitals + HOLDOUT, 90 test tiles
each) carries the measured checks; the grade-rule and independence checks
use tile plans only (no images), and a tiny spec rendered three times checks
determinism and the fixed test split.

Statistical tolerances (binomial, normal approximation, one-sided 1 % unless
said otherwise): a classifier at chance (1/3) exceeds ``1/3 + 2.33 *
sqrt(2/9 / n)`` on ``n`` tiles with probability 1 %; that is 0.391 for the
pooled 360 test tiles (so "<= 0.40" is a meaningful bound there) and 0.449 for
one hospital's 90, where the test asserts the larger of 0.40 and that bound.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from data.benchmark import controls as C
from data.benchmark.__main__ import main
from data.benchmark.dataset import MANIFEST_COLUMNS, read_manifest_rows, render_dataset
from data.benchmark.design import HELDOUT, SINGLE_COMPONENT_BOUND, ceiling, centre_box, grade_of, preset
from data.benchmark.hospitals import plan, profiles
from data.datasets import load_records
from data.images import load_rgb
from data.records import GRADE_NAMES
from data.splits import partition, resolve_partition, split_by_patient

REPO = Path(__file__).resolve().parents[1]
#: The measured dataset: label-skewed training tiles (alpha = 2), balanced test tiles.
SPEC = preset("demo", train=60, val=3, test=90, heldout=90)
TINY = preset("demo", train=6, val=3, test=9, heldout=9)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmark") / "demo"
    render_dataset(SPEC, root)
    return root


@pytest.fixture(scope="module")
def data(rendered) -> C.ControlData:
    return C.control_data(rendered, SPEC)


# ------------------------------------------------------------------ by construction


def test_grade_rule_and_single_component_bound():
    a, n = np.meshgrid(range(3), range(3))
    grades = grade_of(a.ravel(), n.ravel())
    assert Counter(grades.tolist()) == {0: 3, 1: 3, 2: 3}
    for levels in (a.ravel(), n.ravel()):
        assert C.accuracy(C.single_component_oracle(levels), grades) == pytest.approx(5 / 9)
    assert 0.90 <= ceiling() <= 0.95


def test_components_independent_and_noise_as_documented():
    tiles = [t for t in plan(preset("demo", train=3000, alpha=0)) if t.split == "train"]
    table = np.zeros((3, 3))
    for t in tiles:
        table[t.arch, t.nuclear] += 1
    assert chi2_contingency(table).pvalue > 0.01  # independence not rejected at the 1 % level
    assert table.sum(axis=1).min() > 0.3 * len(tiles)  # about uniform (each level near 1/3)
    moved = np.mean([t.arch_shown != t.arch for t in tiles] + [t.nuclear_shown != t.nuclear for t in tiles])
    assert abs(moved - SPEC.noise) < 2.58 * np.sqrt(SPEC.noise * (1 - SPEC.noise) / (2 * len(tiles)))


def test_label_skew_follows_alpha_and_test_stays_balanced():
    skewed = plan(preset("study", alpha=0.5))
    mixes = {h: Counter(t.grade for t in skewed if t.hospital == h and t.split == "train") for h in ("H1", "H2", "H3")}
    assert (
        len({max(m, key=m.get) for m in mixes.values()}) > 1
        or max(max(m.values()) / sum(m.values()) for m in mixes.values()) > 0.5
    )
    sizes = [sum(m.values()) for m in mixes.values()]
    assert sizes == [900, 540, 360]  # 50/30/20 % of 3 x 600
    for h in ("H1", "H2", "H3", HELDOUT):
        counts = Counter(t.grade for t in skewed if t.hospital == h and t.split == "test")
        assert sum(counts.values()) == 400 and max(counts.values()) - min(counts.values()) <= 3


def test_confound_gives_the_darkest_site_more_grade_iii():
    spec = preset("study", alpha=0, confound=True)
    sites = profiles(spec)
    dark = max(spec.hospital_names, key=lambda h: sites[h].h_gain)
    assert sites[dark].grade_mix[2] > 0.5
    assert all(sites[h].grade_mix == pytest.approx((1 / 3,) * 3) for h in spec.hospital_names if h != dark)


# ------------------------------------------------------------------ as rendered


def test_manifest_columns_and_heldout_only_in_test(rendered):
    rows = read_manifest_rows(rendered)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    held = [r for r in rows if r["hospital"] == HELDOUT]
    assert len(held) == SPEC.heldout and {r["split"] for r in held} == {"test"}
    assert all(int(r["label"]) == grade_of(int(r["arch_level"]), int(r["nuclear_level"])) for r in rows)


def test_test_grades_balanced(rendered):
    rows = read_manifest_rows(rendered)
    for h in (*SPEC.hospital_names, HELDOUT):
        counts = Counter(r["label"] for r in rows if r["hospital"] == h and r["split"] == "test")
        assert counts == {"0": 30, "1": 30, "2": 30}


def test_manifest_read_by_the_training_loader(rendered):
    """As fedsim.datasetup.plan_data does: load, split (the manifest's is kept), partition (natural)."""
    records, report, names = load_records(rendered, GRADE_NAMES, None)
    assert report.total == 0 and names == GRADE_NAMES
    records = split_by_patient(records, [0.7, 0.15, 0.15], 0)
    method = resolve_partition(records, "auto")
    assert method == "natural"
    # HOLDOUT counts as a hospital of the federation until data.heldout_hospitals exists.
    records = partition(records, SPEC.hospitals + 1, method)
    rows = {r["path"]: r for r in read_manifest_rows(rendered)}
    assert len(records) == len(rows)
    for record in records:
        row = rows[record.name]
        assert (record.label, record.split, record.hospital, record.patient, record.magnification) == (
            int(row["label"]),
            row["split"],
            row["hospital"],
            row["patient"],
            "20x",
        )


def test_no_context_window_needs_padding(rendered):
    low, high = centre_box(SPEC)
    fov, size = SPEC.context_fov, SPEC.tile_size
    assert low - fov // 2 == 0 and high - fov // 2 + fov - 1 == size - 1
    spec = C.patch_spec(SPEC)
    rng = np.random.default_rng(0)
    for row in read_manifest_rows(rendered)[::25]:
        rgb = load_rgb(rendered / row["path"])
        assert rgb.shape == (size, size, 3)
        centres = np.concatenate([C.centres_in_box(SPEC, 3, rng), [[low, low], [high, high]]])
        contexts, details = C.extract_pairs(rgb, centres, spec)
        for (r, c), context, detail in zip(centres, contexts, details):
            window = rgb[r - fov // 2 : r - fov // 2 + fov, c - fov // 2 : c - fov // 2 + fov]
            assert window.shape[:2] == (fov, fov)  # inside the tile: reflect padding never reached
            assert np.array_equal(C.extract_pairs(window, np.array([[fov // 2, fov // 2]]), spec)[0][0], context)
            d = SPEC.detail
            assert np.array_equal(detail, rgb[r - d // 2 : r - d // 2 + d, c - d // 2 : c - d // 2 + d])


def test_colour_control_near_chance_pooled_and_per_hospital(data):
    _, predicted = C.colour_control(data, "grade")
    test = data.split == "test"
    assert test.sum() == 360 and C.chance_upper(360) < 0.40
    assert C.accuracy(predicted[test], data.grade[test]) <= 0.40
    for h in (*SPEC.hospital_names, HELDOUT):
        rows = test & (data.hospital == h)
        assert C.accuracy(predicted[rows], data.grade[rows]) <= max(0.40, C.chance_upper(int(rows.sum())))


def test_site_identity_still_decodable_from_colour(data):
    _, predicted = C.colour_control(data, "hospital")
    rows = (data.split == "test") & (data.hospital != HELDOUT)
    assert C.accuracy(predicted[rows], data.hospital[rows]) >= 0.8  # chance is 1/3


def test_oracle_reaches_the_ceiling_and_one_component_does_not(data):
    test = data.split == "test"
    n = int(test.sum())
    assert C.accuracy(C.oracle_grades(data.arch[test], data.nuclear[test]), data.grade[test]) == 1.0
    top = ceiling(SPEC.noise)
    oracle = C.accuracy(C.oracle_grades(data.arch_shown[test], data.nuclear_shown[test]), data.grade[test])
    assert abs(oracle - top) <= C.binomial_halfwidth(top, n, 2.58)  # two-sided 1 %
    bound = SINGLE_COMPONENT_BOUND + C.binomial_halfwidth(SINGLE_COMPONENT_BOUND, n, 2.33)
    for levels in (data.arch_shown[test], data.nuclear_shown[test]):
        assert C.accuracy(C.single_component_oracle(levels), data.grade[test]) <= bound


# ------------------------------------------------------------------ determinism and seeds


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_fixed_test_split(tmp_path):
    first = _files(render_dataset(TINY, tmp_path / "a", workers=1).parent)
    again = _files(render_dataset(TINY, tmp_path / "b", workers=2).parent)  # a pool of two: the same bytes
    assert first == again
    other = _files(render_dataset(TINY.with_(seed=1), tmp_path / "c").parent)
    tests = [k for k in first if "_test_" in k]
    trains = [k for k in first if "_train_" in k]
    assert tests and all(other.get(k) == first[k] for k in tests)
    assert sum(other.get(k) != first[k] for k in trains) > len(trains) // 2

    def test_rows(files):
        return [line for line in files["manifest.csv"].decode().splitlines() if ",test," in line]

    assert test_rows(first) == test_rows(other)
    assert not list(tmp_path.glob(".*partial*"))


# ------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "nope", "--out", "X"],
        ["--preset", "demo", "--seed", "-1", "--out", "X"],
        ["--preset", "demo", "--seed", "abc", "--out", "X"],
        ["--preset", "demo"],
        ["--preset", "demo", "--alpha", "-2", "--out", "X"],
        ["--preset", "demo", "--workers", "0", "--out", "X"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "data.benchmark", "--preset", "demo", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not empty" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_renders_the_demo_with_plain_progress_lines(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--preset", "demo", "--seed", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "H1 train:" in err and "\r" not in err  # not a terminal: one line per stage, no bar
    assert (out / "manifest.csv").is_file() and (out / "examples.png").is_file() and (out / "benchmark.json").is_file()
