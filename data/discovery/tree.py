"""Finding the images of a ``ROOT/<class folder>/[<magnification folder>/]<images>`` tree, as CRC-HGD ships.

Classes come from folder names, magnifications from folder or file names,
patients from a pattern on the file names (:mod:`data.discovery.names`); what
is left out is counted in a :class:`~data.report.SkipReport`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from data.discovery.checks import file_problem
from data.discovery.names import grade_from_folder, labels_for, magnification_of, patient_from_name
from data.images import is_image_name
from data.records import GRADE_NAMES, ImageRecord
from data.report import SkipReport

logger = logging.getLogger(__name__)

# Folders that archive tools and operating systems leave behind.
_IGNORED_DIRS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN"})


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` in sorted order, skipping hidden and junk entries.

    Symbolic links are followed (data sets are often linked in), but each real
    folder is visited once so that link loops end.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _IGNORED_DIRS)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _class_folder(rel_parts: Sequence[str]) -> tuple[int | None, int]:
    """Class of a file from its folders: the topmost recognised one wins.

    Returns:
        ``(canonical index or None, position of the deciding folder)``; the position
        is 0 (the top folder) when nothing is recognised.
    """
    for pos, part in enumerate(rel_parts[:-1]):
        index = grade_from_folder(part, extras=True)
        if index is not None:
            return index, pos
    return None, 0


def _warn_unmatched(records: Sequence[ImageRecord], patient_regex: str | None) -> None:
    """Log when a patient pattern was given but missed some files."""
    missed = sum(1 for r in records if not r.patient)
    if patient_regex and missed:
        logger.warning("patient_regex %r matched no id in %d of %d images", patient_regex, missed, len(records))


def scan_tree(
    root: str | os.PathLike,
    classes: Sequence[str] = GRADE_NAMES,
    patient_regex: str | None = None,
) -> tuple[list[ImageRecord], SkipReport, tuple[str, ...]]:
    """Find the images of a ``ROOT/<class folder>/[<magnification>/]<images>`` tree.

    Folders are walked recursively. A file's class comes from the topmost folder
    that :func:`grade_from_folder` recognises; its magnification from the nearest
    other folder naming one, else from the file name, else ``"unknown"``. Non-image
    files are ignored silently; images in unknown class folders (counted once per
    folder), in folders of classes not asked for, directly under ``root`` or with
    zero bytes are counted in the report.

    Args:
        root: Data set folder.
        classes: Class names to keep (see :func:`resolve_classes`).
        patient_regex: Pattern for the patient id, searched in the file stem and
            then in the path relative to ``root``; ``None`` leaves ids empty.

    Returns:
        ``(records sorted by path, skip report, class names in label order)``.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
    """
    base = Path(os.path.abspath(Path(root).expanduser()))
    if not base.is_dir():
        raise FileNotFoundError(f"data folder not found: {base}")
    names, label_of = labels_for(classes)
    report, records = SkipReport(), []
    folder_skips: dict[tuple[str, str], int] = {}
    for path in _walk_files(base):
        if not is_image_name(path.name):
            continue
        parts = path.relative_to(base).parts
        index, pos = _class_folder(parts)
        problem = file_problem(path)
        if len(parts) == 1:
            report.add(path, "image outside class folders")
        elif index is None or index not in label_of:
            key = ("unknown class folder" if index is None else "class not requested", parts[pos])
            folder_skips[key] = folder_skips.get(key, 0) + 1
        elif problem:
            report.add(path, problem)
        else:
            mag = magnification_of(parts[:pos] + parts[pos + 1 :])
            patient = patient_from_name(path, patient_regex, "/".join(parts))
            records.append(ImageRecord(str(path), label_of[index], mag, patient, name="/".join(parts)))
    for (reason, folder), count in sorted(folder_skips.items()):
        report.add(f"{folder} ({count} images)", reason)
    records.sort(key=lambda r: r.path)
    _warn_unmatched(records, patient_regex)
    logger.info("found %d images of %d classes under %s", len(records), len(names), base)
    return records, report, names
