"""Smooth random fields the renderer builds textures from: value noise, collagen fibres, the section outline.

They are drawn on small grids and enlarged with PIL, which is far cheaper than
drawing at full size and looks the same for textures this smooth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def _noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth value noise in about [0, 1]: random grid values upsampled bicubically.

    Args:
        rng: Source of the grid values.
        size: Side of the square field.
        cells: Features across the field (clamped to [2, size]).
    """
    count = int(min(max(cells, 2), size))
    grid = rng.random((count, count), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def _layered_noise(rng: np.random.Generator, size: int, octaves: Sequence[tuple[float, float]]) -> np.ndarray:
    """A weighted sum of smooth noises, as ``sum(weight * _noise(rng, size, cells))``.

    The coarse layers are summed on the finest layer's small grid and the sum
    enlarged once, which saves a full-size resize per layer.

    Args:
        rng: Source of the grid values.
        size: Side of the square field.
        octaves: ``(cells, weight)`` pairs.
    """
    finest = int(min(max(max(cells for cells, _ in octaves), 2), size))
    total = np.zeros((finest, finest), np.float32)
    for cells, weight in octaves:
        total += np.float32(weight) * _noise(rng, finest, min(cells, finest))
    return np.asarray(Image.fromarray(total).resize((size, size), Image.BICUBIC))


def _fibres(rng: np.random.Generator, size: int, unit: float) -> tuple[np.ndarray, float]:
    """Streaky collagen texture in about [0, 1], and the direction of its streaks (radians).

    A small grid of random values, long along the fibres and short across
    them, is mapped onto a half-resolution image turned by a random angle, then
    enlarged: turning is the costly step and the texture is smooth anyway.
    """
    half = max(size // 2, 2)
    span = 1.42 * half  # the image diagonal, so the turned grid covers every corner
    across = int(min(max(span / max(2.0 * unit, 1.0), 2), half))
    along = int(max(span / max(35.0 * unit, 2.0), 2))
    theta = float(rng.uniform(0.0, np.pi))
    c, s = math.cos(theta), math.sin(theta)
    k_along, k_across, mid = along / span, across / span, half / 2.0
    # Output (x, y) -> grid (along, across): a rotation, a scaling and a shift.
    affine = (
        c * k_along,
        s * k_along,
        along / 2.0 - mid * (c + s) * k_along,
        -s * k_across,
        c * k_across,
        across / 2.0 - mid * (c - s) * k_across,
    )
    grid = Image.fromarray(rng.random((across, along), dtype=np.float32))
    turned = grid.transform((half, half), Image.AFFINE, affine, resample=Image.BILINEAR)
    return np.asarray(turned.resize((size, size), Image.BICUBIC)), theta


def _tissue_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft mask of the tissue section (ragged edges and holes, 65-95 % of the image).

    Returns:
        The mask and the smooth field it was cut from, which doubles as the
        section's thickness (thicker away from its edges).
    """
    field = _layered_noise(rng, size, ((4, 0.65), (9, 0.28), (40, 0.07)))
    # A tilt pushes the glass to one side, like the edge of a section.
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(0.0, 0.35)
    field = field + (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
    cut = np.quantile(field[::4, ::4], 1.0 - rng.uniform(0.65, 0.95))
    return np.clip((field - cut) * (size / 3.0) + 0.5, 0.0, 1.0), field
