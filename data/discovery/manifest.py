"""Reading a CSV manifest of images: ``path`` and ``label`` columns, and optionally ``magnification``,
``patient``, ``hospital`` and ``split``.

A manifest is typed by hand or exported from a spreadsheet, so every fault of
the file as a whole (not UTF-8, a column named twice, not CSV) is one line
naming the file and the line; a bad row is counted in the
:class:`~data.report.SkipReport` under its line number and read on.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from data.discovery.checks import file_problem
from data.discovery.names import ALL_CLASS_NAMES, class_index, labels_for, magnification_from_name, magnification_of
from data.errors import DataError
from data.records import GRADE_NAMES, SPLITS, UNKNOWN, ImageRecord
from data.report import SkipReport

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}
_REQUIRED_COLUMNS = ("path", "label")


def _line_at(data: bytes, pos: int) -> int:
    """1-based line of byte ``pos`` (``\\n``, ``\\r\\n`` and a lone ``\\r`` each end a line)."""
    head = data[:pos]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def _manifest_text(csv_path: Path) -> str:
    """The manifest decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        DataError: One line naming the file and the line, for a UTF-16 file, a NUL
            byte (UTF-16 without a byte-order mark, or not text at all) or bytes that
            are not UTF-8 (Latin-1, Windows-1252, ...).
    """
    data = csv_path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"manifest {csv_path} is not UTF-8 (line 1): it is UTF-16; save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"manifest {csv_path} holds a NUL byte (line {_line_at(data, nul)}): "
            "it is not UTF-8 text (UTF-16? a binary file?); save it as UTF-8"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"manifest {csv_path} is not UTF-8 (line {_line_at(data, err.start)}): "
            f"byte 0x{data[err.start]:02x} ({err.reason}); save it as UTF-8"
        ) from None


def _header(csv_path: Path, row: list[str], line: int) -> list[str]:
    """Lower-cased column names of a manifest's header row, checked.

    Raises:
        DataError: For a column named twice (in any case) or a missing required column.
    """
    columns = [c.strip().lower() for c in row]
    first: dict[str, str] = {}
    for written, column in zip(row, columns):
        if column in first:
            spellings = (
                f"as {first[column].strip()!r} and {written.strip()!r}, "
                if first[column].strip() != written.strip()
                else ""
            )
            raise DataError(
                f"manifest {csv_path} names the column {column!r} twice ({spellings}line {line}); keep one of them"
            )
        if column:
            first[column] = written
    for required in _REQUIRED_COLUMNS:
        if required not in columns:
            raise DataError(f"manifest {csv_path} lacks the required column {required!r} (found: {', '.join(columns)})")
    return columns


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """Rows of a manifest with lower-cased column names and their line numbers.

    The first non-blank row is the header; blank rows are skipped; missing trailing
    fields read as ``""`` and fields beyond the header (or under an empty column
    name) are ignored.

    Raises:
        DataError: One line naming the file (and the line where it can): the file is
            empty, not UTF-8, names a column twice, lacks a required column, has no
            rows, or cannot be parsed as CSV (e.g. a field over the csv module's
            limit of 128 KiB, which is what an unclosed quote gives).
    """
    reader = csv.reader(io.StringIO(_manifest_text(csv_path), newline=""))
    columns: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    start = 1  # line on which the row being read begins
    try:
        for row in reader:
            if not row:
                pass
            elif columns is None:
                columns = _header(csv_path, row, start)
            else:
                rows.append(
                    (reader.line_num, {k: (row[i].strip() if i < len(row) else "") for i, k in enumerate(columns) if k})
                )
            start = reader.line_num + 1
    except csv.Error as err:
        text = str(err)
        if "field larger than field limit" in text:
            text = f"a field is longer than {csv.field_size_limit()} characters (an unclosed quote?)"
        raise DataError(f"manifest {csv_path} is not valid CSV (line {start}): {text}") from None
    if columns is None:
        raise DataError(f"manifest {csv_path} is empty")
    if not rows:
        raise DataError(f"manifest {csv_path} has no rows")
    return rows


def _parse_label(text: str) -> tuple[int | None, bool]:
    """Canonical class index of a manifest label, and whether it was an integer."""
    if re.fullmatch(r"[+-]?\d+", text):
        value = int(text)
        return (value if 0 <= value < len(ALL_CLASS_NAMES) else None), True
    return (class_index(text) if text else None), False


def _parse_magnification(text: str, written_path: str) -> str:
    """Magnification from the manifest column, else from the path as written."""
    if text:
        mag = magnification_from_name(f"{text}x" if text.isdigit() else text)
        if mag is None:
            logger.debug("unrecognised magnification %r for %s", text, written_path)
        return mag or UNKNOWN
    return magnification_of(Path(written_path).parts or ("",))


def _manifest_record(
    row: dict[str, str], folder: Path, label_of: dict[int, int]
) -> tuple[ImageRecord | None, str, bool]:
    """One manifest row as a record, or ``(None, reason, _)``; the flag is an int label."""
    written = row.get("path", "")
    index, was_int = _parse_label(row.get("label", ""))
    split = row.get("split", "").lower()
    split = _SPLIT_ALIASES.get(split, split)
    if not written:
        return None, "empty path", was_int
    if index is None:
        return None, "bad label", was_int
    if index not in label_of:
        return None, "class not requested", was_int
    if split and split not in SPLITS:
        return None, "bad split", was_int
    path = Path(written).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else folder / path))
    problem = file_problem(path)
    if problem:
        return None, problem, was_int
    mag = _parse_magnification(row.get("magnification", ""), written)
    record = ImageRecord(
        str(path), label_of[index], mag, row.get("patient", ""), row.get("hospital", ""), split, name=written
    )
    return record, "", was_int


def read_manifest(
    csv_path: str | os.PathLike,
    classes: Sequence[str] = GRADE_NAMES,
) -> tuple[list[ImageRecord], SkipReport, tuple[str, ...]]:
    """Read a CSV manifest of images.

    Columns ``path`` and ``label`` are required; ``magnification``, ``patient``,
    ``hospital`` and ``split`` are optional (names case-insensitive). Relative paths
    resolve against the CSV's folder. ``label`` is a 0-based index into
    :data:`ALL_CLASS_NAMES` (so it means the same whatever ``classes`` is), a class
    name, or any folder spelling :func:`grade_from_folder` knows. Rows with missing
    or empty files, bad labels, bad split values or repeated paths are counted in
    the report as ``file.csv:<line>: <path>``.

    Args:
        csv_path: The manifest.
        classes: Class names to keep (see :func:`resolve_classes`).

    Returns:
        ``(records sorted by path, skip report, class names in label order)``.

    Raises:
        DataError: One line naming the manifest (and the line, where it can) if it
            is empty, not UTF-8 (a UTF-8 byte-order mark is fine), names a column
            twice, lacks a required column, has no rows or is not valid CSV.
    """
    csv_path = Path(csv_path)
    names, label_of = labels_for(classes)
    report, records, seen, int_labels = SkipReport(), [], set(), set()
    for line, row in _read_rows(csv_path):
        record, reason, was_int = _manifest_record(row, csv_path.parent, label_of)
        if was_int:
            int_labels.add(int(row["label"]))
        if record is not None and record.path in seen:
            record, reason = None, "duplicate path"
        if record is None:
            report.add(f"{csv_path.name}:{line}: {row.get('path', '')}", reason)
            continue
        seen.add(record.path)
        records.append(record)
    if int_labels and 0 not in int_labels and len(GRADE_NAMES) in int_labels:
        logger.warning(
            "manifest %s: integer labels never use 0 but use %d; labels are 0-based (0 = %s)",
            csv_path,
            len(GRADE_NAMES),
            ALL_CLASS_NAMES[0],
        )
    records.sort(key=lambda r: r.path)
    logger.info("read %d images of %d classes from %s", len(records), len(names), csv_path)
    return records, report, names
