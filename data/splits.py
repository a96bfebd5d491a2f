"""Patient-level train/val/test splits and partitions of patients into hospitals.

CRC-HGD holds about ten images per patient, so every assignment here moves whole
patients: an image-level split would put near-duplicate views of one patient on
both sides and inflate test scores.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data.datasets import patient_from_name
from data.errors import DataError
from data.files import atomic_writer
from data.records import MAGNIFICATIONS, SPLITS, UNKNOWN, ImageRecord

logger = logging.getLogger(__name__)

#: ``auto`` resolves to ``natural`` or ``iid`` (see :func:`resolve_partition`).
PARTITION_METHODS: tuple[str, ...] = ("auto", "natural", "iid", "dirichlet")
SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "class_name", "magnification", "patient", "hospital", "split")
# Dirichlet draws tried before moving patients by hand to fill empty hospitals.
_MAX_DRAWS = 10
# Unsplit records count as training data, e.g. when partitioning before splitting.
_TRAINING = ("train", "")


def _sorted(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Records in a canonical order, so results never depend on the input order."""
    return sorted(records, key=dataclasses.astuple)


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value (``H2`` before ``H10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def hospital_names(records: Iterable[ImageRecord]) -> list[str]:
    """Distinct non-empty hospital names in natural order."""
    return sorted({r.hospital for r in records if r.hospital}, key=natural_key)


def with_patients(records: Sequence[ImageRecord], patient_regex: str | None = None) -> list[ImageRecord]:
    """Fill in missing patient ids.

    Ids come from ``patient_regex`` on the file stem when given; otherwise (or when
    it does not match) each image becomes its own patient, named by its path, and a
    warning says so, because patient grouping is then lost.
    """
    out, fallback = [], 0
    for record in records:
        patient = record.patient or patient_from_name(record.path, patient_regex)
        if not patient:
            patient, fallback = record.path, fallback + 1
        out.append(record if patient == record.patient else record.with_(patient=patient))
    if fallback:
        logger.warning(
            "%d of %d images have no patient id; each is treated as its own "
            "patient, so images of one patient may straddle splits or hospitals "
            "(set patient_regex or a manifest patient column)",
            fallback,
            len(out),
        )
    return out


def _by_patient(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Records grouped by patient id."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[record.patient].append(record)
    return dict(groups)


def _majority(values: Iterable) -> object:
    """Most common value; ties go to the smallest, for determinism."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def patient_grades(records: Iterable[ImageRecord]) -> dict[str, int]:
    """Each patient's grade: the majority label of its images."""
    return {p: _majority(r.label for r in rs) for p, rs in _by_patient(records).items()}


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` items into integer counts proportional to ``shares``.

    Uses the largest-remainder method; ties go to the earlier share.
    """
    weight = sum(shares)
    raw = [total * s / weight for s in shares]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _split_counts(total: int, shares: Sequence[float]) -> list[int]:
    """Patients per split for one grade; every wanted split gets one from 3 up."""
    counts = apportion(total, shares)
    if total >= len(shares):
        for i, share in enumerate(shares):
            if share > 0 and counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    """Validate train/val/test fractions and scale them to sum to one."""
    if len(fractions) != len(SPLITS):
        raise DataError(f"fractions needs {len(SPLITS)} values (train, val, test), got {fractions}")
    if not all(math.isfinite(f) and f >= 0 for f in fractions) or fractions[0] <= 0:
        raise DataError(f"fractions must be finite and >= 0 with a positive train share, got {fractions}")
    total = float(sum(fractions))
    return [f / total for f in fractions]


def _keep_given_splits(records: list[ImageRecord]) -> list[ImageRecord]:
    """Validate splits that came with the data and warn about patients that leak."""
    bad = sorted({r.split for r in records} - set(SPLITS))
    if bad:
        raise DataError(f"unknown split values {bad}; expected one of {SPLITS}")
    leaking = [p for p, rs in _by_patient(records).items() if len({r.split for r in rs}) > 1]
    if leaking:
        logger.warning("given splits put %d patients in more than one split (e.g. %s)", len(leaking), leaking[0])
    logger.info("keeping the split given with the data")
    return records


def split_by_patient(
    records: Sequence[ImageRecord],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    patient_regex: str | None = None,
) -> list[ImageRecord]:
    """Assign train/val/test by patient, stratified by hospital and grade.

    Patients (grade = majority label of their images) are shuffled per (hospital, grade) with
    the seed and cut by ``fractions``; each split with a positive fraction gets at
    least one patient of every grade that has three or more. When every record
    already has a split (a manifest column) it is kept as it is.

    Args:
        records: Images; missing patient ids are filled by :func:`with_patients`.
        fractions: Train, val and test shares (scaled to sum to one).
        seed: Seed of the shuffles; the result depends only on it and the records,
            not on their order.
        patient_regex: Pattern for ids of records without one.

    Returns:
        The records with ``split`` (and missing ``patient``) set, in canonical order.

    Raises:
        DataError: For bad fractions, unknown given split values, or records of
            which only some have a split.
    """
    records = with_patients(_sorted(records), patient_regex)
    given = sum(1 for r in records if r.split)
    if records and given == len(records):
        return _keep_given_splits(records)
    if given:
        raise DataError(
            f"{given} of {len(records)} records already have a split; give a split for all of them or for none"
        )
    shares = _check_fractions(fractions)
    grades = patient_grades(records)
    # Stratify within each hospital when hospitals are known, so that every
    # hospital (client) gets validation and test patients of every grade.
    hospital_of = {p: _majority(r.hospital for r in rs) for p, rs in _by_patient(records).items()}
    split_of: dict[str, str] = {}
    for hospital, grade in sorted({(hospital_of[p], g) for p, g in grades.items()}):
        patients = sorted(p for p, g in grades.items() if g == grade and hospital_of[p] == hospital)
        random.Random(f"split:{seed}:{hospital}:{grade}").shuffle(patients)
        start = 0
        for split, count in zip(SPLITS, _split_counts(len(patients), shares)):
            split_of.update((p, split) for p in patients[start : start + count])
            start += count
    out = [r.with_(split=split_of[r.patient]) for r in records]
    for split in SPLITS:
        chosen = [r for r in out if r.split == split]
        logger.info("split %s: %d patients, %d images", split, len({r.patient for r in chosen}), len(chosen))
    return out


def missing_splits(records: Iterable[ImageRecord]) -> list[str]:
    """The splits among train/val/test that hold no record at all, in that order.

    A split setting (``fractions`` with a zero, or too few patients) or a manifest
    ``split`` column can leave no validation or no test images; the caller refuses
    such a run before any work instead of failing at the first evaluation.
    """
    present = {r.split for r in records}
    return [split for split in SPLITS if split not in present]


def _split_rank(split: str) -> int:
    """Order of split groups when dealing patients: training first."""
    if split in _TRAINING:
        return 0
    return 1 + (SPLITS.index(split) if split in SPLITS else len(SPLITS))


def _natural_partition(records: list[ImageRecord], num_hospitals: int, method: str = "natural") -> list[ImageRecord]:
    """Keep the hospitals given with the data, checking that they fit."""
    missing = sum(1 for r in records if not r.hospital)
    if missing:
        raise DataError(f"natural partition needs a hospital on every record; {missing} of {len(records)} have none")
    names = hospital_names(records)
    if len(names) != num_hospitals:
        hint = (
            f"; partition = auto keeps the hospitals of the data: ask for {len(names)} "
            "hospitals, or choose iid or dirichlet"
            if method == "auto"
            else ""
        )
        raise DataError(
            f"natural partition found {len(names)} hospitals ({', '.join(names)}) "
            f"but num_hospitals is {num_hospitals}{hint}"
        )
    shared = [p for p, rs in _by_patient(records).items() if len({r.hospital for r in rs}) > 1]
    if shared:
        logger.warning("%d patients appear in more than one hospital (e.g. %s)", len(shared), shared[0])
    for name in names:
        if not any(r.hospital == name and r.split in _TRAINING for r in records):
            logger.warning("hospital %s has no training images", name)
    return records


def _deal_iid(grades: dict[str, int], splits: dict[str, str], num_hospitals: int, seed: int) -> dict[str, int]:
    """Round-robin over shuffled patients, group by group (split, then grade).

    Training patients are dealt first and the turn carries over between groups, so
    hospitals differ by at most one patient overall and in every group.
    """
    rng = random.Random(f"iid:{seed}")
    keys = sorted({(_split_rank(splits[p]), grades[p]) for p in grades})
    owner, turn = {}, 0
    for key in keys:
        patients = sorted(p for p in grades if (_split_rank(splits[p]), grades[p]) == key)
        rng.shuffle(patients)
        for patient in patients:
            owner[patient] = turn % num_hospitals
            turn += 1
    return owner


def _dirichlet_draw(
    grades: dict[str, int], splits: dict[str, str], num_hospitals: int, alpha: float, rng: np.random.Generator
) -> dict[str, int]:
    """One label-skewed assignment: per grade, hospital shares ~ Dir(alpha).

    The same shares cut the grade's training, validation and test patients, so a
    hospital's local splits follow its own label mix.
    """
    owner: dict[str, int] = {}
    for grade in sorted(set(grades.values())):
        shares = rng.dirichlet([alpha] * num_hospitals)
        members = [p for p in grades if grades[p] == grade]
        for rank in sorted({_split_rank(splits[p]) for p in members}):
            patients = sorted(p for p in members if _split_rank(splits[p]) == rank)
            patients = [patients[i] for i in rng.permutation(len(patients))]
            start = 0
            for hospital, count in enumerate(apportion(len(patients), shares)):
                owner.update((p, hospital) for p in patients[start : start + count])
                start += count
    return owner


def _train_counts(owner: dict[str, int], splits: dict[str, str], num_hospitals: int) -> list[int]:
    """Training patients per hospital."""
    counts = [0] * num_hospitals
    for patient, hospital in owner.items():
        counts[hospital] += splits[patient] in _TRAINING
    return counts


def _fill_empty(owner: dict[str, int], splits: dict[str, str], num_hospitals: int) -> dict[str, int]:
    """Move training patients from the fullest hospital to those without any.

    Deterministic: the donor is the hospital with most training patients (lowest
    index on ties) and gives its last training patient in sorted order.
    """
    owner = dict(owner)
    counts = _train_counts(owner, splits, num_hospitals)
    for empty in [h for h in range(num_hospitals) if counts[h] == 0]:
        donor = max(range(num_hospitals), key=lambda h: (counts[h], -h))
        patient = max(p for p, h in owner.items() if h == donor and splits[p] in _TRAINING)
        owner[patient] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return owner


def _deal_dirichlet(
    grades: dict[str, int], splits: dict[str, str], num_hospitals: int, alpha: float, seed: int
) -> dict[str, int]:
    """Label-skewed assignment in which every hospital has a training patient.

    Redraws a few times, then moves patients by hand (small alpha with many
    hospitals rarely fills all of them by chance).
    """
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_DRAWS):
        owner = _dirichlet_draw(grades, splits, num_hospitals, alpha, rng)
        if min(_train_counts(owner, splits, num_hospitals)) > 0:
            return owner
    logger.info("dirichlet draws left a hospital without training patients; moving some")
    return _fill_empty(owner, splits, num_hospitals)


def resolve_partition(records: Sequence[ImageRecord], method: str) -> str:
    """The partition method that ``method`` stands for with these records.

    ``auto`` is ``natural`` when every record has a hospital (a manifest with a
    ``hospital`` column) and ``iid`` (stratified by split and grade) when none has
    one (a CRC-HGD-style folder); any other method is returned as it is. The caller
    logs and records the result.

    Raises:
        DataError: For an unknown method, and for ``auto`` when only some records
            have a hospital: a half-filled hospital column is more likely a mistake
            than a wish to throw the column away.
    """
    if method not in PARTITION_METHODS:
        raise DataError(f"unknown partition method {method!r}; use one of {PARTITION_METHODS}")
    if method != "auto":
        return method
    named = sum(1 for r in records if r.hospital)
    if named == len(records) and records:
        return "natural"
    if named == 0:
        return "iid"
    raise DataError(
        f"partition = auto: {len(records) - named} of {len(records)} records have no "
        "hospital; give a hospital for all of them (natural) or for none, "
        "or choose iid or dirichlet"
    )


def partition(
    records: Sequence[ImageRecord],
    num_hospitals: int,
    method: str = "natural",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[ImageRecord]:
    """Assign each record a hospital (federated client), whole patients at a time.

    Methods: ``natural`` keeps the hospitals given with the data (their natural
    name order ranks them); ``iid`` deals shuffled patients round-robin within each
    split and grade; ``dirichlet`` draws, per grade, hospital shares from
    ``Dir(alpha)`` (smaller alpha, stronger label skew). The last two name the
    hospitals ``H1..Hn`` and give each at least one training patient. ``auto`` is
    ``natural`` when every record has a hospital, else ``iid`` (see
    :func:`resolve_partition`).

    Args:
        records: Images, usually already split.
        num_hospitals: Number of hospitals.
        method: ``auto``, ``natural``, ``iid`` or ``dirichlet``.
        alpha: Dirichlet concentration (``dirichlet`` only).
        seed: Seed; the result depends only on the arguments, not the record order.

    Returns:
        The records with ``hospital`` set, in canonical order.

    Raises:
        DataError: For a bad method or argument, for ``natural`` when hospitals
            are missing or their number differs, for ``auto`` when only some records
            have a hospital, and when there are fewer training patients than hospitals.
    """
    if num_hospitals < 1:
        raise DataError(f"num_hospitals must be >= 1, got {num_hospitals}")
    records = _sorted(records)
    asked, method = method, resolve_partition(records, method)
    if method == "natural":
        return _natural_partition(records, num_hospitals, asked)
    if method == "dirichlet" and not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    records = with_patients(records)
    grades = patient_grades(records)
    splits = {p: _majority(r.split for r in rs) for p, rs in _by_patient(records).items()}
    training = sum(1 for s in splits.values() if s in _TRAINING)
    if training < num_hospitals:
        raise DataError(f"{num_hospitals} hospitals need as many training patients; there are {training}")
    if method == "iid":
        owner = _deal_iid(grades, splits, num_hospitals, seed)
    else:
        owner = _deal_dirichlet(grades, splits, num_hospitals, alpha, seed)
    return [r.with_(hospital=f"H{owner[r.patient] + 1}") for r in records]


def count_table(records: Sequence[ImageRecord], class_names: Sequence[str] | None = None) -> str:
    """A text table of image counts per hospital and split, by class and magnification.

    Args:
        records: Images.
        class_names: Column titles for labels; ``None`` uses ``label <i>``.

    Returns:
        Lines joined by newlines: one row per (hospital, split), then a total row.
    """
    labels = sorted({r.label for r in records} | set(range(len(class_names or ()))))
    titles = [class_names[i] if class_names and i < len(class_names) else f"label {i}" for i in labels]
    mags = [m for m in (*MAGNIFICATIONS, UNKNOWN) if any(r.magnification == m for r in records)]
    mags += sorted({r.magnification for r in records} - set(mags))
    header = ["hospital", "split", *titles, *mags, "images", "patients"]
    keys = sorted({(r.hospital, r.split) for r in records}, key=lambda k: (natural_key(k[0]), _split_rank(k[1]), k[1]))
    rows = [
        _count_row(k[0] or "-", k[1] or "-", [r for r in records if (r.hospital, r.split) == k], labels, mags)
        for k in keys
    ]
    rows.append(_count_row("all", "", list(records), labels, mags))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _count_row(hospital: str, split: str, records: list[ImageRecord], labels: list[int], mags: list[str]) -> list:
    """One row of :func:`count_table`."""
    by_label = Counter(r.label for r in records)
    by_mag = Counter(r.magnification for r in records)
    return [
        hospital,
        split,
        *(by_label[i] for i in labels),
        *(by_mag[m] for m in mags),
        len(records),
        len({r.patient for r in records}),
    ]


def write_splits_csv(records: Sequence[ImageRecord], path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Write records to CSV (columns :data:`SPLIT_COLUMNS`) atomically.

    The file is written next to its destination and moved into place
    (:func:`data.files.atomic_writer`), so a crash never leaves a half-written
    split file that a later evaluation would trust.

    Raises:
        DataError: If a label has no class name.
        WriteError: If the storage refuses the file (full, read-only).
    """
    path = Path(path)
    rows = []
    for r in _sorted(records):
        if not 0 <= r.label < len(class_names):
            raise DataError(f"label {r.label} of {r.path} has no class name in {tuple(class_names)}")
        rows.append([r.path, r.label, class_names[r.label], r.magnification, r.patient, r.hospital, r.split])
    with atomic_writer(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(rows)
        text.flush()
        text.detach()  # leave the binary handle open for atomic_writer to fsync and close


def read_splits_csv(path: str | os.PathLike) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Read a file written by :func:`write_splits_csv`.

    Returns:
        ``(records in canonical order, class names by label)``; a label that never
        occurs gets the name ``label <i>``.

    Raises:
        DataError: If a column is missing or one label carries two class names.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks columns {missing}")
        rows = list(reader)
    names: dict[int, str] = {}
    records = []
    for row in rows:
        label = int(row["label"])
        if names.setdefault(label, row["class_name"]) != row["class_name"]:
            raise DataError(f"{path}: label {label} named both {names[label]!r} and {row['class_name']!r}")
        records.append(
            ImageRecord(
                row["path"], label, row["magnification"] or UNKNOWN, row["patient"], row["hospital"], row["split"]
            )
        )
    count = max(names, default=-1) + 1
    return _sorted(records), tuple(names.get(i, f"label {i}") for i in range(count))
