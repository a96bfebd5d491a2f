"""Tissue architecture of a tile: gland units, stroma, pale spaces, and where nuclei sit.

A tile is all tumour. Gland units lie on a jittered hexagonal grid
:data:`UNIT_SPACING` detail fields apart (larger than the detail window, so a
detail patch sees part of one unit; a context window holds two or three).
Stroma septa run along the borders between units; the rest of each unit is a
nest of tumour epithelium holding one pale space. Every tile, whatever its
architecture level, has the same fractions of stroma (:data:`STROMA_FRACTION`)
and pale space (:data:`PALE_FRACTION`) -- both thresholds are quantiles, so
the areas are exact -- the same number of tumour nuclei per epithelial area,
stroma and cytoplasm of the same mean dye and a nucleus-free band along every
pale space, so colour statistics and cellularity cannot tell the levels apart
(the pale outline is about 10 % longer at A = 2, which slide-to-slide dye
variation buries; see ``controls``). What differs
is topology, i.e. how much of the pale space's rim is epithelium:

* A = 0: a round lumen at the unit's centre, ringed all round by epithelium
  whose nuclei point at it (polarised): 100 % of its rim is lined;
* A = 1: the lumen is pushed towards the unit's border until about a third of
  its rim opens onto stroma (about 67 % lined); nuclei are polarised only
  where the ring is closed;
* A = 2: the pale space sits on the nest's border, a retraction cleft against
  the stroma rather than a lumen (about 49 % lined); nuclei are oriented at
  random.

(Lined shares measured on 40 study-size tiles per level.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from data.synthetic import _fibres, _noise, _scatter

#: Distance between neighbouring gland units, in detail fields.
UNIT_SPACING = 2.6
STROMA_FRACTION = 0.30
PALE_FRACTION = 0.18
#: Tumour nuclei cover this share of the epithelium (before overlaps).
NUCLEAR_COVER = 0.36
#: How far the pale space sits from its unit's centre, per architecture level, in unit spacings:
#: centred (ringed all round), through the nest's rim on one side, centred on the rim (a cleft).
OFFSETS = (0.0, 0.30, 0.54)
#: Scalloping of the pale space's outline (harmonics 4-6), the same at every level: a level-dependent
#: scallop could even out the outline lengths but would put a shape cue into the detail window.
SCALLOP = 0.04
#: Mean haematoxylin and eosin of cytoplasm and of stroma.
CYTOPLASM = np.array([0.10, 0.30])
#: Slide-to-slide spread (log-normal sigma) of the cytoplasm and stroma dye.
TONE_JITTER = 0.08
#: Nuclei keep this many nuclear radii from a pale space, in epithelium (the apical cytoplasm of
#: polarised cells) and in stroma alike, so every pale space is edged by nucleus-free tissue.
APICAL_BAND = 1.3
#: Orientation spread of "polarised" nuclei, radians.
POLAR_SPREAD = 0.25


@dataclass
class Layout:
    """Compartments of one tile.

    Attributes:
        stroma, pale, epithelium: Soft masks in [0, 1] that sum to 1.
        nest: Bool mask of epithelium (nuclei may sit here).
        septum: Bool mask of stroma.
        polar: Bool mask of epithelium whose nuclei point at ``centre``.
        centre_x, centre_y: Per pixel, the lumen centre its nuclei point at.
        apart: Per pixel, the distance to the nearest pale pixel.
    """

    stroma: np.ndarray
    pale: np.ndarray
    epithelium: np.ndarray
    nest: np.ndarray
    septum: np.ndarray
    polar: np.ndarray
    centre_x: np.ndarray
    centre_y: np.ndarray
    apart: np.ndarray


def unit_centres(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """Centres (K, 2) of gland units on a jittered hexagonal grid covering the tile and a margin."""
    row_step = spacing * math.sqrt(3) / 2
    rows = np.arange(-1, int(math.ceil(size / row_step)) + 2)
    cols = np.arange(-1, int(math.ceil(size / spacing)) + 2)
    gy, gx = np.meshgrid(rows * row_step, cols * spacing, indexing="ij")
    gx = gx + (rows[:, None] % 2) * spacing / 2
    origin = rng.uniform(0, spacing, 2)
    points = np.stack([gx.ravel() + origin[0], gy.ravel() + origin[1]], axis=1)
    return points + rng.uniform(-0.12, 0.12, points.shape) * spacing


def _two_nearest(size: int, centres: np.ndarray, step: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index of the nearest unit centre, and the distance to the nearest cell border.

    The border distance is that to the bisector with the second-nearest centre,
    ``(d2^2 - d1^2) / (2 |c1 - c2|)``. Both vary slowly, so they are computed
    on a grid ``step`` times coarser and enlarged (bilinear for the distance).
    """
    coarse = -(-size // step)
    axis = np.arange(coarse) * step + (step - 1) / 2  # what PIL's resize maps coarse pixels to
    xx, yy = np.meshgrid(axis, axis)
    dist, index = cKDTree(centres).query(np.stack([xx.ravel(), yy.ravel()], axis=1), k=2)
    gap = np.linalg.norm(centres[index[:, 0]] - centres[index[:, 1]], axis=1)
    border = ((dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2.0 * np.maximum(gap, 1e-3))).reshape(coarse, coarse)
    big = Image.fromarray(border.astype(np.float32)).resize((coarse * step,) * 2, Image.BILINEAR)
    owner = np.repeat(np.repeat(index[:, 0].reshape(coarse, coarse), step, 0), step, 1)
    return owner[:size, :size], np.asarray(big)[:size, :size]


def _quantile_mask(field: np.ndarray, fraction: float, within: np.ndarray | None = None) -> np.ndarray:
    """The ``fraction`` of pixels (of ``within``) with the lowest ``field``: an exact area, ties aside."""
    values = field if within is None else field[within]
    count = int(round(fraction * values.size))
    if count <= 0:
        return np.zeros(field.shape, bool)
    cut = np.partition(values.ravel(), count - 1)[count - 1]
    mask = field <= cut
    return mask if within is None else mask & within


def _pale_field(
    rng: np.random.Generator, arch: int, size: int, spacing: float, centres: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Low values where the pale space goes, and the pale space's centre in every unit (K, 2).

    Every level draws the same round, slightly wobbly space; only its offset
    from the unit's centre (:data:`OFFSETS`) differs, so the spaces keep about
    the same outline length and the colour mixing along it stays alike.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, len(centres))
    lumens = centres + OFFSETS[arch] * spacing * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    dx, dy = xx - lumens[owner, 0], yy - lumens[owner, 1]
    theta = np.arctan2(dy, dx)
    phase = rng.uniform(0, 2 * np.pi, (len(centres), 6))
    wobble = 1.0 + 0.05 * np.cos(2 * theta + phase[owner, 0]) + 0.04 * np.cos(3 * theta + phase[owner, 1])
    for order in (4, 5, 6):
        wobble += SCALLOP * np.cos(order * theta + phase[owner, order - 1])
    return np.hypot(dx, dy) / wobble, lumens


def _soft(mask: np.ndarray) -> np.ndarray:
    """A hard mask with edges softened over about a pixel."""
    return ndimage.gaussian_filter(mask.astype(np.float32), 0.7, mode="nearest")


def _polarised(arch: int, nest: np.ndarray, septum: np.ndarray, lumen_of: np.ndarray, spacing: float) -> np.ndarray:
    """Epithelium whose nuclei point at their unit's lumen: where it rings the lumen, not cut off by stroma."""
    size = nest.shape[0]
    if arch == 2:
        return np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    polar = nest & (np.hypot(xx - lumen_of[..., 0], yy - lumen_of[..., 1]) < 0.45 * spacing)
    if arch == 1:
        polar &= ndimage.distance_transform_edt(~septum) > 0.08 * spacing
    return polar


def build_layout(rng: np.random.Generator, size: int, detail: int, arch: int) -> Layout:
    """The compartments of a tile of architecture level ``arch`` (see the module docstring)."""
    spacing = UNIT_SPACING * detail
    centres = unit_centres(rng, size, spacing)
    owner, border = _two_nearest(size, centres)
    septa_wobble = (_noise(rng, size, size / (0.5 * spacing) + 2) - 0.5) * (0.08 * spacing)
    septum = _quantile_mask(border + septa_wobble, STROMA_FRACTION)
    field, lumens = _pale_field(rng, arch, size, spacing, centres, owner)
    nest = ~septum
    pale = _quantile_mask(field, PALE_FRACTION / (1 - STROMA_FRACTION), nest)
    nest &= ~pale
    polar = _polarised(arch, nest, septum, lumens[owner], spacing)
    stroma, pale_soft = _soft(septum), _soft(pale)
    epithelium = np.clip(1.0 - stroma - pale_soft, 0.0, 1.0)
    return Layout(
        stroma,
        pale_soft,
        epithelium,
        nest,
        septum,
        polar,
        lumens[owner, 0].astype(np.float32),
        lumens[owner, 1].astype(np.float32),
        ndimage.distance_transform_edt(~pale).astype(np.float32),
    )


def background_stains(rng: np.random.Generator, layout: Layout, detail: int) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin amounts of stroma, cytoplasm and pale spaces (before nuclei).

    The same for every level: only the compartments' shapes differ.
    """
    size = layout.stroma.shape[0]
    fibres, _ = _fibres(rng, size, detail / 96.0)
    grain = _noise(rng, size, size / 2.5)
    collagen = np.clip((0.75 * fibres + 0.25 * grain) * 2.0 - 0.5, 0.0, 1.0)
    s, p, e = layout.stroma, layout.pale, layout.epithelium
    # Stroma and cytoplasm hold the same dye on average (they differ in texture: fibres against grain),
    # so the colour mixed along a pale space's outline does not depend on which of them borders it.
    fibrous = collagen - collagen.mean()
    # Section thickness and the pale spaces' contents vary from slide to slide, alike at every level.
    tone_h, tone_e = CYTOPLASM * np.exp(rng.normal(0.0, TONE_JITTER, 2))
    debris = rng.uniform(0.03, 0.09)
    eos = s * (tone_e + 0.5 * fibrous) + e * (tone_e + 0.08 * (grain - 0.5)) + p * (debris + 0.05 * grain)
    hema = s * (tone_h + 0.03 * fibrous) + e * (tone_h + 0.04 * (grain - 0.5)) + p * 0.3 * debris
    return np.maximum(hema, 0.0).astype(np.float32), np.maximum(eos, 0.0).astype(np.float32)


def tumour_spots(rng: np.random.Generator, layout: Layout, radius: float) -> np.ndarray:
    """Tumour nuclei (N, 3): x, y, orientation; the same density per epithelium at every level.

    Polarised nuclei point their long axis at their lumen's centre (with a
    little spread); the others are oriented at random.
    """
    spots = _scatter_fixed(
        rng, layout.nest, layout.apart > APICAL_BAND * radius, radius * math.sqrt(math.pi / NUCLEAR_COVER)
    )
    if not len(spots):
        return spots
    size = layout.nest.shape[0]
    col = np.clip(spots[:, 0], 0, size - 1).astype(int)
    row = np.clip(spots[:, 1], 0, size - 1).astype(int)
    polar = layout.polar[row, col]
    radial = np.arctan2(spots[:, 1] - layout.centre_y[row, col], spots[:, 0] - layout.centre_x[row, col])
    spots[:, 2] = np.where(polar, radial + rng.normal(0.0, POLAR_SPREAD, len(spots)), spots[:, 2])
    return spots


def stromal_spots(rng: np.random.Generator, layout: Layout, radius: float) -> np.ndarray:
    """Fibroblast and lymphocyte nuclei (N, 3) in the septa, at a fixed density."""
    return _scatter_fixed(rng, layout.septum, layout.apart > APICAL_BAND * radius, 5.5 * radius, keep=0.6)


def _scatter_fixed(
    rng: np.random.Generator, region: np.ndarray, allowed: np.ndarray, spacing: float, keep: float = 1.0
) -> np.ndarray:
    """Points as ``_scatter(region, spacing)`` would give in number, placed only where ``allowed``.

    The spacing shrinks to fit the same count into the allowed part, so the
    number of nuclei follows the compartment's area (the same at every level)
    and not the length of the pale spaces' outline.
    """
    usable = region & allowed
    if not usable.any():
        return np.zeros((0, 3))
    return _scatter(rng, usable, spacing * math.sqrt(usable.sum() / region.sum()), keep)
