"""Kept so that ``from data.datasets import ...`` goes on working; nothing is defined here.

Discovery (finding the images of a data set and their labels) now lives in the
package :mod:`data.discovery`: names in :mod:`data.discovery.names`, the tree
scan in :mod:`data.discovery.tree`, manifests in :mod:`data.discovery.manifest`,
file checks in :mod:`data.discovery.checks` and :func:`load_records` in
:mod:`data.discovery.load`. :class:`SkipReport` lives in :mod:`data.report`.
New code should import from those homes.
"""

from data.discovery import (
    ALL_CLASS_NAMES,
    grade_from_folder,
    load_records,
    magnification_from_name,
    patient_from_name,
    read_manifest,
    resolve_classes,
    scan_tree,
    verify_records,
)
from data.report import WITHHELD_REASON, SkipReport

__all__ = [
    "ALL_CLASS_NAMES",
    "WITHHELD_REASON",
    "SkipReport",
    "grade_from_folder",
    "load_records",
    "magnification_from_name",
    "patient_from_name",
    "read_manifest",
    "resolve_classes",
    "scan_tree",
    "verify_records",
]
