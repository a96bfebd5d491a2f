"""A hospital's stain and microscope (:class:`StainProfile`), and the Beer-Lambert step that turns stain into light.

A profile is a :class:`data.labs.LabStain` (the lab's dye colours and gains,
shared with :mod:`data.sites`) plus what the renderer adds on top: the glass
brightness and camera white balance, focus, and vignetting. Light through the
section is ``I = Io * exp(-(c_H * v_H + c_E * v_E))`` per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from data.labs import STANDARD_EOSIN, STANDARD_HAEMATOXYLIN, LabStain, rotate_vector
from data.synthetic.spec import _STAIN_STREAM

#: Turn between the stain-strength directions of successive hospitals (radians).
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


@dataclass(frozen=True)
class StainProfile(LabStain):
    """How one lab's staining and microscope turn stain amounts into colour.

    The lab's stain (``haematoxylin``, ``eosin``, ``h_gain``, ``e_gain``) is a
    :class:`data.labs.LabStain`; the fields below are the microscope's.

    Attributes:
        background: Light through bare glass per channel, 0-255.
        sharpness: Width in pixels of nuclear edges (focus): larger is softer.
        vignette: Fraction of light lost in the image corners.
    """

    background: tuple[float, float, float] = (248.0, 248.0, 248.0)
    sharpness: float = 1.0
    vignette: float = 0.0

    @property
    def h_strength(self) -> float:
        """Multiplier on haematoxylin amounts: the lab stain's ``h_gain``, under the renderer's name."""
        return self.h_gain

    @property
    def e_strength(self) -> float:
        """Multiplier on eosin amounts: the lab stain's ``e_gain``, under the renderer's name."""
        return self.e_gain

    @classmethod
    def for_hospital(cls, seed: int, hospital: int) -> StainProfile:
        """The profile of hospital number ``hospital`` (0 is ``H1``, nearest to standard H&E).

        The other labs differ in dye strengths along directions spread by the
        golden angle, so that no two of the first few labs stain alike.
        """
        rng = np.random.default_rng([seed, _STAIN_STREAM, hospital])
        spread = 0.15 if hospital == 0 else 1.0
        offset = np.random.default_rng([seed, _STAIN_STREAM]).uniform(0.0, 2 * np.pi)
        direction = offset + hospital * _GOLDEN_ANGLE
        strength = rng.uniform(0.25, 0.45) * spread
        # Camera white balance: a per-channel gain on the light.
        balance = 1.0 + np.array([_signed(rng, 0.015, 0.045) for _ in range(3)]) * spread
        light = np.clip(rng.uniform(236.0, 252.0) * balance, 220.0, 255.0)
        # Keyword order is draw order: the stain turns are drawn after the light, H before E.
        return cls(
            haematoxylin=rotate_vector(STANDARD_HAEMATOXYLIN, rng.uniform(6.0, 14.0) * spread, rng),
            eosin=rotate_vector(STANDARD_EOSIN, rng.uniform(6.0, 14.0) * spread, rng),
            h_gain=float(np.exp(strength * math.cos(direction))),
            e_gain=float(np.exp(strength * math.sin(direction))),
            background=tuple(float(v) for v in light),
            sharpness=float(rng.uniform(0.8, 1.0 + 0.8 * spread)),
            vignette=float(rng.uniform(0.0, 0.12 * spread)),
        )

    def jittered(self, rng: np.random.Generator, amount: float = 0.05) -> StainProfile:
        """A slide of this lab: stain strengths varied by about ``amount`` (relative)."""
        return StainProfile(
            self.haematoxylin,
            self.eosin,
            h_gain=self.h_gain * float(np.exp(rng.normal(0.0, amount))),
            e_gain=self.e_gain * float(np.exp(rng.normal(0.0, amount))),
            background=self.background,
            sharpness=self.sharpness,
            vignette=self.vignette,
        )


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    """A magnitude in [low, high) with a random sign."""
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


@lru_cache(maxsize=8)
def _radial(size: int) -> np.ndarray:
    """Squared distance from the image centre, 1 at the corners."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return (axis[None, :] ** 2 + axis[:, None] ** 2) / 2.0


def _to_rgb(hema: np.ndarray, eos: np.ndarray, stain: StainProfile, rng: np.random.Generator) -> np.ndarray:
    """Light through the stained section (Beer-Lambert), with vignetting and sensor noise."""
    size = hema.shape[0]
    grit = (rng.random(hema.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.04)
    hema = np.maximum(hema + grit, 0.0) * np.float32(stain.h_gain)
    eos = np.maximum(eos + grit, 0.0) * np.float32(stain.e_gain)
    light = (1.0 - stain.vignette * _radial(size)).astype(np.float32)
    rgb = np.empty((size, size, 3), np.uint8)
    for channel in range(3):
        od = hema * np.float32(-stain.haematoxylin[channel])
        od -= eos * np.float32(stain.eosin[channel])
        value = np.exp(od, out=od)
        value *= light
        value *= np.float32(stain.background[channel])
        value += np.float32(0.5)
        rgb[..., channel] = np.clip(value, 0.0, 255.0, out=value)
    return rgb
