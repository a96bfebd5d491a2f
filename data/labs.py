"""A lab's stain: the one model of how a hospital's haematoxylin and eosin differ from standard H&E.

Labs differ in the dyes they buy and how long they stain: each dye's colour
(its unit optical-density vector) is turned a little from Ruifrok & Johnston's
(2001), and each binds more or less strongly (a gain on its amount). Two parts
of the code need that: the synthetic renderer (:mod:`data.synthetic`), which
stains its tissue with each hospital's dyes, and the site profiles
(:mod:`data.sites`), which re-stain real images as another lab would. Both
profiles are a :class:`LabStain` with their own optics added, so "a lab's
stain" is defined once, here, with the vector helpers both draw with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin.
STANDARD_HAEMATOXYLIN = (0.65, 0.70, 0.29)
STANDARD_EOSIN = (0.07, 0.99, 0.11)


def unit_vector(vector: Sequence[float]) -> tuple[float, float, float]:
    """``vector`` scaled to length 1."""
    v = np.asarray(vector, dtype=np.float64)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def rotate_vector(vector: Sequence[float], degrees: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """``vector`` turned by ``degrees`` towards a random direction, kept positive and unit.

    Optical densities cannot be negative, so directions that would push a
    component below 0.02 (eosin's red and blue are small) are redrawn.
    """
    v = np.asarray(unit_vector(vector))
    angle = math.radians(degrees)
    for _ in range(100):
        w = rng.standard_normal(3)
        w -= w.dot(v) * v
        turned = v * math.cos(angle) + w / np.linalg.norm(w) * math.sin(angle)
        if turned.min() >= 0.02:
            return unit_vector(turned)
    return unit_vector(v)  # no admissible direction: keep the vector as it is


def stain_basis(haematoxylin: Sequence[float], eosin: Sequence[float]) -> np.ndarray:
    """Rows: unit haematoxylin, unit eosin and their unit cross product (the residual), float64 (3, 3)."""
    h, e = np.asarray(unit_vector(haematoxylin)), np.asarray(unit_vector(eosin))
    return np.stack([h, e, np.asarray(unit_vector(np.cross(h, e)))])


def angle_between(a: Sequence[float], b: Sequence[float]) -> float:
    """Angle in degrees between two vectors."""
    cos = float(np.clip(np.dot(unit_vector(a), unit_vector(b)), -1.0, 1.0))
    return math.degrees(math.acos(cos))


@dataclass(frozen=True)
class LabStain:
    """One lab's two dyes: their colours and how strongly they stain. The defaults are standard H&E.

    Profiles that add a lab's optics (:class:`data.synthetic.StainProfile`,
    :class:`data.sites.SiteProfile`) subclass this, so these fields come first
    in theirs.

    Attributes:
        haematoxylin: Unit optical-density vector (R, G, B) of the lab's haematoxylin.
        eosin: Unit optical-density vector (R, G, B) of the lab's eosin.
        h_gain: Multiplier on haematoxylin amounts (dye batch, staining time).
        e_gain: Multiplier on eosin amounts.
    """

    haematoxylin: tuple[float, float, float] = unit_vector(STANDARD_HAEMATOXYLIN)
    eosin: tuple[float, float, float] = unit_vector(STANDARD_EOSIN)
    h_gain: float = 1.0
    e_gain: float = 1.0

    def turns(self) -> tuple[float, float]:
        """Degrees by which this lab's haematoxylin and eosin are turned from standard H&E."""
        return angle_between(self.haematoxylin, STANDARD_HAEMATOXYLIN), angle_between(self.eosin, STANDARD_EOSIN)

    def stain_transform(self) -> np.ndarray:
        """(3, 3) matrix T with ``OD_lab = OD @ T`` for row-vector ODs (standard stains -> this lab's)."""
        standard = stain_basis(STANDARD_HAEMATOXYLIN, STANDARD_EOSIN)
        lab = stain_basis(self.haematoxylin, self.eosin)
        lab[0] *= self.h_gain
        lab[1] *= self.e_gain
        lab[2] = standard[2]  # what neither stain explains stays as it was
        # OD = C @ standard for row vectors of amounts C, so C = OD @ inv(standard) and OD_lab = C @ lab
        return np.linalg.inv(standard) @ lab
