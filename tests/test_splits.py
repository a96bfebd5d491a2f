"""Tests of patient-level splits and hospital partitions (data/splits.py, data/partition.py, data/cohort.py)."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from data.cohort import apportion, hospital_names, patient_grades
from data.discovery import load_records
from data.partition import partition, resolve_partition
from data.records import GRADE_NAMES, MAGNIFICATIONS, SPLITS, ImageRecord
from data.splits import count_table, missing_splits, read_splits_csv, split_by_patient, write_splits_csv


def _cohort(patients_per_grade: int = 20, seed: int = 1) -> list[ImageRecord]:
    """Records of a CRC-HGD-like cohort: 5-12 images per patient, mixed magnifications."""
    rng = random.Random(seed)
    records = []
    for grade in range(len(GRADE_NAMES)):
        for k in range(patients_per_grade):
            patient = f"G{grade}P{k:02d}"
            for i in range(rng.randint(5, 12)):
                records.append(
                    ImageRecord(f"/data/{grade}/{patient}_{i}.jpg", grade, rng.choice(MAGNIFICATIONS), patient)
                )
    return records


def _patients_by(records: list[ImageRecord], field: str) -> dict[str, set[str]]:
    """Patients per value of a record field (split or hospital)."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        out[getattr(r, field)].add(r.patient)
    return out


def _assert_patients_whole(records: list[ImageRecord], field: str) -> None:
    """No patient has images under two values of ``field``."""
    values = defaultdict(set)
    for r in records:
        values[r.patient].add(getattr(r, field))
    assert all(len(v) == 1 for v in values.values()), field


# --- splits -----------------------------------------------------------------------


def test_split_keeps_patients_whole_and_stratifies() -> None:
    records = _cohort()
    out = split_by_patient(records, seed=3)
    assert len(out) == len(records) and {r.split for r in out} == set(SPLITS)
    _assert_patients_whole(out, "split")
    grades = patient_grades(out)
    for split, patients in _patients_by(out, "split").items():
        per_grade = Counter(grades[p] for p in patients)
        expected = {"train": 14, "val": 3, "test": 3}[split]
        assert per_grade == {0: expected, 1: expected, 2: expected}, split


def test_split_gives_every_split_each_grade_from_three_patients() -> None:
    records = [r for r in _cohort(3) if not (r.label == 2 and r.patient > "G2P01")]
    out = split_by_patient(records, fractions=(0.9, 0.05, 0.05))
    grades = patient_grades(out)
    by_split = _patients_by(out, "split")
    assert sorted(by_split) == sorted(SPLITS)
    for split, patients in by_split.items():
        assert {grades[p] for p in patients} - {2} == {0, 1}, split
    grade2 = {r.split for r in out if r.label == 2}
    assert grade2 == {"train"}  # two patients: too few to spread


def test_split_deterministic_and_order_independent() -> None:
    records = _cohort()
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    first = split_by_patient(records, seed=7)
    assert split_by_patient(shuffled, seed=7) == first
    assert split_by_patient(records, seed=8) != first


def test_split_patient_grade_is_majority() -> None:
    records = [ImageRecord(f"/x/{i}.jpg", label, patient="P") for i, label in enumerate([2, 0, 2, 1])]
    records += [ImageRecord("/x/q0.jpg", 1, patient="Q"), ImageRecord("/x/q1.jpg", 0, patient="Q")]
    assert patient_grades(records) == {"P": 2, "Q": 0}  # ties go to the lower grade


def test_split_respects_given_column(caplog: pytest.LogCaptureFixture) -> None:
    records = [r.with_(split=SPLITS[int(r.patient[-1]) % 3]) for r in _cohort(4)]
    assert split_by_patient(records, seed=11) == sorted(records, key=lambda r: r.path)
    partly = records[:5] + [r.with_(split="") for r in records[5:]]
    with pytest.raises(ValueError, match=f"5 of {len(records)} records already have a split"):
        split_by_patient(partly)
    with pytest.raises(ValueError, match="unknown split values"):
        split_by_patient([r.with_(split="holdout") for r in records])
    leaky = [r.with_(split="test" if r.path.endswith("_0.jpg") else "train") for r in records]
    with caplog.at_level(logging.WARNING, logger="data.splits"):
        split_by_patient(leaky)
    assert "more than one split" in caplog.text


