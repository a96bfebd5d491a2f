"""Simulated lab differences ("site profiles") for pooled datasets.

Hospitals differ in how their slides look: dye batches and staining protocols
turn the haematoxylin and eosin colours and change how much dye binds;
microscopes and scanners differ in light, focus and compression. A federation
built by cutting one pooled dataset (CRC-HGD has no hospital column) into
hospitals has label skew at most, not this feature shift. A
:class:`SiteProfile` imitates one lab and is applied to every image of its
hospital before tissue masking, stain normalization and caching, so the
simulated hospitals see the same tissue through different labs. Its stain
part is a :class:`data.labs.LabStain`, the same model of a lab's dyes the
synthetic renderer uses.

An image is changed in the order a slide is made and read:

1. Stain (Beer-Lambert): the image's optical density ``OD = -ln((I + 1) / 256)``
   is unmixed into Ruifrok & Johnston's (2001) haematoxylin and eosin vectors
   and a residual (their cross product), and mixed back with the lab's own
   haematoxylin and eosin vectors (turned by a few degrees) and dye strengths;
   the residual is kept.
2. Light: the transmitted light is scaled by ``brightness``.
3. Focus: Gaussian blur of ``blur_sigma`` pixels.
4. Compression: JPEG re-encoding at ``jpeg_quality``.

A profile is drawn from ``(seed, hospital name, strength)`` alone, so every
rank, run and cache build gives one hospital the same lab. Strength 0 is no
change at all; strength 1 is a typical spread between labs; 4 is the most
allowed. Any strength above 0 re-encodes as JPEG (quality 95 at the
smallest strengths).
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from data.files import write_atomic
from data.labs import STANDARD_EOSIN, STANDARD_HAEMATOXYLIN, LabStain, rotate_vector, stain_basis, unit_vector
from data.limits import MAX_SITE_SHIFT

# The standard stain vectors and their helpers belong to data.labs; data.benchmark and callers import them from here.
__all__ = [
    "STANDARD_EOSIN",
    "STANDARD_HAEMATOXYLIN",
    "SiteProfile",
    "rotate_vector",
    "site_profile",
    "stain_basis",
    "unit_vector",
    "write_site_profiles",
]

_SITE_STREAM = 21  # random-stream tag of site profiles (the generator uses 11-13)

# Ranges at strength 1 (each scales linearly with strength).
_MAX_TURN_DEGREES = 8.0  # stain-vector rotation, drawn in [0.25, 1] x this
_GAIN_SPREAD = 0.2  # log dye-strength standard deviation
_BRIGHTNESS_SPREAD = 0.08  # brightness factor in 1 +- this
_MAX_BLUR_SIGMA = 1.0  # pixels
_JPEG_BEST, _JPEG_DROP = 95, 35  # quality 95 minus up to 35


@dataclass(frozen=True)
class SiteProfile(LabStain):
    """How one simulated lab changes an image (see the module docstring).

    The lab's stain (``haematoxylin``, ``eosin``, ``h_gain``, ``e_gain`` and
    ``stain_transform``) is a :class:`data.labs.LabStain`; the fields below are
    the microscope and scanner.

    Attributes:
        brightness: Multiplier on transmitted light.
        blur_sigma: Gaussian blur, pixels; 0 is none.
        jpeg_quality: JPEG re-encoding quality (1-95); 0 is none.
    """

    brightness: float = 1.0
    blur_sigma: float = 0.0
    jpeg_quality: int = 0

    @classmethod
    def for_hospital(cls, seed: int, hospital: str, strength: float) -> SiteProfile:
        """The lab of ``hospital`` at ``strength`` (>= 0), fixed by ``(seed, hospital)``.

        Every hospital draws the same quantities from its own random stream, so
        a profile does not depend on which other hospitals exist; strength
        scales every departure from standard H&E.
        """
        if not 0 <= strength <= MAX_SITE_SHIFT:  # also refuses NaN and infinity
            raise ValueError(f"site strength must lie in [0, {MAX_SITE_SHIFT:g}], got {strength}")
        if strength == 0:
            return cls()
        rng = np.random.default_rng([seed, _SITE_STREAM, zlib.crc32(hospital.encode("utf-8"))])
        turn_h, turn_e = rng.uniform(0.25, 1.0, 2) * _MAX_TURN_DEGREES * strength
        spread = _GAIN_SPREAD * strength
        gain_h, gain_e = np.exp(np.clip(rng.normal(0.0, spread, 2), -2.5 * spread, 2.5 * spread))
        brightness = 1.0 + rng.uniform(-1.0, 1.0) * _BRIGHTNESS_SPREAD * strength
        blur = rng.uniform(0.0, 1.0) * _MAX_BLUR_SIGMA * strength
        quality = _JPEG_BEST - rng.uniform(0.0, 1.0) * _JPEG_DROP * strength
        return cls(
            haematoxylin=rotate_vector(STANDARD_HAEMATOXYLIN, turn_h, rng),
            eosin=rotate_vector(STANDARD_EOSIN, turn_e, rng),
            h_gain=float(gain_h),
            e_gain=float(gain_e),
            brightness=float(max(brightness, 0.05)),
            blur_sigma=float(blur),
            jpeg_quality=int(np.clip(round(quality), 1, _JPEG_BEST)),
        )

    @property
    def is_identity(self) -> bool:
        """True when ``apply`` returns its input unchanged."""
        return self == SiteProfile()

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """This lab's version of a uint8 HxWx3 image (a new array; the input is not modified)."""
        arr = np.asarray(rgb)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"a site profile applies to uint8 HxWx3 images, got {arr.dtype} {arr.shape}")
        if self.is_identity:
            return arr.copy()
        out = self._restain(arr)
        if self.blur_sigma > 0:
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=self.blur_sigma)))
        if self.jpeg_quality > 0:
            out = _jpeg_round_trip(out, self.jpeg_quality)
        return np.ascontiguousarray(out)

    def _restain(self, arr: np.ndarray) -> np.ndarray:
        """Stain and light: every colour maps through a table of its 256 levels and one 3x3 mix."""
        log_levels = np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # -OD of each level
        minus_od = log_levels[arr].reshape(-1, 3)
        mixed = minus_od @ self.stain_transform().astype(np.float32)
        light = np.exp(mixed + np.float32(math.log(self.brightness))) * 256.0 - 1.0
        return np.clip(np.rint(light), 0, 255).astype(np.uint8).reshape(arr.shape)

    def describe(self) -> str:
        """One line for logs."""
        turn_h, turn_e = self.turns()
        return (
            f"H turned {turn_h:.1f} deg x{self.h_gain:.2f}, E turned {turn_e:.1f} deg x{self.e_gain:.2f}, "
            f"light x{self.brightness:.2f}, blur {self.blur_sigma:.2f} px, "
            f"JPEG {'off' if not self.jpeg_quality else f'q{self.jpeg_quality}'}"
        )

    def to_dict(self) -> dict:
        """The profile as plain JSON-ready values."""
        return asdict(self)


@lru_cache(maxsize=256)
def site_profile(seed: int, hospital: str, strength: float) -> SiteProfile:
    """``SiteProfile.for_hospital``, remembered (a cache build asks once per image)."""
    return SiteProfile.for_hospital(seed, hospital, strength)


def write_site_profiles(path: str | Path, hospitals: Sequence[str], seed: int, strength: float) -> list[str]:
    """Write every hospital's profile to a JSON file; returns one describing line per hospital."""
    profiles = {h: site_profile(seed, h, strength) for h in hospitals}
    document = {"site_shift": strength, "seed": seed, "hospitals": {h: p.to_dict() for h, p in profiles.items()}}
    write_atomic(path, json.dumps(document, indent=2) + "\n")
    return [f"  {h}: {p.describe()}" for h, p in profiles.items()]


def _jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` encoded as JPEG at ``quality`` and decoded again."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"))
