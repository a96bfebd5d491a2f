"""Patient-level train/val/test splits, the count table of a split cohort, and the ``splits.csv`` file.

CRC-HGD holds about ten images per patient, so every assignment here moves whole
patients: an image-level split would put near-duplicate views of one patient on
both sides and inflate test scores. Partitions of the patients into hospitals
live in :mod:`data.partition`, the bookkeeping both share in :mod:`data.cohort`;
their names are also importable from here, where they used to live.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from data.cohort import (
    apportion,
    by_patient,
    canonical_order,
    hospital_names,
    majority,
    natural_key,
    patient_grades,
    split_rank,
    with_patients,
)
from data.errors import DataError
from data.files import atomic_writer
from data.partition import PARTITION_METHODS, partition, resolve_partition
from data.records import MAGNIFICATIONS, SPLITS, UNKNOWN, ImageRecord

logger = logging.getLogger(__name__)

SPLIT_COLUMNS: tuple[str, ...] = ("path", "label", "class_name", "magnification", "patient", "hospital", "split")

# All this module defined before the partitions and the shared bookkeeping moved out: old imports keep working.
__all__ = [
    "PARTITION_METHODS",
    "SPLIT_COLUMNS",
    "apportion",
    "count_table",
    "hospital_names",
    "missing_splits",
    "natural_key",
    "partition",
    "patient_grades",
    "read_splits_csv",
    "resolve_partition",
    "split_by_patient",
    "with_patients",
    "write_splits_csv",
]


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
    leaking = [p for p, rs in by_patient(records).items() if len({r.split for r in rs}) > 1]
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
    records = with_patients(canonical_order(records), patient_regex)
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
    hospital_of = {p: majority(r.hospital for r in rs) for p, rs in by_patient(records).items()}
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
    keys = sorted({(r.hospital, r.split) for r in records}, key=lambda k: (natural_key(k[0]), split_rank(k[1]), k[1]))
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
    for r in canonical_order(records):
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
    return canonical_order(records), tuple(names.get(i, f"label {i}") for i in range(count))