def test_split_falls_back_without_patients(caplog: pytest.LogCaptureFixture) -> None:
    records = [r.with_(patient="") for r in _cohort(4)]
    with caplog.at_level(logging.WARNING, logger="data.cohort"):
        out = split_by_patient(records)
    assert "treated as its own patient" in caplog.text
    assert len({r.patient for r in out}) == len(records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.cohort"):
        out = split_by_patient(records, patient_regex=r"(G\dP\d+)_")
    assert "own patient" not in caplog.text
    assert len({r.patient for r in out}) == 12
    _assert_patients_whole(out, "split")


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="3 values"):
        split_by_patient(_cohort(3), fractions=(0.8, 0.2))
    with pytest.raises(ValueError, match="positive train share"):
        split_by_patient(_cohort(3), fractions=(0.0, 0.5, 0.5))
    for bad in ((float("nan"), 0.15, 0.15), (0.7, float("inf"), 0.15)):
        with pytest.raises(ValueError, match="finite"):
            split_by_patient(_cohort(3), fractions=bad)


def test_missing_splits_names_the_empty_splits() -> None:
    # Prepare
    records = _cohort(4)
    given = [r.with_(split="train" if r.patient < "G1" else "test") for r in records]

    # Execute / Assert: a split setting or a given column that leaves splits empty, found before any work
    assert missing_splits(split_by_patient(records, seed=1)) == []
    assert missing_splits(split_by_patient(records, fractions=(0.8, 0.2, 0.0))) == ["test"]
    assert missing_splits(split_by_patient(records, fractions=(1.0, 0.0, 0.0))) == ["val", "test"]
    assert missing_splits(split_by_patient(given)) == ["val"]
    assert missing_splits(_cohort(1)) == list(SPLITS)  # not split yet
    assert missing_splits(split_by_patient(_cohort(1))) == ["val", "test"]  # one patient per grade
    assert missing_splits([]) == list(SPLITS)
    # and a split without validation images still partitions
    no_val = partition(split_by_patient(_cohort(), fractions=(0.8, 0.0, 0.2)), 3, "iid")
    assert missing_splits(no_val) == ["val"] and hospital_names(no_val) == ["H1", "H2", "H3"]


def test_apportion_sums_and_rounds() -> None:
    assert apportion(10, [0.7, 0.15, 0.15]) == [7, 2, 1]
    assert apportion(7, [1, 1, 1]) == [3, 2, 2]
    assert sum(apportion(13, [0.33, 0.2, 0.47])) == 13


# --- partitions -------------------------------------------------------------------


def _split_cohort(patients_per_grade: int = 20) -> list[ImageRecord]:
    return split_by_patient(_cohort(patients_per_grade), seed=0)


def test_partition_natural_keeps_hospitals() -> None:
    names = ["Hospital 10", "Hospital 2", "Hospital 1"]
    records = [r.with_(hospital=names[int(r.patient[-1]) % 3]) for r in _split_cohort(4)]
    out = partition(records, 3, "natural")
    assert out == sorted(records, key=lambda r: r.path)
    assert hospital_names(out) == ["Hospital 1", "Hospital 2", "Hospital 10"]


def test_partition_natural_errors() -> None:
    records = _split_cohort(4)
    with pytest.raises(ValueError, match=f"{len(records)} of {len(records)} have none"):
        partition(records, 2, "natural")
    named = [r.with_(hospital="A" if r.label else "B") for r in records]
    with pytest.raises(ValueError, match="found 2 hospitals .*num_hospitals is 3"):
        partition(named, 3, "natural")
    with pytest.raises(ValueError, match="unknown partition method"):
        partition(named, 2, "by-grade")


def _image_tree(root: Path, patients_per_grade: int = 8) -> None:
    """A CRC-HGD-style folder without hospitals: two images per patient, ids in the file names."""
    folders = ("CRC_Grade__1__Well_Diff", "CRC_Grade__2__Mod_Diff", "CRC_Grade__3__Poorly_Diff")
    for grade, folder in enumerate(folders):
        for k in range(patients_per_grade):
            for i in range(2):
                path = root / folder / "20x" / f"p{grade}{k:02d}_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"not decoded here")


