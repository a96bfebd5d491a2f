"""Partitions of patients into hospitals (federated clients): ``natural``, ``iid`` and ``dirichlet``.

Like the splits (:mod:`data.splits`), a partition moves whole patients, so that
no patient's images reach two hospitals: ``natural`` keeps the hospitals given
with the data (and warns where a patient spans two); ``iid`` and ``dirichlet``
deal patients within their splits and give every hospital a training patient.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np

from data.cohort import (
    TRAINING,
    apportion,
    by_patient,
    canonical_order,
    hospital_names,
    majority,
    patient_grades,
    split_rank,
    with_patients,
)
from data.errors import DataError
from data.records import ImageRecord

logger = logging.getLogger(__name__)

#: ``auto`` resolves to ``natural`` or ``iid`` (see :func:`resolve_partition`).
PARTITION_METHODS: tuple[str, ...] = ("auto", "natural", "iid", "dirichlet")
# Dirichlet draws tried before moving patients by hand to fill empty hospitals.
_MAX_DRAWS = 10


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
    shared = [p for p, rs in by_patient(records).items() if len({r.hospital for r in rs}) > 1]
    if shared:
        logger.warning("%d patients appear in more than one hospital (e.g. %s)", len(shared), shared[0])
    for name in names:
        if not any(r.hospital == name and r.split in TRAINING for r in records):
            logger.warning("hospital %s has no training images", name)
    return records


def _deal_iid(grades: dict[str, int], splits: dict[str, str], num_hospitals: int, seed: int) -> dict[str, int]:
    """Round-robin over shuffled patients, group by group (split, then grade).

    Training patients are dealt first and the turn carries over between groups, so
    hospitals differ by at most one patient overall and in every group.
    """
    rng = random.Random(f"iid:{seed}")
    keys = sorted({(split_rank(splits[p]), grades[p]) for p in grades})
    owner, turn = {}, 0
    for key in keys:
        patients = sorted(p for p in grades if (split_rank(splits[p]), grades[p]) == key)
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
        for rank in sorted({split_rank(splits[p]) for p in members}):
            patients = sorted(p for p in members if split_rank(splits[p]) == rank)
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
        counts[hospital] += splits[patient] in TRAINING
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
        patient = max(p for p, h in owner.items() if h == donor and splits[p] in TRAINING)
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
    records = canonical_order(records)
    asked, method = method, resolve_partition(records, method)
    if method == "natural":
        return _natural_partition(records, num_hospitals, asked)
    if method == "dirichlet" and not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    records = with_patients(records)
    grades = patient_grades(records)
    splits = {p: majority(r.split for r in rs) for p, rs in by_patient(records).items()}
    training = sum(1 for s in splits.values() if s in TRAINING)
    if training < num_hospitals:
        raise DataError(f"{num_hospitals} hospitals need as many training patients; there are {training}")
    if method == "iid":
        owner = _deal_iid(grades, splits, num_hospitals, seed)
    else:
        owner = _deal_dirichlet(grades, splits, num_hospitals, alpha, seed)
    return [r.with_(hospital=f"H{owner[r.patient] + 1}") for r in records]
