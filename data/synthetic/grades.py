"""How each grade shows, as tables of architecture and nuclear cues, and the length scale they are given in.

Grades show at two scales:

* Architecture, seen in a context window (about 320x320 px): Grade I has
  round, separate glands whose lumen is ringed by a single, regular row of
  polarised nuclei; Grade II has elongated, irregular, fused and cribriform
  glands with stratified nuclei; Grade III has solid sheets of cells and only
  the odd abortive lumen.
* Nuclei, seen in a detail window (about 224x224 px): size, pleomorphism
  (spread of size and shape), boundary roughness, chromatin clumping and
  hyperchromasia (haematoxylin density) all rise with grade; Grade III adds
  mitotic figures.

Each cue is informative but imperfect: every image draws its architecture and
nuclear grades independently with :func:`draw_cue_grade`, so a model that
reads both scales has something to gain over one that reads either.

Lengths are given at 40x on an 800 px image and scaled by magnification: at
40x a gland fills much of the image and nuclei are tens of pixels long; at 4x
glands are small and many and nuclei are a pixel or two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.records import GRADE_NAMES

#: Probability that an image's architecture (or nuclear) cue shows its true grade.
CUE_AGREEMENT = 0.75
#: Image size at which the structure sizes below are given.
_REFERENCE_SIZE = 800
#: Length scale of each magnification relative to 40x.
_MAG_SCALE = {"4x": 0.1, "10x": 0.25, "20x": 0.5, "40x": 1.0}
#: Outer radius of an average gland, in pixels at 40x and 800 px.
_GLAND_RADIUS = 250.0


@dataclass(frozen=True)
class _Architecture:
    """How glands are built at one architecture grade (Grades I and II)."""

    spacing: float  # distance between gland centres, in gland radii
    jitter: float  # centre jitter, in grid steps
    radius_cv: float  # spread of gland sizes
    aspect: tuple[float, float]  # range of long/short axis ratios
    wobble: float  # boundary irregularity
    wall: float  # epithelial wall thickness, fraction of the radius
    layers: int  # rows of nuclei along the wall (stratification)
    disorder: float  # loss of nuclear polarity: orientation noise in radians
    cribriform: float  # probability that a gland is cribriform
    debris: float  # eosinophilic debris in lumens ("dirty necrosis")


@dataclass(frozen=True)
class _NuclearLook:
    """How tumour nuclei look at one nuclear grade; lengths at 40x and 800 px."""

    radius: float  # mean area-equivalent radius
    radius_cv: float  # pleomorphism of size
    elongation: float  # mean long/short axis ratio
    elongation_cv: float  # pleomorphism of shape
    roughness: float  # boundary irregularity
    density: float  # haematoxylin concentration (hyperchromasia)
    chromatin: float  # amplitude of chromatin clumping
    mitoses: float  # fraction drawn as mitotic figures


_GLANDULAR = (
    _Architecture(2.7, 0.18, 0.18, (1.0, 1.5), 0.04, 0.30, 1, 0.08, 0.0, 0.03),
    _Architecture(1.9, 0.35, 0.30, (1.5, 2.8), 0.13, 0.42, 2, 0.5, 0.3, 0.15),
)
_SHEET_DEBRIS = 0.2
_NUCLEAR = (
    _NuclearLook(10.0, 0.08, 2.0, 0.10, 0.03, 0.80, 0.12, 0.0),
    _NuclearLook(13.0, 0.18, 1.6, 0.25, 0.08, 1.05, 0.25, 0.003),
    _NuclearLook(16.0, 0.28, 1.35, 0.40, 0.11, 1.25, 0.40, 0.025),
)


def draw_cue_grade(grade: int, rng: np.random.Generator) -> int:
    """A cue's grade: ``grade`` with probability ``CUE_AGREEMENT``, else an adjacent grade."""
    if rng.random() < CUE_AGREEMENT:
        return grade
    top = len(GRADE_NAMES) - 1
    if grade == 0 or grade == top:
        return 1 if grade == 0 else top - 1
    return grade - 1 if rng.random() < 0.5 else grade + 1
