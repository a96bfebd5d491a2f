"""Nuclei: tumour nuclei of a nuclear grade, stromal fibroblasts and lymphocytes, and their haematoxylin.

Nuclei too small to show a shape at low magnification are splatted as dots of
the same dye mass instead of rasterised.
"""

from __future__ import annotations

import numpy as np

from data.synthetic.grades import _NuclearLook
from data.synthetic.shapes import _Nuclei, _rasterise, _wobble


def _make_nuclei(
    rng: np.random.Generator,
    spots: np.ndarray,
    radius: float,
    radius_cv: float,
    elongation: float,
    elongation_cv: float,
    roughness: float,
    density: float,
    chromatin: float,
) -> _Nuclei:
    """Nuclei at ``spots`` ((N, 3): x, y, orientation), sizes and shapes drawn around the means."""
    n = len(spots)
    r = radius * np.exp(np.clip(rng.normal(0.0, radius_cv, n), -0.7, 0.7))
    e = 1.0 + (elongation - 1.0) * np.exp(rng.normal(0.0, elongation_cv, n))
    # Darker nuclei also vary more in darkness: hyperchromasia is patchy.
    dens = density * np.exp(rng.normal(0.0, 0.05 + radius_cv / 3, n))
    return _Nuclei(
        spots[:, 0],
        spots[:, 1],
        r * np.sqrt(e),
        r / np.sqrt(e),
        spots[:, 2],
        _wobble(rng, n, roughness, 1),
        dens,
        np.full(n, chromatin),
    )


def _tumour_nuclei(rng: np.random.Generator, spots: np.ndarray, look: _NuclearLook, unit: float) -> _Nuclei:
    """Tumour nuclei of one nuclear grade; a fraction become mitotic figures."""
    nuclei = _make_nuclei(
        rng,
        spots,
        look.radius * unit,
        look.radius_cv,
        look.elongation,
        look.elongation_cv,
        look.roughness,
        look.density,
        look.chromatin,
    )
    mitotic = rng.random(len(spots)) < look.mitoses
    # A metaphase plate: a small, ragged, very dark bar.
    nuclei.a[mitotic] *= 0.9
    nuclei.b[mitotic] *= 0.35
    nuclei.density[mitotic] *= 2.2
    nuclei.harmonics[mitotic] = _wobble(rng, int(mitotic.sum()), 0.3, 1)
    return nuclei


def _scatter(rng: np.random.Generator, mask: np.ndarray, spacing: float, keep: float = 1.0) -> np.ndarray:
    """Points on a jittered grid inside a boolean mask: (N, 3) of x, y, random orientation."""
    size = mask.shape[0]
    spacing = max(spacing, 0.5)
    axis = np.arange(0.0, size, spacing) + rng.uniform(0, spacing)
    gx, gy = (g.ravel() for g in np.meshgrid(axis, axis))
    gx = gx + rng.uniform(-0.45, 0.45, gx.size) * spacing
    gy = gy + rng.uniform(-0.45, 0.45, gy.size) * spacing
    inside = mask[np.clip(gy, 0, size - 1).astype(int), np.clip(gx, 0, size - 1).astype(int)]
    inside &= rng.random(gx.size) < keep
    angle = rng.uniform(0.0, np.pi, int(inside.sum()))
    return np.stack([gx[inside], gy[inside], angle], axis=1)


def _stromal_nuclei(rng: np.random.Generator, stroma: np.ndarray, unit: float, fibre_angle: float) -> _Nuclei:
    """Fibroblasts (slim, along the fibres) and lymphocytes (small, round, dark) in the stroma."""
    spots = _scatter(rng, stroma, 40.0 * unit, keep=0.55)
    lymph = rng.random(len(spots)) < 0.4
    spots[~lymph, 2] = fibre_angle + rng.normal(0.0, 0.25, int((~lymph).sum()))
    fibro = _make_nuclei(rng, spots[~lymph], 7.0 * unit, 0.15, 4.0, 0.3, 0.05, 0.9, 0.1)
    lymphs = _make_nuclei(rng, spots[lymph], 5.5 * unit, 0.08, 1.1, 0.2, 0.03, 1.45, 0.05)
    return _Nuclei.join([fibro, lymphs])


def _nuclear_haematoxylin(nuclei: _Nuclei, size: int, grain: np.ndarray, sharpness: float) -> np.ndarray:
    """Haematoxylin of the nuclei; overlapping nuclei add up, as optical densities do.

    Args:
        nuclei: The nuclei.
        size: Side of the square image.
        grain: Noise in [0, 1] (size x size) read as chromatin texture.
        sharpness: Width of the nuclear edge in px.
    """
    # Nuclei of a pixel or two show no shape: their dye is spread over a few pixels.
    tiny = nuclei.a * nuclei.b < 4.0
    dots = nuclei.take(tiny)
    hema = np.zeros((size, size), np.float32)
    if len(dots):
        hema += _splat(dots.x, dots.y, dots.density * np.pi * dots.a * dots.b, size)
    nuclei = nuclei.take(~tiny)
    texture = grain.ravel()

    def shade(part: _Nuclei, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
        f32 = np.float32
        edge = (part.b / sharpness).astype(f32)[:, None, None]
        fill = np.clip((1.0 - rho) * edge + f32(0.5), 0.0, 1.0)
        # A slightly darker rim for the nuclear membrane...
        rim = np.minimum(rho, 1.0)
        rim *= rim
        fill *= rim * f32(0.3) + f32(0.8)
        # ...and chromatin clumps: density * (1 + chromatin * (2 * texture - 1)).
        clumps = (2.0 * part.density * part.chromatin).astype(f32)[:, None, None]
        dye = (texture[index] - f32(0.5)) * clumps + part.density.astype(f32)[:, None, None]
        return [fill * dye]

    return hema + _rasterise(nuclei, size, shade)[0]


def _splat(x: np.ndarray, y: np.ndarray, mass: np.ndarray, size: int) -> np.ndarray:
    """Spread point masses over their four nearest pixels, then over a 3x3 neighbourhood."""
    col, row = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - col, y - row
    canvas = np.zeros(size * size)
    for dr, dc, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        r, c = row + dr, col + dc
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        canvas += np.bincount(r[ok] * size + c[ok], (mass * weight)[ok], minlength=size * size)
    spots = canvas.reshape(size, size).astype(np.float32)
    # A [1, 2, 1] / 4 blur along each axis gives each dot a nucleus-sized footprint.
    for axis in (0, 1):
        spots = _blur121(spots, axis)
    return spots


def _blur121(image: np.ndarray, axis: int) -> np.ndarray:
    """Smooth along one axis with weights [1, 2, 1] / 4, repeating the edge pixels."""
    padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(2)], mode="edge")
    lead = [slice(None)] * 2
    parts = []
    for start in (0, 1, 2):
        lead[axis] = slice(start, start + image.shape[axis])
        parts.append(padded[tuple(lead)])
    return 0.25 * parts[0] + 0.5 * parts[1] + 0.25 * parts[2]
