"""Whether an image file is usable, in two steps of growing cost.

:func:`file_problem` (missing, empty, not a file: a ``stat``) runs while the
tree is scanned or the manifest read, on every file; :func:`verify_records`
opens the header of each file that passed, once the sources agree on the
list (:func:`data.discovery.load.load_records`). Pixel data is only decoded
when the cache is built, where a truncated image is counted in turn.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data.images import BadImage, probe
from data.records import ImageRecord
from data.report import SkipReport


def file_problem(path: Path) -> str | None:
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
