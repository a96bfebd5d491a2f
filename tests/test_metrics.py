"""Tests for fedsim.evaluation's metrics, checked against values worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.evaluation import (
    accuracy,
    aggregate_image_probs,
    balanced_accuracy,
    bootstrap_ci,
    confusion_matrix,
    macro_f1,
    per_class_precision,
    per_class_recall,
    quadratic_weighted_kappa,
    summarize,
)
from fedsim.evaluation.report import format_report

NAMES = ["Grade I", "Grade II", "Grade III"]

# The worked example used throughout (rows = true, cols = predicted):
#             I   II  III | row sum
#   I         5    2    1 |   8
#   II        1    6    1 |   8
#   III       0    2    4 |   6
#   col sum   6   10    6 |  22
WORKED_CM = np.array([[5, 2, 1], [1, 6, 1], [0, 2, 4]])


def _labels_from_cm(cm: np.ndarray) -> tuple[list[int], list[int]]:
    """Expand a confusion matrix back into (y_true, y_pred) label lists."""
    y_true, y_pred = [], []
    for i, j in np.ndindex(*cm.shape):
        y_true += [i] * int(cm[i, j])
        y_pred += [j] * int(cm[i, j])
    return y_true, y_pred


def _one_hot(labels: list[int], k: int = 3) -> np.ndarray:
    """Probabilities whose argmax is ``labels``."""
    probs = np.full((len(labels), k), 0.1)
    probs[np.arange(len(labels)), labels] = 0.8
    return probs


# --------------------------------------------------------------------------- #
# Confusion matrix
# --------------------------------------------------------------------------- #
def test_confusion_matrix_counts_pairs() -> None:
    # Prepare: pairs (0,0) (0,1) (1,1) (2,0) (2,0)
    y_true = [0, 0, 1, 2, 2]
    y_pred = np.array([0, 1, 1, 0, 0])

    # Execute
    cm = confusion_matrix(y_true, y_pred, 3)

    # Assert
    expected = np.array([[1, 1, 0], [0, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_confusion_matrix_round_trips_worked_example() -> None:
    # Prepare
    y_true, y_pred = _labels_from_cm(WORKED_CM)

    # Execute
    cm = confusion_matrix(y_true, y_pred, 3)

    # Assert
    np.testing.assert_array_equal(cm, WORKED_CM)


@pytest.mark.parametrize(
    "y_true, y_pred, num_classes, match",
    [
        ([0, 3], [0, 1], 3, "outside"),
        ([0, 1], [0, -1], 3, "outside"),
        ([0, 1], [0], 3, "length"),
        ([0, 0.5], [0, 0], 3, "whole-number"),
        ([[0, 1]], [[0, 1]], 3, "1-D"),
        (["a"], ["a"], 3, "integer"),
        ([0], [0], 0, "num_classes"),
    ],
)
def test_confusion_matrix_rejects_bad_input(y_true, y_pred, num_classes, match) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        confusion_matrix(y_true, y_pred, num_classes)


def test_metrics_reject_non_square_or_negative_matrix() -> None:
    # Prepare
    bad = [np.zeros((2, 3)), np.array([[1, -1], [0, 1]])]

    # Execute / Assert
    for cm in bad:
        with pytest.raises(ValueError, match="confusion matrix"):
            accuracy(cm)


# --------------------------------------------------------------------------- #
# Point metrics on the worked example
# --------------------------------------------------------------------------- #
def test_worked_example_accuracy_and_balanced_accuracy() -> None:
    # Execute
    acc = accuracy(WORKED_CM)
    bal = balanced_accuracy(WORKED_CM)

    # Assert
    # accuracy = (5 + 6 + 4) / 22 = 15/22
    assert acc == pytest.approx(15 / 22)
    # recalls 5/8, 6/8, 4/6 = 15/24 + 18/24 + 16/24 = 49/24; mean = 49/72
    assert bal == pytest.approx(49 / 72)


def test_worked_example_recall_and_precision() -> None:
    # Execute
    recall = per_class_recall(WORKED_CM)
    precision = per_class_precision(WORKED_CM)

    # Assert
    # recall = diagonal / row sums = 5/8, 6/8, 4/6
    np.testing.assert_allclose(recall, [5 / 8, 6 / 8, 4 / 6])
    # precision = diagonal / column sums = 5/6, 6/10, 4/6
    np.testing.assert_allclose(precision, [5 / 6, 6 / 10, 4 / 6])


def test_worked_example_macro_f1() -> None:
    # Execute
    f1 = macro_f1(WORKED_CM)

    # Assert
    # F1 = 2PR/(P+R):
    #   I:   P=5/6, R=5/8  -> 2*(25/48)/(35/24) = 5/7
    #   II:  P=3/5, R=3/4  -> 2*(9/20)/(27/20)  = 2/3
    #   III: P=2/3, R=2/3  -> 2/3
    # mean = (15/21 + 14/21 + 14/21) / 3 = 43/63
    assert f1 == pytest.approx(43 / 63)


def test_worked_example_quadratic_weighted_kappa() -> None:
    # Execute
    kappa = quadratic_weighted_kappa(WORKED_CM)

    # Assert
    # Weights (i-j)^2 = [[0,1,4],[1,0,1],[4,1,0]].
    # Observed weighted disagreement (counts): 2*1 + 1*4 + 1*1 + 1*1 + 0*4 + 2*1 = 10.
    # Expected (counts) = sum w_ij * row_i * col_j / n with rows (8,8,6), cols (6,10,6):
    #   i=I:   1*8*10 + 4*8*6  = 80 + 192 = 272
    #   i=II:  1*8*6  + 1*8*6  = 48 + 48  =  96
    #   i=III: 4*6*6  + 1*6*10 = 144 + 60 = 204
    #   total 572, / 22.
    # kappa = 1 - 10 / (572/22) = 1 - 220/572 = 1 - 5/13 = 8/13
    assert kappa == pytest.approx(8 / 13)


def test_qwk_perfect_agreement_is_one() -> None:
    # Prepare
    y = [0, 1, 2, 2, 1, 0, 0]

    # Execute
    kappa = quadratic_weighted_kappa(confusion_matrix(y, y, 3))

    # Assert
    assert kappa == pytest.approx(1.0)


def test_qwk_penalises_distant_grade_confusion_more() -> None:
    # Prepare: three of each grade, all right except the first Grade I,
    # predicted Grade II in one case and Grade III in the other.
    y_true = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    near = [1, 0, 0, 1, 1, 1, 2, 2, 2]
    far = [2, 0, 0, 1, 1, 1, 2, 2, 2]

    # Execute
    cm_near, cm_far = confusion_matrix(y_true, near, 3), confusion_matrix(y_true, far, 3)

    # Assert
    # Same plain accuracy: 8/9 both.
    assert accuracy(cm_near) == accuracy(cm_far) == pytest.approx(8 / 9)
    # near: observed 1; rows (3,3,3), cols (2,4,3); expected
    #   (1*3*4 + 4*3*3 + 1*3*2 + 1*3*3 + 4*3*2 + 1*3*4) / 9 = 99/9 = 11 -> 1 - 1/11 = 10/11
    # far:  observed 4; cols (2,3,4); expected
    #   (1*3*3 + 4*3*4 + 1*3*2 + 1*3*4 + 4*3*2 + 1*3*3) / 9 = 108/9 = 12 -> 1 - 4/12 = 2/3
    assert quadratic_weighted_kappa(cm_near) == pytest.approx(10 / 11)
    assert quadratic_weighted_kappa(cm_far) == pytest.approx(2 / 3)


def test_qwk_degenerate_and_chance_cases() -> None:
    # Prepare
    one_class = confusion_matrix([1, 1, 1], [1, 1, 1], 3)
    # All true Grade I, predictions I and II: observed 1; rows (2,0,0), cols (1,1,0);
    # expected = 1*2*1 / 2 = 1 -> kappa = 1 - 1/1 = 0.
    constant_truth = confusion_matrix([0, 0], [0, 1], 3)

    # Execute / Assert
    # Expected disagreement is 0 only when everything is one class: defined as 1.0.
    assert quadratic_weighted_kappa(one_class) == 1.0
    assert quadratic_weighted_kappa(constant_truth) == pytest.approx(0.0)
    assert math.isnan(quadratic_weighted_kappa(np.zeros((3, 3))))


def test_class_never_predicted() -> None:
    # Prepare: Grade III is never predicted.
    #   cm = [[2,0,0],[0,2,0],[0,2,0]], rows (2,2,2), cols (2,4,0)
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 1]

    # Execute
    cm = confusion_matrix(y_true, y_pred, 3)

    # Assert
    # precision: 2/2, 2/4, 0/0 -> 0.0 by convention
    np.testing.assert_allclose(per_class_precision(cm), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(per_class_recall(cm), [1.0, 1.0, 0.0])
    # F1 = 2TP/(2TP+FP+FN): 4/4, 4/6, 0/2 -> mean (1 + 2/3 + 0)/3 = 5/9
    assert macro_f1(cm) == pytest.approx(5 / 9)
    assert balanced_accuracy(cm) == pytest.approx(2 / 3)
    # QWK: observed 1*2 = 2; expected (1*2*4 + 1*2*2 + 4*2*2 + 1*2*4)/6 = 36/6 = 6
    # -> 1 - 2/6 = 2/3
    assert quadratic_weighted_kappa(cm) == pytest.approx(2 / 3)


def test_class_absent_from_truth() -> None:
    # Prepare: Grade III never occurs but is predicted once.
    #   cm = [[1,0,1],[0,2,0],[0,0,0]]
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]

    # Execute
    cm = confusion_matrix(y_true, y_pred, 3)
    recall = per_class_recall(cm)

    # Assert
    np.testing.assert_allclose(recall[:2], [0.5, 1.0])
    assert math.isnan(recall[2])
    # balanced accuracy ignores the absent class: (0.5 + 1) / 2
    assert balanced_accuracy(cm) == pytest.approx(0.75)
    # F1: I 2/(2+1) = 2/3, II 4/4 = 1, III 0/(0+1) = 0 (predicted, so it counts)
    assert macro_f1(cm) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_macro_f1_skips_classes_neither_present_nor_predicted() -> None:
    # Prepare: only classes 0 and 1 appear, each F1 = 1.
    cm = confusion_matrix([0, 1], [0, 1], 3)

    # Execute / Assert: a mean over all three classes would give 2/3.
    assert macro_f1(cm) == pytest.approx(1.0)


def test_agrees_with_scikit_learn_when_available() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    # Prepare
    rng = np.random.default_rng(3)
    for _ in range(20):
        y_true = rng.integers(0, 3, 40)
        y_pred = np.where(rng.random(40) < 0.6, y_true, rng.integers(0, 3, 40))

        # Execute
        cm = confusion_matrix(y_true, y_pred, 3)

        # Assert
        assert accuracy(cm) == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
        assert macro_f1(cm) == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
        expected_kappa = skm.cohen_kappa_score(y_true, y_pred, weights="quadratic")
        assert quadratic_weighted_kappa(cm) == pytest.approx(expected_kappa)
        expected_precision = skm.precision_score(y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=0)
        np.testing.assert_allclose(per_class_precision(cm), expected_precision)


# --------------------------------------------------------------------------- #
# Image-level aggregation
# --------------------------------------------------------------------------- #
def test_aggregate_image_probs_means_in_first_seen_order() -> None:
    # Prepare: image "b" has patches 0 and 2, "a" has 1 and 3, "c" has 4.
    patch_probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.2, 0.2, 0.6],
            [0.2, 0.5, 0.3],
            [0.0, 0.4, 0.6],
            [0.1, 0.1, 0.8],
        ]
    )
    image_ids = ["b", "a", "b", "a", "c"]

    # Execute
    image_probs, ids = aggregate_image_probs(patch_probs, image_ids)

    # Assert
    assert ids == ["b", "a", "c"]
    expected = [
        [0.4, 0.4, 0.2],  # b: (0.6+0.2)/2, (0.3+0.5)/2, (0.1+0.3)/2
        [0.1, 0.3, 0.6],  # a: (0.2+0.0)/2, (0.2+0.4)/2, (0.6+0.6)/2
        [0.1, 0.1, 0.8],  # c: single patch
    ]
    np.testing.assert_allclose(image_probs, expected)


def test_aggregate_image_probs_can_flip_the_patch_majority() -> None:
    # Prepare: two weak Grade I patches vs one confident Grade III patch.
    # Majority vote would say Grade I; mean probability says Grade III:
    # mean = ((0.4+0.4+0.0)/3, (0.3+0.3+0.0)/3, (0.3+0.3+1.0)/3) = (0.267, 0.2, 0.533)
    patch_probs = [[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.0, 0.0, 1.0]]

    # Execute
    image_probs, ids = aggregate_image_probs(patch_probs, [7, 7, 7])

    # Assert
    assert ids == [7]
    assert int(np.argmax(image_probs[0])) == 2
    np.testing.assert_allclose(image_probs[0], [0.8 / 3, 0.6 / 3, 1.6 / 3])


def test_aggregate_image_probs_validates_shapes() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="2-D"):
        aggregate_image_probs(np.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        aggregate_image_probs(np.zeros((3, 3)), [1, 2])


# --------------------------------------------------------------------------- #
# Bootstrap
# --------------------------------------------------------------------------- #
def _synthetic_patients(n_patients: int, per_patient: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of patients whose own accuracy varies (0.5 to 0.9), so patients matter."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per_patient)
    y_true = np.repeat(rng.integers(0, 3, n_patients), per_patient)
    patient_acc = np.repeat(rng.uniform(0.5, 0.9, n_patients), per_patient)
    wrong = (y_true + rng.integers(1, 3, y_true.size)) % 3
    y_pred = np.where(rng.random(y_true.size) < patient_acc, y_true, wrong)
    return y_true, y_pred, groups


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_patients() -> None:
    # Prepare
    small = _synthetic_patients(30, 10, seed=1)
    large = _synthetic_patients(300, 10, seed=1)

    # Execute
    lo_s, hi_s = bootstrap_ci(*small, metric=accuracy, num_classes=3)
    lo_l, hi_l = bootstrap_ci(*large, metric=accuracy, num_classes=3)

    # Assert
    assert lo_s <= accuracy(confusion_matrix(small[0], small[1], 3)) <= hi_s
    assert lo_l <= accuracy(confusion_matrix(large[0], large[1], 3)) <= hi_l
    # Width scales like 1/sqrt(n_patients): 10x patients -> about 1/3.2 the width.
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)


def test_bootstrap_resamples_groups_not_samples() -> None:
    # Prepare: patient A (50 samples) all right, patient B (50 samples) all wrong.
    y_true = [0] * 100
    y_pred = [0] * 50 + [1] * 50
    groups = ["A"] * 50 + ["B"] * 50
    seen: list[float] = []

    def recording_accuracy(cm: np.ndarray) -> float:
        seen.append(accuracy(cm))
        return seen[-1]

    # Execute
    lo, hi = bootstrap_ci(y_true, y_pred, groups, recording_accuracy, 2, n_boot=400, seed=0)

    # Assert
    # Drawing 2 patients gives AA (1.0), AB/BA (0.5) or BB (0.0), each AA/BB with
    # probability 1/4, so the 95% interval runs from 0 to 1. Resampling the 100
    # samples independently would give roughly 0.5 +- 0.1 instead.
    assert set(seen) <= {0.0, 0.5, 1.0}
    assert {0.0, 1.0} <= set(seen)
    assert (lo, hi) == (0.0, 1.0)


def test_bootstrap_is_reproducible_and_seed_dependent() -> None:
    # Prepare
    data = _synthetic_patients(40, 5, seed=2)

    # Execute
    first = bootstrap_ci(*data, metric=balanced_accuracy, num_classes=3, n_boot=200, seed=7)
    again = bootstrap_ci(*data, metric=balanced_accuracy, num_classes=3, n_boot=200, seed=7)
    other = bootstrap_ci(*data, metric=balanced_accuracy, num_classes=3, n_boot=200, seed=8)

    # Assert
    assert first == again
    assert first != other


def test_bootstrap_level_controls_width() -> None:
    # Prepare
    data = _synthetic_patients(50, 5, seed=4)

    # Execute
    lo80, hi80 = bootstrap_ci(*data, metric=accuracy, num_classes=3, level=0.80)
    lo99, hi99 = bootstrap_ci(*data, metric=accuracy, num_classes=3, level=0.99)

    # Assert
    assert lo99 < lo80 < hi80 < hi99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"level": 1.0}, "level"),
        ({"level": 0.0}, "level"),
        ({"n_boot": 0}, "n_boot"),
        ({"groups": [0, 1]}, "length"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, match) -> None:
    # Prepare
    args = {"y_true": [0, 1, 2], "y_pred": [0, 1, 1], "groups": [0, 0, 1], "metric": accuracy, "num_classes": 3}
    args.update(kwargs)

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**args)


# --------------------------------------------------------------------------- #
# summarize / format_report
# --------------------------------------------------------------------------- #
SUMMARY_KEYS = {
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
}


def test_summarize_worked_example() -> None:
    # Prepare: the worked example, with the first 11 samples at 10x and the rest at 40x.
    y_true, y_pred = _labels_from_cm(WORKED_CM)
    mags = [10] * 11 + [40] * 11
    hospitals = ["H1"] * 22
    patients = [i // 2 for i in range(22)]

    # Execute
    probs = _one_hot(y_pred)
    s = summarize(y_true, probs, NAMES, magnifications=mags, hospitals=hospitals, patients=patients, n_boot=300)

    # Assert
    assert set(s) == SUMMARY_KEYS
    assert s["n"] == 22
    assert s["accuracy"] == pytest.approx(15 / 22)
    assert s["balanced_accuracy"] == pytest.approx(49 / 72)
    assert s["macro_f1"] == pytest.approx(43 / 63)
    assert s["qwk"] == pytest.approx(8 / 13)
    assert s["per_class_recall"] == pytest.approx({"Grade I": 5 / 8, "Grade II": 6 / 8, "Grade III": 4 / 6})
    assert s["per_class_precision"] == pytest.approx({"Grade I": 5 / 6, "Grade II": 6 / 10, "Grade III": 4 / 6})
    assert s["confusion_matrix"] == WORKED_CM.tolist()
    # First 11 samples (in _labels_from_cm order): I->I x5, I->II x2, I->III x1,
    # II->I x1, II->II x2  -> 7 correct of 11. The other 11: 8 correct.
    assert s["per_magnification_accuracy"] == pytest.approx({"10": 7 / 11, "40": 8 / 11})
    assert s["per_hospital_accuracy"] == pytest.approx({"H1": 15 / 22})
    for key in ("accuracy", "balanced_accuracy", "qwk"):
        lo, hi = s["ci95"][key]
        assert lo <= s[key] <= hi


def test_summarize_is_strict_json_with_undefined_values() -> None:
    # Prepare: Grade III absent from y_true (recall NaN) and never predicted.
    y_true = [0, 0, 1, 1]
    y_pred = [0, 1, 1, 1]

    # Execute
    s = summarize(y_true, _one_hot(y_pred), NAMES, n_boot=50)
    text = json.dumps(s, allow_nan=False)

    # Assert
    assert set(s) == SUMMARY_KEYS
    assert s["per_class_recall"]["Grade III"] is None
    assert s["per_class_precision"]["Grade III"] == 0.0
    assert s["per_magnification_accuracy"] == {} and s["per_hospital_accuracy"] == {}
    assert json.loads(text) == s
    # every CI is a pair of plain floats
    assert all(isinstance(v, float) for pair in s["ci95"].values() for v in pair)


def test_summarize_without_bootstrap_and_with_numpy_keys() -> None:
    # Prepare: numpy magnification keys must still serialise.
    y_true = np.array([0, 1, 2, 2])
    mags = np.array([20, 20, 5, 5])

    # Execute
    s = summarize(y_true, _one_hot([0, 1, 2, 1]), NAMES, magnifications=mags, n_boot=0)

    # Assert
    json.dumps(s, allow_nan=False)
    # sorted numerically (5 before 20), not as strings
    assert list(s["per_magnification_accuracy"]) == ["5", "20"]
    assert s["per_magnification_accuracy"] == pytest.approx({"5": 0.5, "20": 1.0})
    assert s["ci95"] == {"accuracy": [None, None], "balanced_accuracy": [None, None], "qwk": [None, None]}


@pytest.mark.parametrize(
    "probs_shape, extra, match",
    [
        ((4, 2), {}, "shape"),
        ((3, 3), {}, "shape"),
        ((4, 3), {"patients": [1, 2]}, "length"),
        ((4, 3), {"hospitals": ["a"]}, "length"),
    ],
)
def test_summarize_rejects_inconsistent_input(probs_shape, extra, match) -> None:
    # Prepare
    y_true = [0, 1, 2, 0]

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        summarize(y_true, np.ones(probs_shape), NAMES, n_boot=10, **extra)


def test_format_report_shows_metrics_and_classes() -> None:
    # Prepare
    y_true, y_pred = _labels_from_cm(WORKED_CM)
    s = summarize(y_true, _one_hot(y_pred), NAMES, hospitals=["H1"] * 11 + ["H2"] * 11, n_boot=100)
    s = json.loads(json.dumps(s))  # the report must also work after a JSON round trip
    s["per_class_recall"]["Grade III"] = None  # and with undefined values

    # Execute
    report = format_report(s, title="test split")

    # Assert
    lines = report.splitlines()
    assert lines[0] == "test split"
    assert "n = 22" in report
    assert f"{15 / 22:.4f}" in report  # accuracy
    assert f"{8 / 13:.4f}" in report  # QWK
    assert "95% CI" in report
    assert all(name in report for name in NAMES + ["H1", "H2"])
    assert "n/a" in report
    # confusion matrix row for Grade II: 1 6 1
    assert any(line.split()[-3:] == ["1", "6", "1"] for line in lines if "Grade II" in line)


def test_evaluation_re_exports_its_modules_and_loads_no_torch() -> None:
    # fedsim.evaluation's names are the objects its modules define, and reports are readable without torch.
    import fedsim.evaluation
    import fedsim.evaluation.bootstrap
    import fedsim.evaluation.report
    import fedsim.evaluation.schema
    import fedsim.evaluation.scores
    import fedsim.evaluation.summaries

    evaluation = fedsim.evaluation
    modules = (evaluation.scores, evaluation.bootstrap, evaluation.summaries)
    assert {n for m in modules for n in m.__all__} <= set(evaluation.__all__)
    for name in evaluation.__all__:
        assert getattr(evaluation, name) is getattr(sys.modules[evaluation._EXPORTS[name]], name)
    root = Path(__file__).resolve().parent.parent
    light = ("fedsim.evaluation", "fedsim.evaluation.summaries", "fedsim.evaluation.report", "fedsim.evaluation.schema")
    for module in light:  # a fresh interpreter: this one has torch loaded by conftest
        code = f"import sys, {module}; print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", module
