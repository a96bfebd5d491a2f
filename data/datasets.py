"""Finding the images of a grading data set and their labels.

Two sources are understood: a folder tree ``ROOT/<class folder>/[<magnification
folder>/]<images>`` as CRC-HGD ships, and a CSV manifest. Both yield
:class:`~data.records.ImageRecord` lists plus a :class:`SkipReport` that says what
was left out and why.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data.errors import DataError
from data.files import write_atomic
from data.images import BadImage, is_image_name, probe
from data.records import (
    EXTRA_CLASS_NAMES,
    GRADE_NAMES,
    MAGNIFICATIONS,
    SPLITS,
    UNKNOWN,
    ImageRecord,
)

logger = logging.getLogger(__name__)

#: Every class this module can recognise, in canonical label order.
ALL_CLASS_NAMES: tuple[str, ...] = GRADE_NAMES + EXTRA_CLASS_NAMES
_NORMAL, _MIXED = len(GRADE_NAMES), len(GRADE_NAMES) + 1

_GRADE_NUMBERS = {"1": 0, "2": 1, "3": 2, "i": 0, "ii": 1, "iii": 2}
_GRADE_PREFIXES = frozenset({"grade", "gr", "g"})
_DIFF_WORDS = {
    "well": 0,
    "moderately": 1,
    "moderate": 1,
    "mod": 1,
    "poorly": 2,
    "poor": 2,
}
# Folders that archive tools and operating systems leave behind.
_IGNORED_DIRS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN"})
_MAG_TOKEN = re.compile(r"^(?:(\d+)x|x(\d+))$")
# What a reason must not hold to leave its hospital: a path separator or a file suffix.
_PATHLIKE = re.compile(r"[/\\]|\.[A-Za-z][A-Za-z0-9]{1,4}\b")
#: The reason under which :meth:`SkipReport.counts_only` counts reasons that look like paths.
WITHHELD_REASON = "other (reason withheld: it named a file)"


class SkipReport:
    """Counts of skipped files by reason, with a few example paths per reason.

    Reasons are short fixed phrases (``"empty file"``, ``"truncated"``) and never
    name a file; the example paths may carry patient identifiers, so they belong in
    the report a hospital keeps on its own disk (:meth:`to_dict`,
    :meth:`write_json`), while :meth:`counts_only` is what may cross ranks.

    Args:
        max_examples: How many example paths to keep per reason.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, path: str | os.PathLike, reason: str) -> None:
        """Count one skipped item under ``reason``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(str(path))

    def merge(self, other: SkipReport) -> SkipReport:
        """Add another report's counts and examples into this one; returns self."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            room = self.max_examples - len(examples)
            examples.extend(other.examples.get(reason, [])[: max(room, 0)])
        return self

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"total": n, "reasons": {reason: {count, examples}}}``."""
        reasons = {
            r: {"count": self.counts[r], "examples": list(self.examples.get(r, []))} for r in sorted(self.counts)
        }
        return {"total": self.total, "reasons": reasons}

    def counts_only(self) -> dict:
        """What may leave the hospital: ``{"total": n, "reasons": {reason: count}}``.

        No example paths and no file names. A reason that looks like it holds a
        path or a file name (a ``/`` or ``\\``, or a suffix such as ``.jpg``) is
        counted under :data:`WITHHELD_REASON` instead, so that a future caller who
        builds a reason from an error message cannot leak one.
        """
        reasons: dict[str, int] = {}
        for reason, count in self.counts.items():
            key = WITHHELD_REASON if _PATHLIKE.search(reason) else reason
            reasons[key] = reasons.get(key, 0) + count
        return {"total": self.total, "reasons": dict(sorted(reasons.items()))}

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as indented JSON (e.g. ``OUT/data_report.json``), atomically."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def summary_lines(self) -> list[str]:
        """Readable lines for the log, one per reason plus a header."""
        if not self.total:
            return ["skipped: nothing"]
        lines = [f"skipped: {self.total}"]
        for reason in sorted(self.counts):
            shown = ", ".join(self.examples.get(reason, []))
            lines.append(f"  {reason}: {self.counts[reason]} (e.g. {shown})")
        return lines

    def __repr__(self) -> str:
        return f"SkipReport(total={self.total}, counts={self.counts})"


def _tokens(name: str) -> list[str]:
    """Lower-case tokens, split on non-alphanumerics and letter/digit boundaries."""
    return re.findall(r"[a-z]+|[0-9]+", name.lower())


def _split_roman_grade(token: str) -> list[str]:
    """``gradeiii`` -> ``grade``, ``iii`` (letters and Roman numerals make one token); others unchanged."""
    if token.startswith("grade") and token[5:] in _GRADE_NUMBERS:
        return ["grade", token[5:]]
    return [token]


def grade_from_folder(name: str, extras: bool = False) -> int | None:
    """Recognise the class of a folder (or label) name.

    The rule: the name is lower-cased and split into tokens at every non-alphanumeric
    character and at every letter/digit boundary (``grade1`` -> ``grade``, ``1``).

    * A grade number is ``1``/``2``/``3`` or the Roman ``i``/``ii``/``iii`` as a whole
      token, counted only right after ``grade``, ``gr`` or ``g`` (so ``Batch_2`` is
      not a grade, ``III`` never matches ``II``); ``GradeIII`` reads as ``Grade III``.
      Every number of a run after the prefix counts, so a range (``Grade II-III``)
      is conflicting evidence.
    * Differentiation words: ``well`` -> 0; ``moderately``/``moderate``/``mod`` -> 1;
      ``poorly``/``poor`` -> 2.
    * The grade is found when the numbers and words present all agree; conflicting
      evidence (``Grade_1_Poorly``) gives ``None``.
    * With ``extras``, ``mixed`` anywhere gives Mixed (3 + 1) before ``normal`` gives
      Normal (3), since ``Mixed_Normal_Tumoral_Colon`` contains both words. Without
      ``extras`` such folders give ``None``, as does anything unrecognised.

    Args:
        name: Folder name, e.g. ``CRC_Grade__2__Mod_Diff``.
        extras: Whether Normal and Mixed are recognised.

    Returns:
        Index into :data:`ALL_CLASS_NAMES` (0-2 for Grades I-III, 3 Normal, 4 Mixed),
        or ``None``.
    """
    tokens = [part for tok in _tokens(name) for part in _split_roman_grade(tok)]
    found = {_DIFF_WORDS[t] for t in tokens if t in _DIFF_WORDS}
    for i, tok in enumerate(tokens):
        if tok in _GRADE_PREFIXES:  # every number of a run counts: "Grade II-III" is a conflict, not Grade II
            for number in itertools.takewhile(lambda t: t in _GRADE_NUMBERS, tokens[i + 1 :]):
                found.add(_GRADE_NUMBERS[number])
    extra = _MIXED if "mixed" in tokens else _NORMAL if "normal" in tokens else None
    if extra is not None:
        return extra if extras and not found else None
    return found.pop() if len(found) == 1 else None


def magnification_from_name(name: str) -> str | None:
    """Find a magnification such as ``10X``, ``40x`` or ``x40`` in a name.

    Tokens are split on non-alphanumerics only, so ``40X_slide3`` matches but
    ``P10x3`` does not. The value must be one of :data:`MAGNIFICATIONS`.

    Args:
        name: A folder name or file name (the suffix is ignored).

    Returns:
        The spelling used in ``MAGNIFICATIONS`` (``"40x"``), or ``None`` when no
        token or more than one different magnification is found.
    """
    found = set()
    for token in re.split(r"[^0-9a-z]+", name.lower()):
        match = _MAG_TOKEN.match(token)
        if match:
            mag = f"{int(match.group(1) or match.group(2))}x"
            if mag in MAGNIFICATIONS:
                found.add(mag)
    return found.pop() if len(found) == 1 else None


def resolve_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Normalise requested class names to canonical spelling and label order.

    Args:
        classes: Names such as ``GRADE_NAMES + ("Normal",)``; any spelling that
            :func:`grade_from_folder` recognises (``"normal"``, ``"grade 2"``) works.

    Returns:
        The requested names from :data:`ALL_CLASS_NAMES`, in that tuple's order.

    Raises:
        DataError: For an unrecognised or empty list of names, and for a class
            named twice, whether in the same spelling or two (``"Grade I"`` and
            ``"grade 1"``): the message names both spellings.
    """
    given: dict[int, str] = {}
    for name in classes:
        name = str(name)
        index = _class_index(name)
        if index is None:
            raise DataError(f"unknown class name {name!r}; known: {', '.join(ALL_CLASS_NAMES)}")
        if index in given:
            first = given[index]
            if first == name:
                raise DataError(f"class name {name!r} is given twice; name each class once")
            raise DataError(
                f"class names {first!r} and {name!r} both mean {ALL_CLASS_NAMES[index]!r}; name each class once"
            )
        given[index] = name
    if not given:
        raise DataError("no classes requested")
    return tuple(ALL_CLASS_NAMES[i] for i in sorted(given))


