"""Nuclei whose grade is in their texture, not in their colour or size.

Every tumour nucleus, at every nuclear level, covers the same number of pixels
(drawn from one distribution) and holds the same *multiset* of haematoxylin
values: its pixels are ranked by a texture score and given the quantiles of
one fixed distribution (:func:`dye_quantiles`). Its total dye, its mean and
its histogram therefore do not depend on the level, and neither does the mean
light of any block that holds the whole nucleus (a 4x-shrunk context patch).
What the level changes is *where* the dark values go, at the 1-2 px scale: the
chromatin texture's correlation length grows from fine and even (N = 0, 0.4 px)
through granular (N = 1, 0.7 px) to coarse and clumped (N = 2, 1.0 px).

The scanner's blur is applied to the dye amounts and each nucleus is
equalised again afterwards (:func:`equalise`), so blur changes the texture
(it degrades the level at a blurry site) but never the values. Membrane
irregularity, a dark rim and nucleoli were tried as further cues and left
out: each changes how compact a nucleus's dark mass is, which survives the
4x shrink of the context patch and made the nuclear level readable from the
context patch's colour histogram (BENCHMARKS.md, section 9).

Nuclear shape is drawn by ranking the pixels of a box by their normalised
radius (an ellipse with boundary harmonics 3-6) and keeping the ``k`` nearest,
so the area is exact whatever the membrane's roughness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data.synthetic import _harmonic_edge

#: Long/short axis ratio of tumour nuclei (all levels).
ELONGATION = 1.35
#: Radial shells that each hold the full dye distribution (see _ranked_values).
SHELLS = 3
#: Spread of nuclear area (log-normal sigma), all levels.
AREA_CV = 0.08


@dataclass(frozen=True)
class NuclearLook:
    """Where a nuclear level puts its dark values (lengths in px)."""

    chromatin_sigma: float  # correlation length of the chromatin texture
    roughness: float  # membrane irregularity (harmonic amplitude)
    nucleolus_radius: float  # 0 = no nucleolus
    nucleolus_weight: float
    rim_weight: float  # darker membrane


LOOKS = (
    NuclearLook(0.4, 0.02, 0.0, 0.0, 0.0),
    NuclearLook(0.7, 0.02, 0.0, 0.0, 0.0),
    NuclearLook(1.0, 0.02, 0.0, 0.0, 0.0),
)
#: Stromal nuclei: the same at every level (they are not tumour).
STROMAL = NuclearLook(1.0, 0.03, 0.0, 0.0, 0.0)


def dye_quantiles(u: np.ndarray, density: float, contrast: float = 1.6) -> np.ndarray:
    """Haematoxylin at rank ``u`` in [0, 1] (1 darkest) of a nucleus: mean ``density * (0.55 + contrast / 3)``."""
    return (density * (0.55 + contrast * u * u)).astype(np.float32)


def _boxes(spots: np.ndarray, half: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows and columns (N, B) of each nucleus's box, and offsets (N, B, B) from its centre."""
    span = np.arange(-half, half + 1)
    rows = np.floor(spots[:, 1]).astype(int)[:, None] + span
    cols = np.floor(spots[:, 0]).astype(int)[:, None] + span
    dy = (rows - spots[:, 1:2]).astype(np.float32)[:, :, None]
    dx = (cols - spots[:, 0:1]).astype(np.float32)[:, None, :]
    return (
        rows,
        cols,
        np.broadcast_to(dx, (len(spots), 2 * half + 1, 2 * half + 1)),
        np.broadcast_to(dy, (len(spots), 2 * half + 1, 2 * half + 1)),
    )


def _radius_map(rng: np.random.Generator, dx, dy, angle: np.ndarray, elongation: float, roughness: float):
    """Normalised radius of every box pixel: an ellipse whose boundary wobbles with harmonics 3-6."""
    n = len(angle)
    c, s = np.cos(angle)[:, None, None].astype(np.float32), np.sin(angle)[:, None, None].astype(np.float32)
    root = np.float32(math.sqrt(elongation))
    u = (dx * c + dy * s) / root
    v = (dy * c - dx * s) * root
    r = np.hypot(u, v) + np.float32(1e-6)
    orders = np.arange(2, 7)
    amp = roughness * rng.uniform(0.5, 1.2, (len(orders), n)) / np.sqrt(np.maximum(orders - 2, 1))[:, None]
    amp[0] = 0.0  # harmonic 2 is the ellipse's own business
    phase = rng.uniform(0, 2 * np.pi, (len(orders), n))
    alphas = (amp * np.cos(phase)).astype(np.float32)[:, :, None, None]
    betas = (-amp * np.sin(phase)).astype(np.float32)[:, :, None, None]
    return r / _harmonic_edge(u / r, v / r, alphas, betas)


def _texture(rng: np.random.Generator, look: NuclearLook, rho: np.ndarray, dx, dy, radius: float) -> np.ndarray:
    """Texture score of every box pixel: higher is darker."""
    n, b, _ = rho.shape
    chrom = ndimage.gaussian_filter(
        rng.standard_normal((n, b, b)).astype(np.float32),
        (0, look.chromatin_sigma, look.chromatin_sigma),
        mode="reflect",
    )
    chrom /= chrom.reshape(n, -1).std(axis=1)[:, None, None] + 1e-6
    score = chrom + look.rim_weight * np.clip((rho - 0.65) / 0.35, 0.0, 1.0)
    if look.nucleolus_radius > 0:
        where = rng.uniform(0, 2 * np.pi, n)
        reach = radius * 0.3 * np.sqrt(rng.random(n))
        ox, oy = (reach * np.cos(where))[:, None, None], (reach * np.sin(where))[:, None, None]
        bump = np.exp(-((dx - ox) ** 2 + (dy - oy) ** 2) / (2 * look.nucleolus_radius**2))
        score = score + look.nucleolus_weight * bump
    return score


