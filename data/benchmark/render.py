"""One tile: tissue -> dye amounts -> light through the hospital's stains and scanner -> JPEG.

Optics follow Beer-Lambert as in :mod:`data.synthetic`: per pixel
``I = glass * exp(-(h * g_H * v_H + e * g_E * v_E))``, with the hospital's
stain vectors ``v``, gains ``g`` and glass light, each slide's gains jittered
by about 8 %. The scanner then blurs (a 0.4 px optical blur everywhere plus the
site's own), adds sensor noise, and the tile is stored at the site's JPEG
quality. A tile depends only on the spec, its own seed stream and its
hospital's profile, so tiles can be rendered in any order or in parallel.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from data.benchmark import morphology, nuclei
from data.benchmark.design import BenchmarkSpec, Tile
from data.benchmark.hospitals import HospitalProfile

#: Blur of the optics alone, px (added in quadrature to the site's).
OPTICAL_BLUR = 0.4
#: Slide-to-slide spread of the dye gains (log-normal sigma).
SLIDE_JITTER = 0.08
#: Haematoxylin density scale of tumour and stromal nuclei.
TUMOUR_DENSITY, STROMAL_DENSITY = 1.0, 1.15
#: Per-tile spread of tumour nuclear density (log-normal sigma) and range of chromatin contrast.
NUCLEAR_JITTER, CONTRAST_RANGE = 0.08, (1.2, 2.0)


@dataclass(frozen=True)
class DyeMaps:
    """Dye amounts of a tile before any hospital's optics, and where its tumour nuclei lie."""

    hema: np.ndarray
    eos: np.ndarray
    hema_around: np.ndarray  # the same maps without the tumour nuclei: what the blur sees around them
    eos_around: np.ndarray
    shells: np.ndarray  # int: nucleus and radial shell of each tumour-nucleus pixel, 0 elsewhere
    density: float  # the tile's nuclear density and chromatin contrast (see nuclei.dye_quantiles)
    contrast: float


def dye_maps(spec: BenchmarkSpec, tile: Tile, rng: np.random.Generator) -> DyeMaps:
    """Haematoxylin and eosin amounts of a tile, before any hospital's optics."""
    layout = morphology.build_layout(rng, spec.tile_size, spec.detail, tile.arch_shown)
    hema, eos = morphology.background_stains(rng, layout, spec.detail)
    radius = spec.nucleus_radius
    stromal = morphology.stromal_spots(rng, layout, radius)
    nuclei.paint(rng, hema, eos, stromal, 0.7 * radius, nuclei.STROMAL, STROMAL_DENSITY, elongation=1.8)
    tumour = morphology.tumour_spots(rng, layout, radius)
    # Slide-to-slide spread of nuclear staining, drawn alike at every level: it buries what little of
    # the nuclear level reaches colour statistics through blur and JPEG.
    density = TUMOUR_DENSITY * math.exp(rng.normal(0.0, NUCLEAR_JITTER))
    contrast = rng.uniform(*CONTRAST_RANGE)
    shells = np.zeros(hema.shape, np.int32)
    look = nuclei.LOOKS[tile.nuclear_shown]
    around = hema.copy(), eos.copy()
    nuclei.paint(rng, hema, eos, tumour, radius, look, density, contrast=contrast, shells=shells)
    return DyeMaps(hema, eos, *around, shells, density, contrast)


def to_light(maps: DyeMaps, site: HospitalProfile, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 of dye maps seen through a hospital's stains, glass and scanner.

    The blur acts on the dye amounts. Inside a tumour nucleus the blurred
    haematoxylin is then re-ranked onto the fixed dye distribution
    (:func:`nuclei.equalise`); outside, the pixels are the blur of the tile
    without its tumour nuclei, so no nuclear dye spills into the surroundings.
    Both together keep every scanner from turning a nuclear level into a
    colour statistic: what differs between levels is the arrangement of dye
    inside the nuclei, nothing else.
    """
    gain_h = site.h_gain * math.exp(rng.normal(0.0, SLIDE_JITTER))
    gain_e = site.e_gain * math.exp(rng.normal(0.0, SLIDE_JITTER))
    sigma = math.hypot(OPTICAL_BLUR, site.blur_sigma)
    inside = maps.shells > 0
    hema = ndimage.gaussian_filter(maps.hema, sigma, mode="nearest")
    hema = np.where(
        inside,
        nuclei.equalise(hema, maps.shells, maps.density, maps.contrast),
        ndimage.gaussian_filter(maps.hema_around, sigma, mode="nearest"),
    )
    eos = np.where(
        inside,
        ndimage.gaussian_filter(maps.eos, sigma, mode="nearest"),
        ndimage.gaussian_filter(maps.eos_around, sigma, mode="nearest"),
    )
    out = np.empty(hema.shape + (3,), np.uint8)
    for channel in range(3):
        od = hema * np.float32(gain_h * site.haematoxylin[channel]) + eos * np.float32(gain_e * site.eosin[channel])
        light = np.exp(-od) * np.float32(site.glass[channel])
        light += rng.normal(0.0, 1.2, light.shape).astype(np.float32)
        out[..., channel] = np.clip(np.rint(light), 0, 255)
    return out


def tile_pixels(spec: BenchmarkSpec, tile: Tile, site: HospitalProfile) -> np.ndarray:
    """The tile as uint8 RGB (before JPEG); depends only on its arguments."""
    rng = np.random.default_rng(tile.stream(spec))
    return to_light(dye_maps(spec, tile, rng), site, rng)


def tile_jpeg(spec: BenchmarkSpec, tile: Tile, site: HospitalProfile) -> bytes:
    """The JPEG bytes of a tile, at its hospital's quality."""
    buffer = io.BytesIO()
    Image.fromarray(tile_pixels(spec, tile, site)).save(buffer, format="JPEG", quality=site.jpeg_quality, subsampling=0)
    return buffer.getvalue()
