"""Where the tissue compartments of one image lie: glands with their lining nuclei, or solid sheets of cells.

Grades I and II build glands from the architecture tables of
:mod:`data.synthetic.grades`; Grade III builds sheets and nests from a noise
field with the odd abortive lumen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.synthetic.grades import _GLAND_RADIUS, _Architecture, _NuclearLook
from data.synthetic.noise import _layered_noise
from data.synthetic.shapes import _Glands, _harmonic_edge, _rasterise, _wobble


@dataclass
class _Layout:
    """Where the tissue compartments lie in one image."""

    epithelium: np.ndarray  # float [0, 1]: tumour cells (lumen overrides it)
    lumen: np.ndarray  # float [0, 1]: gland lumens
    solid: np.ndarray  # bool: epithelium packed with nuclei at random
    lining: np.ndarray  # (N, 3): x, y, orientation of nuclei lining gland walls


def _sample_glands(rng: np.random.Generator, size: int, radius: float, arch: _Architecture) -> _Glands:
    """Glands on a jittered grid that covers the image, each with its own shape."""
    step = arch.spacing * radius
    count = int(math.ceil(size / step)) + 2
    grid = (np.arange(count) - 1.0) * step
    gx, gy = (g.ravel() for g in np.meshgrid(grid, grid))
    n = gx.size
    gx = gx + rng.uniform(0, step) + rng.uniform(-arch.jitter, arch.jitter, n) * step
    gy = gy + rng.uniform(0, step) + rng.uniform(-arch.jitter, arch.jitter, n) * step
    r = radius * np.exp(np.clip(rng.normal(0.0, arch.radius_cv, n), -0.7, 0.7))
    aspect = rng.uniform(*arch.aspect, n)
    return _Glands(
        gx,
        gy,
        r * np.sqrt(aspect),
        r / np.sqrt(aspect),
        rng.uniform(0, np.pi, n),
        _wobble(rng, n, arch.wobble, 4),
        np.full(n, arch.wall),
        rng.random(n) < arch.cribriform,
    )


def _gland_points(glands: _Glands, rho: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of points at normalised radius ``rho`` and angle ``t`` of each gland.

    ``rho`` and ``t`` broadcast against (number of glands, points per gland).
    """
    cos_t, sin_t = np.cos(t), np.sin(t)
    h = glands.harmonics[..., None]
    alphas, betas = h[:, 0].transpose(1, 0, 2), h[:, 1].transpose(1, 0, 2)
    scale = rho * _harmonic_edge(cos_t, sin_t, alphas, betas)
    lx, ly = scale * cos_t * glands.a[:, None], scale * sin_t * glands.b[:, None]
    c, s = np.cos(glands.angle)[:, None], np.sin(glands.angle)[:, None]
    return glands.x[:, None] + lx * c - ly * s, glands.y[:, None] + lx * s + ly * c


