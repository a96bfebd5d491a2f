"""Dual-scale patch pairs: a context patch and a detail patch around the same point.

The detail patch is ``detail_size`` native pixels. The context patch covers
``context_fov`` native pixels around the same centre, resized to
``context_size`` (the paper's literal setting: 320 native pixels at 320, i.e.
no resizing). Centres are drawn where the detail window is mostly tissue. With
``centres = "tissue"`` a window reaching past the image is reflect-padded; with
``centres = "inside"`` centres are drawn only where both windows lie inside the
image (the embedded benchmark's tiles are made for this: no pixel is mirrored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.tissue import tissue_mask, window_tissue_fraction

#: How patch centres are chosen (see the module docstring).
CENTRES = ("tissue", "inside")


@dataclass(frozen=True)
class PatchSpec:
    """Sizes of a patch pair and how centres are chosen."""

    context_size: int = 320
    detail_size: int = 224
    context_fov: int = 320
    min_tissue: float = 0.5
    centres: str = "tissue"
    """``tissue``: anywhere the detail window holds ``min_tissue``; ``inside``: also with both windows inside."""

    def __post_init__(self) -> None:
        if self.centres not in CENTRES:
            raise ValueError(f"patch centres must be one of {', '.join(CENTRES)}; got {self.centres!r}")

    @property
    def pad(self) -> int:
        """Reflect padding that lets a window of either size sit at any pixel."""
        return (max(self.context_fov, self.detail_size) + 1) // 2


class NoTissue(Exception):
    """The image has no tissue to sample patches from (or, with ``centres = "inside"``, no room for a window)."""


def inside_box(shape: tuple[int, ...], spec: PatchSpec) -> tuple[slice, slice]:
    """Rows and columns of the centres whose windows (context and detail) lie inside an image of ``shape``.

    A window of side ``s`` around centre ``c`` spans ``c - s // 2`` to ``c - s // 2 + s - 1``
    (:func:`extract_pairs`), so the larger window fits for ``s // 2 <= c <= side - (s - s // 2)``.
    The slices are empty when the image is smaller than the window."""
    size = max(spec.context_fov, spec.detail_size)
    low, high = size // 2, size - size // 2
    return slice(low, max(low, shape[0] - high + 1)), slice(low, max(low, shape[1] - high + 1))


def sample_centres(
    rgb: np.ndarray, count: int, spec: PatchSpec, rng: np.random.Generator, mask: np.ndarray | None = None
) -> np.ndarray:
    """``count`` (row, col) centres whose detail window holds at least ``min_tissue`` tissue.

    Falls back to the most tissue-rich centres when too few qualify; raises
    :class:`NoTissue` for an image without any tissue.
    """
    if mask is None:
        mask = tissue_mask(rgb)
    if not mask.any():
        raise NoTissue("all background")
    fraction = window_tissue_fraction(mask, spec.detail_size)
    if spec.centres == "inside":
        rows, cols = inside_box(mask.shape, spec)
        allowed = np.zeros(mask.shape, dtype=bool)
        allowed[rows, cols] = True
        if not allowed.any():
            raise NoTissue(f"smaller than the {max(spec.context_fov, spec.detail_size)} px window")
        fraction = np.where(allowed, fraction, -1.0)  # never a candidate, not even a fallback one
    candidates = np.flatnonzero(fraction >= spec.min_tissue)
    if candidates.size == 0:
        # Keep the best tenth of tissue-bearing positions rather than dropping the image.
        best = np.flatnonzero(fraction > 0)
        order = np.argsort(fraction.ravel()[best])[::-1]
        candidates = best[order[: max(1, best.size // 10)]]
        if candidates.size == 0:  # only with centres = "inside": the tissue lies where no window fits
            raise NoTissue("no tissue where the windows fit inside the image")
    chosen = rng.choice(candidates, size=count, replace=candidates.size < count)
    return np.stack(np.unravel_index(chosen, mask.shape), axis=1)


def extract_pairs(rgb: np.ndarray, centres: np.ndarray, spec: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
    """Cut patch pairs at ``centres``: context (N,Sc,Sc,3) and detail (N,Sd,Sd,3), uint8."""
    padded = np.pad(rgb, ((spec.pad, spec.pad), (spec.pad, spec.pad), (0, 0)), mode="reflect")
    contexts = np.empty((len(centres), spec.context_size, spec.context_size, 3), np.uint8)
    details = np.empty((len(centres), spec.detail_size, spec.detail_size, 3), np.uint8)
    for i, (row, col) in enumerate(centres + spec.pad):
        details[i] = _window(padded, row, col, spec.detail_size)
        window = _window(padded, row, col, spec.context_fov)
        contexts[i] = window if spec.context_fov == spec.context_size else _resize(window, spec.context_size)
    return contexts, details


def _window(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    top, left = row - size // 2, col - size // 2
    return image[top : top + size, left : left + size]


def _resize(window: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR))
