"""What the name of a folder, a file or a label says: its class, its magnification, its patient.

The tree scan (:mod:`data.discovery.tree`) and the manifest reader
(:mod:`data.discovery.manifest`) read labels through the same rules, so a
folder spelling and a manifest label mean the same class; the rules are here,
apart from either source.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

from data.errors import DataError
from data.records import EXTRA_CLASS_NAMES, GRADE_NAMES, MAGNIFICATIONS, UNKNOWN

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
_MAG_TOKEN = re.compile(r"^(?:(\d+)x|x(\d+))$")


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
        index = class_index(name)
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


def class_index(name: str) -> int | None:
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


def magnification_of(rel_parts: Sequence[str]) -> str:
    """Magnification from folder components (nearest first), else the file name."""
    *folders, filename = rel_parts
    for part in reversed(folders):
        mag = magnification_from_name(part)
        if mag:
            return mag
    return magnification_from_name(Path(filename).stem) or UNKNOWN


def labels_for(classes: Sequence[str]) -> tuple[tuple[str, ...], dict[int, int]]:
    """Requested class names and a map from canonical index to label."""
    names = resolve_classes(classes)
    return names, {ALL_CLASS_NAMES.index(n): i for i, n in enumerate(names)}
