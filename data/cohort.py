"""Bookkeeping of a cohort, shared by patient splits (:mod:`data.splits`) and hospital partitions
(:mod:`data.partition`).

Both move whole patients, read a patient's grade the same way and must give
the same answer whatever the order of the records, so the canonical order,
patient ids and grades, hospital names and integer apportioning live here,
once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from data.discovery.names import patient_from_name
from data.records import SPLITS, ImageRecord

logger = logging.getLogger(__name__)

# Unsplit records count as training data, e.g. when partitioning before splitting.
TRAINING = ("train", "")


def canonical_order(records: Iterable[ImageRecord]) -> list[ImageRecord]:
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


def by_patient(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Records grouped by patient id."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[record.patient].append(record)
    return dict(groups)


def majority(values: Iterable) -> object:
    """Most common value; ties go to the smallest, for determinism."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def patient_grades(records: Iterable[ImageRecord]) -> dict[str, int]:
    """Each patient's grade: the majority label of its images."""
    return {p: majority(r.label for r in rs) for p, rs in by_patient(records).items()}


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


def split_rank(split: str) -> int:
    """Rank of a split, training (or none) first: the order in which partitions deal patients and tables list rows."""
    if split in TRAINING:
        return 0
    return 1 + (SPLITS.index(split) if split in SPLITS else len(SPLITS))
