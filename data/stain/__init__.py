"""Batched stain normalization of H&E patches in torch: Macenko and Reinhard.

Both normalizers take uint8 batches (B, 3, H, W) on any device and return
uint8 batches of the same shape on the same device. Every image of a batch is
handled independently and without a Python loop over images: per-image
statistics are computed with masks over the whole batch at once.

Images on which a method is not defined (background only, a single colour, too
few tissue pixels, a degenerate stain estimate) come back unchanged and are
counted in the normalizer's ``num_degenerate``; no output is ever NaN.

The package holds ``batching`` (``StainNormalizer``, the engine both methods
share), ``colour`` (sRGB, CIE-LAB and optical density), ``percentiles`` (per-row
percentiles without sorting), ``macenko`` and ``reinhard``. This module is the
public face: it re-exports what callers import from ``data.stain``.
"""

from __future__ import annotations

from data.stain.batching import ImageLike, StainNormalizer
from data.stain.colour import lab_to_rgb, rgb_to_lab
from data.stain.macenko import (
    MACENKO_ALPHA,
    MACENKO_BETA,
    MACENKO_HE_REF,
    MACENKO_IO,
    MACENKO_MAX_C_PERCENTILE,
    MACENKO_MAX_C_REF,
    Macenko,
)
from data.stain.reinhard import REINHARD_MEAN_REF, REINHARD_STD_REF, Reinhard

__all__ = [
    "MACENKO_ALPHA",
    "MACENKO_BETA",
    "MACENKO_HE_REF",
    "MACENKO_IO",
    "MACENKO_MAX_C_PERCENTILE",
    "MACENKO_MAX_C_REF",
    "NORMALIZERS",
    "REINHARD_MEAN_REF",
    "REINHARD_STD_REF",
    "ImageLike",
    "Macenko",
    "Reinhard",
    "StainNormalizer",
    "build_normalizer",
    "lab_to_rgb",
    "rgb_to_lab",
]

#: Names accepted by ``build_normalizer``.
NORMALIZERS: tuple[str, ...] = ("macenko", "reinhard", "none")


def build_normalizer(name: str, **kwargs) -> Macenko | Reinhard | None:
    """A stain normalizer by name: ``"macenko"``, ``"reinhard"`` or ``"none"`` (returns None).

    Keyword arguments go to the normalizer's constructor.
    """
    key = str(name).strip().lower()
    if key == "macenko":
        return Macenko(**kwargs)
    if key == "reinhard":
        return Reinhard(**kwargs)
    if key == "none":
        return None
    raise ValueError(f"unknown stain normalizer {name!r}; allowed: {', '.join(NORMALIZERS)}")
