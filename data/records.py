"""The record of one image, shared by every loader, split and partition function."""
from __future__ import annotations

from dataclasses import dataclass, replace

#: Grade classes in label order. Labels index into this tuple.
GRADE_NAMES: tuple[str, ...] = ("Grade I", "Grade II", "Grade III")
#: Optional non-grade classes of CRC-HGD, appended after the grades when asked for.
EXTRA_CLASS_NAMES: tuple[str, ...] = ("Normal", "Mixed")
#: Magnification folders of CRC-HGD; anything else is reported as ``unknown``.
MAGNIFICATIONS: tuple[str, ...] = ("4x", "10x", "20x", "40x")
UNKNOWN = "unknown"
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset and what is known about it.

    Attributes:
        path: Absolute path of the image file.
        label: Class index into the dataset's class names (``GRADE_NAMES`` by default).
        magnification: One of ``MAGNIFICATIONS`` or ``"unknown"``.
        patient: Patient identifier; images of one patient never straddle splits.
        hospital: Hospital (client) name, ``""`` until a partition assigns one.
        split: ``"train"``, ``"val"``, ``"test"`` or ``""`` until a split assigns one.
    """

    path: str
    label: int
    magnification: str = UNKNOWN
    patient: str = ""
    hospital: str = ""
    split: str = ""

    def with_(self, **changes) -> "ImageRecord":
        """A copy with some fields changed."""
        return replace(self, **changes)