def _lining(glands: _Glands, depth: np.ndarray, spacing: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Nuclei evenly spaced along one row of each gland wall: (N, 3) of x, y, orientation.

    Args:
        glands: The glands.
        depth: Normalised radius of each gland's row (1 is the outer boundary).
        spacing: Distance between neighbouring nuclei, px.
        jitter: Irregularity of the spacing, as a fraction of it.
        rng: Random source.
    """
    if len(glands) == 0:
        return np.zeros((0, 3))
    x, y = _gland_points(glands, depth[:, None], np.linspace(0.0, 2 * np.pi, 129))
    arc = np.cumsum(np.hypot(np.diff(x, axis=1), np.diff(y, axis=1)), axis=1)
    arc = np.concatenate([np.zeros((len(glands), 1)), arc], axis=1)
    length = arc[:, -1]
    count = np.maximum((length / spacing).astype(int), 3)
    owner = np.repeat(np.arange(len(glands)), count)
    rank = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    spots = rank + rng.random(len(glands))[owner] + rng.uniform(-jitter, jitter, owner.size)
    # One interpolation for all glands: their arcs are laid end to end.
    base = np.concatenate([[0.0], np.cumsum(length + 1.0)[:-1]])
    where = (spots * (length / count)[owner]) % length[owner] + base[owner]
    flat = (arc + base[:, None]).ravel()
    tx, ty = np.gradient(x, axis=1).ravel(), np.gradient(y, axis=1).ravel()
    # Columnar nuclei stand across the wall, so their long axis follows its normal.
    normal = np.arctan2(-np.interp(where, flat, tx), np.interp(where, flat, ty))
    return np.stack([np.interp(where, flat, x.ravel()), np.interp(where, flat, y.ravel()), normal], axis=1)


def _discs(x: np.ndarray, y: np.ndarray, radius: np.ndarray) -> _Glands:
    """Round shapes (used for small lumens)."""
    n = len(x)
    return _Glands(x, y, radius, radius, np.zeros(n), np.zeros((n, 2, 1)), np.zeros(n), np.zeros(n, bool))


def _cribriform_lumens(rng: np.random.Generator, glands: _Glands) -> _Glands:
    """The small punched-out lumens of the cribriform glands."""
    crib = glands.take(glands.cribriform)
    owner = np.repeat(np.arange(len(crib)), rng.integers(3, 9, len(crib)))
    hosts = crib.take(owner)
    # sqrt spreads the lumens evenly over the gland's area.
    rho = np.sqrt(rng.random(len(owner))) * 0.6
    x, y = _gland_points(hosts, rho[:, None], rng.uniform(0, 2 * np.pi, (len(owner), 1)))
    radius = np.minimum(hosts.a, hosts.b) * rng.uniform(0.1, 0.2, len(owner))
    return _discs(x[:, 0], y[:, 0], radius)


def _shade_glands(glands: _Glands, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    """Epithelium, lumen and cribriform (solid) maps of glands, with one-pixel soft edges."""
    px = np.minimum(glands.a, glands.b).astype(np.float32)[:, None, None]
    inside = np.clip((1.0 - rho) * px + 0.5, 0.0, 1.0)
    hollow_edge = (1.0 - glands.wall).astype(np.float32)[:, None, None]
    hollow = np.clip((hollow_edge - rho) * px + 0.5, 0.0, 1.0)
    crib = glands.cribriform[:, None, None]
    return [inside, np.where(crib, 0.0, hollow), inside * crib]


def _shade_discs(discs: _Glands, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    """Soft-edged fill of round shapes."""
    px = discs.a.astype(np.float32)[:, None, None]
    return [np.clip((1.0 - rho) * px + 0.5, 0.0, 1.0)]


def _coarse_glands(glands: _Glands, size: int) -> list[np.ndarray]:
    """Epithelium, lumen and cribriform maps of glands, drawn at reduced resolution.

    Glands are large and smooth, so their soft masks are drawn a few times
    smaller, enlarged, and their edges sharpened back to about a pixel.
    """
    factor = max(1, min(4, size // 128))
    small = size // factor + 1
    # Coarse pixel j stands for full pixel j * factor + (factor - 1) / 2 under PIL resizing.
    shift = (factor - 1) / 2
    shrunk = _Glands(
        (glands.x - shift) / factor,
        (glands.y - shift) / factor,
        glands.a / factor,
        glands.b / factor,
        glands.angle,
        glands.harmonics,
        glands.wall,
        glands.cribriform,
    )
    maps = []
    for layer in _rasterise(shrunk, small, _shade_glands, layers=3):
        if not layer.any():  # most images have no cribriform glands
            maps.append(np.zeros((size, size), np.float32))
            continue
        big = Image.fromarray(np.minimum(layer, 1.0)).resize((small * factor, small * factor), Image.BILINEAR)
        sharp = np.asarray(big)[:size, :size] * np.float32(factor)
        sharp += np.float32(0.5 - 0.5 * factor)
        maps.append(np.clip(sharp, 0.0, 1.0, out=sharp))
    return maps


def _gland_layout(rng: np.random.Generator, size: int, unit: float, arch: _Architecture, look: _NuclearLook) -> _Layout:
    """Glands (Grades I and II) with their lining nuclei."""
    glands = _sample_glands(rng, size, _GLAND_RADIUS * unit, arch)
    epithelium, lumen, crib = _coarse_glands(glands, size)
    (small,) = _rasterise(_cribriform_lumens(rng, glands), size, _shade_discs)
    # Lining nuclei sit side by side, short axes along the wall.
    spacing = 2.3 * look.radius * unit / math.sqrt(look.elongation)
    tubular = glands.take(~glands.cribriform)
    rows = []
    for layer in range(arch.layers):
        depth = 1.0 - tubular.wall * (0.28 + 0.32 * layer)
        row = _lining(tubular, depth, spacing, 0.06 + 0.25 * (arch.layers - 1), rng)
        row[:, 2] += rng.normal(0.0, arch.disorder, len(row))
        rows.append(row)
    return _Layout(np.minimum(epithelium, 1.0), np.minimum(lumen + small, 1.0), crib > 0.5, np.concatenate(rows))


def _sheet_layout(rng: np.random.Generator, size: int, unit: float) -> _Layout:
    """Solid sheets and nests of tumour cells (Grade III), with the odd abortive lumen."""
    radius = _GLAND_RADIUS * unit
    field = _layered_noise(rng, size, ((size / (1.5 * radius) + 2, 0.75), (size / (0.3 * radius) + 3, 0.25)))
    cut = np.quantile(field[::4, ::4], 1.0 - rng.uniform(0.65, 0.9))
    epithelium = np.clip((field - cut) * radius + 0.5, 0.0, 1.0)
    solid = epithelium > 0.5
    count = int(rng.poisson(0.25 * (size / (2.7 * radius)) ** 2))
    x, y = rng.uniform(0, size, count), rng.uniform(0, size, count)
    within = solid[y.astype(int), x.astype(int)]
    holes = _discs(x[within], y[within], radius * rng.uniform(0.06, 0.15, count)[within])
    (lumen,) = _rasterise(holes, size, _shade_discs)
    return _Layout(epithelium, np.minimum(lumen, 1.0), solid, np.zeros((0, 3)))
