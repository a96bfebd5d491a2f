"""Finding the images of a grading data set and their labels.

Two sources are understood: a folder tree ``ROOT/<class folder>/[<magnification
folder>/]<images>`` as CRC-HGD ships, and a CSV manifest. Both yield
:class:`~data.records.ImageRecord` lists plus a :class:`~data.report.SkipReport`
that says what was left out and why.

Modules:

* :mod:`~data.discovery.names`: what folder, file and label names say (class, magnification, patient).
* :mod:`~data.discovery.tree`: scanning a folder tree (:func:`scan_tree`).
* :mod:`~data.discovery.manifest`: reading a CSV manifest (:func:`read_manifest`).
* :mod:`~data.discovery.checks`: whether a file is usable (cheap checks, then image headers).
* :mod:`~data.discovery.load`: :func:`load_records`, which picks the source and applies the checks.
"""

from data.discovery.checks import verify_records
from data.discovery.load import load_records
from data.discovery.manifest import read_manifest
from data.discovery.names import (
    ALL_CLASS_NAMES,
    grade_from_folder,
    magnification_from_name,
    patient_from_name,
    resolve_classes,
)
from data.discovery.tree import scan_tree

__all__ = [
    "ALL_CLASS_NAMES",
    "grade_from_folder",
    "load_records",
    "magnification_from_name",
    "patient_from_name",
    "read_manifest",
    "resolve_classes",
    "scan_tree",
    "verify_records",
]