def test_partition_auto_without_hospitals_is_stratified_iid(tmp_path: Path) -> None:
    # Prepare: a folder tree, which has no hospital column
    _image_tree(tmp_path)
    records, _, _ = load_records(tmp_path, patient_regex=r"^(p\d+)_", verify=False)
    records = split_by_patient(records, seed=0)

    # Execute
    out = partition(records, 4, "auto", seed=2)

    # Assert: iid hospitals H1..H4, balanced in every split and grade, fixed by the seed
    assert resolve_partition(records, "auto") == "iid"
    assert out == partition(records, 4, "iid", seed=2)
    assert hospital_names(out) == ["H1", "H2", "H3", "H4"]
    _assert_patients_whole(out, "hospital")
    grades = patient_grades(out)
    for split in SPLITS:
        for grade in range(3):
            patients = {r.patient for r in out if r.split == split and grades[r.patient] == grade}
            per_hospital = Counter(h for p, h in {(r.patient, r.hospital) for r in out} if p in patients)
            counts = [per_hospital[h] for h in hospital_names(out)]
            assert max(counts) - min(counts) <= 1, (split, grade)
    totals = [len(p) for p in _patients_by(out, "hospital").values()]
    assert max(totals) - min(totals) <= 1
    assert partition(list(reversed(records)), 4, "auto", seed=2) == out
    assert partition(records, 4, "auto", seed=3) != out


