"""The entry point of discovery that training, evaluation and ``data.prepare`` call: :func:`load_records`.

It picks the source (a manifest, a folder holding ``manifest.csv``, else a
folder tree), fills in missing patient ids from ``patient_regex``, checks image
headers and logs what was left out, so every caller gets the same list from
the same path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from data.discovery.checks import verify_records
from data.discovery.manifest import read_manifest
from data.discovery.names import patient_from_name
from data.discovery.tree import scan_tree
from data.errors import DataError
from data.records import GRADE_NAMES, ImageRecord
from data.report import SkipReport

logger = logging.getLogger(__name__)


def load_records(
    data: str | os.PathLike,
    classes: Sequence[str] = GRADE_NAMES,
    patient_regex: str | None = None,
    verify: bool = True,
) -> tuple[list[ImageRecord], SkipReport, tuple[str, ...]]:
    """Load the image list from a manifest or a folder tree.

    A ``.csv`` file is read as a manifest; a folder holding ``manifest.csv`` uses
    that manifest; any other folder is scanned with :func:`scan_tree`.

    Args:
        data: CSV file or data folder.
        classes: Class names to keep (see :func:`resolve_classes`).
        patient_regex: Pattern for patient ids of records that have none.
        verify: Whether to open every image header and drop unreadable files.

    Returns:
        ``(records sorted by path, skip report, class names in label order)``.

    Raises:
        FileNotFoundError: If ``data`` does not exist.
        DataError: If no usable image is left.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"expected a data folder or a .csv manifest, got {path}")
        records, report, names = read_manifest(path, classes)
    elif (path / "manifest.csv").is_file():
        records, report, names = read_manifest(path / "manifest.csv", classes)
    else:
        records, report, names = scan_tree(path, classes, patient_regex)
    if patient_regex:
        records = [r if r.patient else r.with_(patient=patient_from_name(r.path, patient_regex)) for r in records]
    if verify:
        records = verify_records(records, report)
    # Leaving out classes on purpose is routine; anything else deserves attention.
    level = logging.WARNING if set(report.counts) - {"class not requested"} else logging.INFO
    for line in report.summary_lines():
        logger.log(level, line)
    if not records:
        raise DataError(f"no usable images under {path} ({'; '.join(report.summary_lines())})")
    return records, report, names
