"""Render one H&E-like image of a tumour of a given grade, at a given magnification, in a given lab.

The order of the random draws is part of the output: the section outline
comes first (so it does not depend on the cue grades), then the layout, the
stroma and cytoplasm, the nuclei, and last the sensor noise.
"""

from __future__ import annotations

import numpy as np

from data.records import GRADE_NAMES
from data.synthetic.grades import _GLANDULAR, _MAG_SCALE, _NUCLEAR, _REFERENCE_SIZE, _SHEET_DEBRIS, draw_cue_grade
from data.synthetic.layouts import _gland_layout, _Layout, _sheet_layout
from data.synthetic.noise import _fibres, _noise, _tissue_mask
from data.synthetic.nuclei import _nuclear_haematoxylin, _scatter, _stromal_nuclei, _tumour_nuclei
from data.synthetic.optics import StainProfile, _to_rgb
from data.synthetic.shapes import _Nuclei


def render_image(
    grade: int,
    magnification: str,
    stain: StainProfile,
    rng: np.random.Generator,
    size: int,
    *,
    architecture: int | None = None,
    nuclear: int | None = None,
) -> np.ndarray:
    """Render one H&E-like image of a tumour of the given grade.

    Args:
        grade: True grade, 0-based (index into ``GRADE_NAMES``).
        magnification: One of the keys of the magnification scale (``"4x"`` ... ``"40x"``).
        stain: The lab's staining and optics.
        rng: Source of every random draw.
        size: Side of the square image in pixels.
        architecture: Grade shown by the gland architecture; drawn with
            ``draw_cue_grade`` when omitted.
        nuclear: Grade shown by the nuclei; drawn likewise when omitted.

    Returns:
        An ``size`` x ``size`` x 3 uint8 RGB image.
    """
    if not 0 <= grade < len(GRADE_NAMES):
        raise ValueError(f"grade must be in [0, {len(GRADE_NAMES) - 1}]; got {grade!r}")
    if magnification not in _MAG_SCALE:
        raise ValueError(f"magnification must be one of {tuple(_MAG_SCALE)}; got {magnification!r}")
    for name, cue in (("architecture", architecture), ("nuclear", nuclear)):
        if cue is not None and not 0 <= cue < len(GRADE_NAMES):
            raise ValueError(f"{name} must be None or in [0, {len(GRADE_NAMES) - 1}]; got {cue!r}")
    arch = draw_cue_grade(grade, rng) if architecture is None else architecture
    nuc = draw_cue_grade(grade, rng) if nuclear is None else nuclear
    unit = size / _REFERENCE_SIZE * _MAG_SCALE[magnification]
    look = _NUCLEAR[nuc]
    # The section outline comes first, so it does not depend on the grades.
    tissue, thickness = _tissue_mask(rng, size)
    if arch < len(_GLANDULAR):
        layout = _gland_layout(rng, size, unit, _GLANDULAR[arch], look)
    else:
        layout = _sheet_layout(rng, size, unit)
    hema, eos, grain, stroma, fibre_angle = _background_stains(rng, layout, unit, arch)
    packed = _scatter(rng, layout.solid, 2.25 * look.radius * unit)
    spots = np.concatenate([layout.lining, packed])
    spots = _outside_lumens(spots, layout.lumen)
    nuclei = _Nuclei.join([_tumour_nuclei(rng, spots, look, unit), _stromal_nuclei(rng, stroma, unit, fibre_angle)])
    hema += _nuclear_haematoxylin(nuclei, size, grain, stain.sharpness)
    # Thicker parts of the section hold more of both stains.
    tissue *= 0.85 + 0.3 * np.clip(thickness, 0.0, 1.0)
    return _to_rgb(hema * tissue, eos * tissue, stain, rng)


def _outside_lumens(spots: np.ndarray, lumen: np.ndarray) -> np.ndarray:
    """The spots that do not fall in a lumen (fused glands swallow each other's walls)."""
    size = lumen.shape[0]
    col = np.clip(spots[:, 0], 0, size - 1).astype(int)
    row = np.clip(spots[:, 1], 0, size - 1).astype(int)
    return spots[lumen[row, col] < 0.5]


def _background_stains(
    rng: np.random.Generator, layout: _Layout, unit: float, arch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Stain amounts of stroma, cytoplasm and lumen contents, before nuclei and tissue mask.

    Returns:
        Haematoxylin and eosin maps, the chromatin/cytoplasm grain, the stroma
        mask (bool) and the direction of the collagen fibres.
    """
    size = layout.lumen.shape[0]
    fibres, fibre_angle = _fibres(rng, size, unit)
    grain = _noise(rng, size, size / max(3.0 * unit, 1.0))
    lumen = layout.lumen
    cells = layout.epithelium * (1.0 - lumen)
    stroma = np.clip(1.0 - cells - lumen, 0.0, 1.0)
    # Bundles of collagen with pale gaps, broken up by the finer grain.
    collagen = np.clip((0.75 * fibres + 0.25 * grain) * 2.0 - 0.5, 0.0, 1.0)
    debris = _GLANDULAR[arch].debris if arch < len(_GLANDULAR) else _SHEET_DEBRIS
    eos = stroma * (0.28 + 0.4 * collagen) + cells * (0.2 + 0.12 * grain) + lumen * debris * grain
    hema = stroma * (0.01 + 0.02 * collagen) + cells * (0.1 + 0.04 * grain) + lumen * 0.02
    return hema, eos, grain, stroma > 0.5, fibre_angle
