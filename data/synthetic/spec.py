"""What a synthetic dataset is: its spec, its folder layout and manifest, and the plan of its images.

Everything here is decided before a pixel is drawn. The plan fixes which
images exist and where they go; the seed-stream tags fix which random stream
each kind of draw uses, so stain, slide and image draws never share one and a
spec always gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data.limits import check_int
from data.records import GRADE_NAMES, MAGNIFICATIONS

#: Bumped whenever rendering changes, so cached datasets are not reused. 2: datasets rendered under 1 by
#: early revisions differ from what the renderer now gives for the same spec (found comparing bytes).
GENERATOR_VERSION = 2
#: Class folder names of CRC-HGD, in label order.
CLASS_FOLDERS: tuple[str, ...] = (
    "CRC_Grade__1__Well_Diff",
    "CRC_Grade__2__Mod_Diff",
    "CRC_Grade__3__Poorly_Diff",
)
MANIFEST_NAME = "manifest.csv"
SPEC_NAME = "spec.json"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "magnification", "patient", "hospital")
#: Seed-stream tags, so stain, slide and image draws never share a stream.
_STAIN_STREAM, _SLIDE_STREAM, _IMAGE_STREAM = 11, 12, 13
assert len(CLASS_FOLDERS) == len(GRADE_NAMES)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render; everything else follows deterministically.

    Attributes:
        num_hospitals: Hospitals (federated clients), named ``H1``, ``H2``, ...
        patients_per_grade: Patients of each grade in every hospital.
        images_per_patient: Images per patient, spread over the magnifications.
        image_size: Side of the square images in pixels.
        magnifications: Magnification folders to use, a subset of ``MAGNIFICATIONS``.
        seed: Root of every random draw.
        jpeg_quality: JPEG quality of the written images.
    """

    num_hospitals: int = 3
    patients_per_grade: int = 4
    images_per_patient: int = 4
    image_size: int = 800
    magnifications: tuple[str, ...] = ("4x", "10x", "20x", "40x")
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Configs arrive as lists from JSON/TOML; a tuple keeps the spec hashable.
        if isinstance(self.magnifications, list):
            object.__setattr__(self, "magnifications", tuple(self.magnifications))
        check_int("SyntheticSpec.num_hospitals", self.num_hospitals, 1, 99)
        check_int("SyntheticSpec.patients_per_grade", self.patients_per_grade, 1, 999 // len(GRADE_NAMES))
        check_int("SyntheticSpec.images_per_patient", self.images_per_patient, 1, 999)
        check_int("SyntheticSpec.image_size", self.image_size, 64, 4096)
        check_int("SyntheticSpec.seed", self.seed, 0, 2**63 - 1)
        check_int("SyntheticSpec.jpeg_quality", self.jpeg_quality, 1, 100)
        mags = self.magnifications
        if (
            not isinstance(mags, tuple)
            or not mags
            or any(m not in MAGNIFICATIONS for m in mags)
            or len(set(mags)) != len(mags)
        ):
            raise ValueError(
                f"SyntheticSpec.magnifications must be a non-empty tuple of distinct "
                f"values from {MAGNIFICATIONS}; got {mags!r}"
            )

    def to_dict(self) -> dict:
        """The spec as plain JSON-ready values."""
        out = asdict(self)
        out["magnifications"] = list(self.magnifications)
        return out


def spec_document(spec: SyntheticSpec) -> dict:
    """What ``spec.json`` holds: the spec and the generator version."""
    return {"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()}


def default_root(spec: SyntheticSpec) -> Path:
    """Default dataset folder: ``$FEDSIM_CACHE`` (else ``~/.cache/fedsim``)/``synthetic-<hash>``.

    The hash covers the spec and ``GENERATOR_VERSION``, so a changed spec or
    renderer never reuses an old dataset.
    """
    base = os.environ.get("FEDSIM_CACHE") or str(Path.home() / ".cache" / "fedsim")
    text = json.dumps(spec_document(spec), sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Path(base).expanduser() / f"synthetic-{digest}"


@dataclass(frozen=True)
class PlannedImage:
    """One image to write, and its manifest row."""

    grade: int
    magnification: str
    hospital: int  # 0-based; named H1, H2, ...
    patient: int  # 0-based within the hospital
    image: int  # 0-based within the patient

    @property
    def hospital_name(self) -> str:
        """``H1``, ``H2``, ..."""
        return f"H{self.hospital + 1}"

    @property
    def patient_id(self) -> str:
        """Patient identifier, unique across hospitals, e.g. ``H1-P007``."""
        return f"{self.hospital_name}-P{self.patient + 1:03d}"

    @property
    def relpath(self) -> str:
        """Path relative to the dataset root, with forward slashes."""
        stem = self.patient_id.replace("-", "_")
        name = f"{stem}_{self.magnification}_{self.image + 1}.jpg"
        return f"{CLASS_FOLDERS[self.grade]}/{self.magnification}/{name}"

    def row(self) -> dict[str, str]:
        """The manifest row."""
        return {
            "path": self.relpath,
            "label": str(self.grade),
            "magnification": self.magnification,
            "patient": self.patient_id,
            "hospital": self.hospital_name,
        }


def plan(spec: SyntheticSpec) -> list[PlannedImage]:
    """Every image of the dataset, in writing order.

    Each hospital numbers its patients grade by grade; a patient's images
    cycle through the magnifications, starting at a patient-dependent one so
    that magnifications stay balanced when there are fewer images than
    magnifications.
    """
    mags = spec.magnifications
    items = []
    for hospital in range(spec.num_hospitals):
        for grade in range(len(GRADE_NAMES)):
            for k in range(spec.patients_per_grade):
                patient = grade * spec.patients_per_grade + k
                items.extend(
                    PlannedImage(grade, mags[(patient + i) % len(mags)], hospital, patient, i)
                    for i in range(spec.images_per_patient)
                )
    return items