def _class_index(name: str) -> int | None:
    """Canonical index of a class name or folder-like spelling."""
    lowered = name.strip().lower()
    for i, canonical in enumerate(ALL_CLASS_NAMES):
        if lowered == canonical.lower():
            return i
    return grade_from_folder(name, extras=True)


def patient_from_name(path: str | os.PathLike, patient_regex: str | None, rel: str = "") -> str:
    """Patient id from a file's stem, falling back to its relative path.

    Args:
        path: Image path.
        patient_regex: Pattern searched in the stem; its first group (or the whole
            match) is the id. ``None`` gives ``""``.
        rel: Path relative to the data root, searched when the stem does not match
            (for trees with one folder per patient).

    Returns:
        The patient id, or ``""`` when there is no pattern or no match.
    """
    if not patient_regex:
        return ""
    pattern = re.compile(patient_regex)
    for text in (Path(path).stem, rel):
        match = pattern.search(text) if text else None
        if match:
            return match.group(1) if pattern.groups else match.group(0)
    return ""


def _magnification_of(rel_parts: Sequence[str]) -> str:
    """Magnification from folder components (nearest first), else the file name."""
    *folders, filename = rel_parts
    for part in reversed(folders):
        mag = magnification_from_name(part)
        if mag:
            return mag
    return magnification_from_name(Path(filename).stem) or UNKNOWN


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