def paint(
    rng: np.random.Generator,
    hema: np.ndarray,
    eos: np.ndarray,
    spots: np.ndarray,
    radius: float,
    look: NuclearLook,
    density: float,
    elongation: float = ELONGATION,
    contrast: float = 1.6,
    shells: np.ndarray | None = None,
) -> None:
    """Draw nuclei at ``spots`` ((N, 3): x, y, orientation) into the dye maps, in place.

    A nucleus replaces what lies under it: its pixels get the ranked dye values
    and the little eosin of a nucleus. Later nuclei cover earlier ones. With
    ``shells`` (an int map, 0 where no nucleus is marked), every pixel drawn is
    marked with its nucleus and radial shell, for :func:`equalise`.
    """
    n = len(spots)
    if n == 0:
        return
    size = hema.shape[0]
    half = int(math.ceil(radius * math.sqrt(elongation) * 1.45)) + 1
    rows, cols, dx, dy = _boxes(spots, half, size)
    rho = _radius_map(rng, dx, dy, spots[:, 2], elongation, look.roughness)
    box = rho.shape[1] * rho.shape[2]
    area = math.pi * radius * radius * np.exp(np.clip(rng.normal(0.0, AREA_CV, n), -0.25, 0.25))
    k = np.clip(np.round(area).astype(int), 4, box)
    flat_rho = rho.reshape(n, box)
    by_radius = np.argsort(flat_rho, axis=1, kind="stable")
    inside = np.zeros((n, box), bool)
    np.put_along_axis(inside, by_radius, np.arange(box)[None, :] < k[:, None], axis=1)
    # The k-th smallest radius is the membrane: the rim score is measured against it.
    boundary = np.take_along_axis(flat_rho, by_radius[np.arange(n), k - 1][:, None], axis=1)
    score = _texture(rng, look, (flat_rho / boundary).reshape(rho.shape), dx, dy, radius).reshape(n, box)
    value, shell = _ranked_values(score, inside, by_radius, k, density, contrast)
    mark = None
    if shells is not None:
        first = int(shells.max()) // SHELLS + 1
        mark = (first + np.arange(n)[:, None]) * SHELLS + shell + 1
    _scatter_into(hema, eos, rows, cols, inside, value, shells, mark)


def _ranked_values(
    score: np.ndarray, inside: np.ndarray, by_radius: np.ndarray, k: np.ndarray, density: float, contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """Dye of every box pixel, and its shell: within each of :data:`SHELLS` radial shells, the shell's
    pixels ranked by ``score`` get the quantiles of :func:`dye_quantiles`.

    Every shell holds the whole distribution, so a nucleus's mean darkness at
    every radius is the same at every level (a dark rim or nucleolus takes its
    dark values from its own shell), and what shrinking the patch averages
    together does not depend on the level either.
    """
    n, box = score.shape
    radius_rank = np.empty_like(by_radius)
    np.put_along_axis(radius_rank, by_radius, np.arange(box)[None, :].repeat(n, 0), axis=1)
    shell = np.minimum(radius_rank * SHELLS // k[:, None], SHELLS - 1)
    bounded = np.clip(np.nan_to_num(score, posinf=0.0, neginf=0.0), -1e3, 1e3)
    key = np.where(inside, shell * 1e4 - bounded, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(box)[None, :].repeat(n, 0), axis=1)
    starts = (np.arange(SHELLS)[None, :] * k[:, None] + SHELLS - 1) // SHELLS  # first radius rank of each shell
    sizes = np.diff(np.concatenate([starts, k[:, None]], axis=1), axis=1)
    start = np.take_along_axis(starts, shell, axis=1)
    count = np.maximum(np.take_along_axis(sizes, shell, axis=1), 1)
    return dye_quantiles(1.0 - (position - start + 0.5) / count, density, contrast), shell


def equalise(blurred: np.ndarray, shells: np.ndarray, density: float, contrast: float) -> np.ndarray:
    """``blurred`` with every marked shell's pixels re-ranked onto :func:`dye_quantiles`.

    Applied after the optics' blur, so what blur does to a texture (a fine one
    averages out, a coarse one keeps its extremes) does not reach the values:
    each shell of each nucleus holds the same multiset at every level and at
    every scanner, and only the texture's spatial order survives.
    """
    out = blurred.copy()
    where = np.flatnonzero(shells.ravel())
    if not len(where):
        return out
    keys = shells.ravel()[where]
    order = np.lexsort((blurred.ravel()[where], keys))
    sorted_keys = keys[order]
    _, start, count = np.unique(sorted_keys, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(start)), count)
    rank = np.arange(len(order)) - start[group]
    u = (rank + 0.5) / count[group]  # 0 palest ... 1 darkest
    out.ravel()[where[order]] = dye_quantiles(u, density, contrast)
    return out


def _scatter_into(hema, eos, rows, cols, inside, value, shells=None, mark=None) -> None:
    """Write the nuclei's pixels that fall inside the image (and their marks, if given)."""
    n, b = rows.shape
    size = hema.shape[0]
    r = np.broadcast_to(rows[:, :, None], (n, b, b)).reshape(n, -1)
    c = np.broadcast_to(cols[:, None, :], (n, b, b)).reshape(n, -1)
    keep = inside & (r >= 0) & (r < size) & (c >= 0) & (c < size)
    hema[r[keep], c[keep]] = value[keep]
    eos[r[keep], c[keep]] = 0.06
    if shells is not None:
        shells[r[keep], c[keep]] = mark[keep]