def test_partition_auto_with_hospital_column_is_natural(tmp_path: Path) -> None:
    # Prepare: a manifest with a hospital column
    lines = ["path,label,patient,hospital"]
    for k in range(12):
        (tmp_path / f"img{k}.jpg").write_bytes(b"not decoded here")
        lines.append(f"img{k}.jpg,{k % 3},P{k // 2},Site {'ABC'[k // 4]}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    records, _, _ = load_records(tmp_path, verify=False)
    records = split_by_patient(records, fractions=(0.5, 0.25, 0.25))

    # Execute
    out = partition(records, 3, "auto", seed=2)

    # Assert: the hospitals of the data, untouched
    assert resolve_partition(records, "auto") == "natural"
    assert out == partition(records, 3, "natural") == sorted(records, key=lambda r: r.path)
    assert hospital_names(out) == ["Site A", "Site B", "Site C"]
    with pytest.raises(ValueError, match="found 3 hospitals .*num_hospitals is 2; partition = auto"):
        partition(records, 2, "auto")


def test_resolve_partition() -> None:
    # Prepare
    records = _split_cohort(4)
    named = [r.with_(hospital="A" if r.label else "B") for r in records]
    partly = named[:5] + records[5:]

    # Execute / Assert
    assert [resolve_partition(records, m) for m in ("auto", "natural", "iid", "dirichlet")] == [
        "iid",
        "natural",
        "iid",
        "dirichlet",
    ]
    assert resolve_partition(named, "auto") == "natural"
    with pytest.raises(
        ValueError, match=f"partition = auto: {len(records) - 5} of {len(records)} records have no hospital"
    ):
        resolve_partition(partly, "auto")
    with pytest.raises(ValueError, match="unknown partition method 'by-grade'"):
        resolve_partition(records, "by-grade")
    with pytest.raises(ValueError, match="natural partition needs a hospital on every record"):
        partition(records, 2, "natural")  # explicit natural keeps its message


def test_partition_iid_is_balanced() -> None:
    out = partition(_split_cohort(), 4, "iid", seed=2)
    assert hospital_names(out) == ["H1", "H2", "H3", "H4"]
    _assert_patients_whole(out, "hospital")
    grades = patient_grades(out)
    splits = {r.patient: r.split for r in out}
    for split in SPLITS:
        for grade in range(3):
            per_hospital = Counter(
                r.hospital
                for r in out
                if r.patient in grades
                and grades[r.patient] == grade
                and splits[r.patient] == split
                and r.path.endswith("_0.jpg")
            )
            assert max(per_hospital.values()) - min(per_hospital.values()) <= 1
            assert len(per_hospital) == 4 or sum(per_hospital.values()) < 4
    totals = [len(p) for p in _patients_by(out, "hospital").values()]
    assert max(totals) - min(totals) <= 1


def _label_skew(records: list[ImageRecord]) -> float:
    """Mean share of each hospital's training patients that its commonest grade has."""
    grades = patient_grades(records)
    shares = []
    for _hospital, patients in _patients_by([r for r in records if r.split == "train"], "hospital").items():
        counts = Counter(grades[p] for p in patients)
        shares.append(max(counts.values()) / len(patients))
    return sum(shares) / len(shares)


def test_partition_dirichlet_skews_labels() -> None:
    records = _split_cohort(30)
    skewed = partition(records, 4, "dirichlet", alpha=0.1, seed=4)
    flat = partition(records, 4, "dirichlet", alpha=1000.0, seed=4)
    iid = partition(records, 4, "iid", seed=4)
    assert _label_skew(skewed) > 0.7
    assert _label_skew(flat) < 0.5 and _label_skew(iid) < 0.5
    for out in (skewed, flat):
        _assert_patients_whole(out, "hospital")
        trained = _patients_by([r for r in out if r.split == "train"], "hospital")
        assert sorted(trained) == ["H1", "H2", "H3", "H4"]


def test_partition_dirichlet_fills_every_hospital(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="data.partition"):
        out = partition(_split_cohort(8), 8, "dirichlet", alpha=0.01, seed=0)
    assert "moving some" in caplog.text  # three grades cannot fill eight hospitals by chance
    trained = _patients_by([r for r in out if r.split == "train"], "hospital")
    assert hospital_names(out) == [f"H{i}" for i in range(1, 9)]
    assert all(trained[f"H{i}"] for i in range(1, 9))
    _assert_patients_whole(out, "hospital")


def test_partition_deterministic_and_order_independent() -> None:
    records = _split_cohort()
    shuffled = records[:]
    random.Random(9).shuffle(shuffled)
    for method in ("iid", "dirichlet"):
        first = partition(records, 3, method, alpha=0.3, seed=5)
        assert partition(shuffled, 3, method, alpha=0.3, seed=5) == first, method
        assert partition(records, 3, method, alpha=0.3, seed=6) != first, method


def test_partition_needs_enough_training_patients() -> None:
    records = _split_cohort(2)  # six training patients
    with pytest.raises(ValueError, match="7 hospitals need as many training patients; there are 6"):
        partition(records, 7, "iid")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(records, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="num_hospitals must be >= 1"):
        partition(records, 0, "iid")


def test_hospital_names_natural_sort() -> None:
    records = [ImageRecord(f"/{h}.jpg", 0, hospital=h) for h in ("H10", "H2", "H1", "", "h3")]
    assert hospital_names(records) == ["H1", "H2", "h3", "H10"]


# --- table and files --------------------------------------------------------------


def test_count_table_lists_hospitals_grades_and_magnifications() -> None:
    records = partition(_split_cohort(6), 10, "iid")  # 12 training patients
    table = count_table(records, GRADE_NAMES)
    lines = table.splitlines()
    assert all(name in lines[0] for name in (*GRADE_NAMES, "4x", "40x", "images", "patients"))
    first_column = [line.split()[0] for line in lines[2:]]
    assert first_column.index("H2") < first_column.index("H10")
    total = lines[-1].split()
    assert total[0] == "all" and int(total[-2]) == len(records) and int(total[-1]) == 18
    grade_totals = [int(v) for v in total[1:4]]
    assert grade_totals == [sum(r.label == g for r in records) for g in range(3)]


def test_splits_csv_round_trip(tmp_path: Path) -> None:
    records = partition(_split_cohort(3), 2, "iid")
    path = tmp_path / "out" / "splits.csv"
    write_splits_csv(records, path, GRADE_NAMES)
    back, names = read_splits_csv(path)
    assert back == sorted(records, key=lambda r: r.path) and names == GRADE_NAMES
    header = path.read_text().splitlines()[0]
    assert header == "path,label,class_name,magnification,patient,hospital,split"
    before = path.read_bytes()
    with pytest.raises(ValueError, match="label 2 .* has no class name"):
        write_splits_csv(records, path, GRADE_NAMES[:2])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["splits.csv"]


def test_write_splits_csv_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = partition(_split_cohort(3), 2, "iid")
    path = tmp_path / "splits.csv"
    path.write_text("previous run\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("data.files.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_splits_csv(records, path, GRADE_NAMES)
    assert path.read_text() == "previous run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["splits.csv"]


def test_the_names_that_moved_out_of_data_splits_are_still_there():
    # Partitions moved to data/partition.py and the shared bookkeeping to data/cohort.py; old imports keep working
    import data.cohort as cohort
    import data.partition as partitions
    import data.splits as splits

    for name in ("apportion", "hospital_names", "natural_key", "patient_grades", "with_patients"):
        assert getattr(splits, name) is getattr(cohort, name)
    for name in ("PARTITION_METHODS", "partition", "resolve_partition"):
        assert getattr(splits, name) is getattr(partitions, name)
    assert all(hasattr(splits, name) for name in splits.__all__)
