"""The report of what was left out of a data set, and why: :class:`SkipReport`.

Discovery (:mod:`data.discovery`) and the patch cache (:mod:`data.cache`) both
count skipped files in it; one report then travels with a hospital's data.
Its reasons are fixed phrases, its examples are paths: only the counts may
leave a hospital (:meth:`SkipReport.counts_only`).
"""

from __future__ import annotations

import json
import os
import re

from data.files import write_atomic

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
