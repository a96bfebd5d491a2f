"""The record of one image, shared by every loader, split and partition function."""

from __future__ import annotations

import os
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
        name: The image's name within its dataset, wherever the dataset lies: the path below the
            tree's root, or as written in the manifest; ``""`` = the file name. It seeds the
            image's patch centres, so a dataset moved or copied elsewhere gives the same patches.
    """

    path: str
    label: int
    magnification: str = UNKNOWN
    patient: str = ""
    hospital: str = ""
    split: str = ""
    name: str = ""

    @property
    def identity(self) -> str:
        """``name``, or the file name when there is none."""
        return self.name or os.path.basename(self.path)

    def with_(self, **changes) -> ImageRecord:
        """A copy with some fields changed."""
        return replace(self, **changes)