def _labels_for(classes: Sequence[str]) -> tuple[tuple[str, ...], dict[int, int]]:
    """Requested class names and a map from canonical index to label."""
    names = resolve_classes(classes)
    return names, {ALL_CLASS_NAMES.index(n): i for i, n in enumerate(names)}


def _file_problem(path: Path) -> str | None:
    """A reason to skip a file that is cheap to see (missing, empty), else None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing file"
    except OSError:
        return "unreadable"
    if not path.is_file():
        return "not a file"
    return "empty file" if size == 0 else None


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
    names, label_of = _labels_for(classes)
    report, records = SkipReport(), []
    folder_skips: dict[tuple[str, str], int] = {}
    for path in _walk_files(base):
        if not is_image_name(path.name):
            continue
        parts = path.relative_to(base).parts
        index, pos = _class_folder(parts)
        problem = _file_problem(path)
        if len(parts) == 1:
            report.add(path, "image outside class folders")
        elif index is None or index not in label_of:
            key = ("unknown class folder" if index is None else "class not requested", parts[pos])
            folder_skips[key] = folder_skips.get(key, 0) + 1
        elif problem:
            report.add(path, problem)
        else:
            mag = _magnification_of(parts[:pos] + parts[pos + 1 :])
            patient = patient_from_name(path, patient_regex, "/".join(parts))
            records.append(ImageRecord(str(path), label_of[index], mag, patient, name="/".join(parts)))
    for (reason, folder), count in sorted(folder_skips.items()):
        report.add(f"{folder} ({count} images)", reason)
    records.sort(key=lambda r: r.path)
    _warn_unmatched(records, patient_regex)
    logger.info("found %d images of %d classes under %s", len(records), len(names), base)
    return records, report, names


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
    return (_class_index(text) if text else None), False


def _parse_magnification(text: str, written_path: str) -> str:
    """Magnification from the manifest column, else from the path as written."""
    if text:
        mag = magnification_from_name(f"{text}x" if text.isdigit() else text)
        if mag is None:
            logger.debug("unrecognised magnification %r for %s", text, written_path)
        return mag or UNKNOWN
    return _magnification_of(Path(written_path).parts or ("",))


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
    problem = _file_problem(path)
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
    names, label_of = _labels_for(classes)
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


def verify_records(records: Iterable[ImageRecord], report: SkipReport, min_size: int = 0) -> list[ImageRecord]:
    """Keep the records whose image header opens; count the others in ``report``.

    Only headers are read (fast), so truncated pixel data is found later, when the
    image is decoded.
    """
    kept = []
    for record in records:
        try:
            probe(record.path, min_size)
        except BadImage as exc:
            report.add(record.path, exc.reason)
            continue
        kept.append(record)
    return kept


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
