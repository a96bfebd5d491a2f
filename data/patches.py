"""Dual-scale patch pairs: a context patch and a detail patch around the same point.

The detail patch is ``detail_size`` native pixels. The context patch covers
``context_fov`` native pixels around the same centre, resized to
``context_size`` (the paper's literal setting: 320 native pixels at 320, i.e.
no resizing). Centres are drawn where the detail window is mostly tissue;
images smaller than the context field are reflect-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.tissue import tissue_mask, window_tissue_fraction


@dataclass(frozen=True)
class PatchSpec:
    """Sizes of a patch pair and how centres are chosen."""

    context_size: int = 320
    detail_size: int = 224
    context_fov: int = 320
    min_tissue: float = 0.5

    @property
    def pad(self) -> int:
        """Reflect padding that lets a window of either size sit at any pixel."""
        return (max(self.context_fov, self.detail_size) + 1) // 2


class NoTissue(Exception):
    """The image has no tissue to sample patches from."""


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
    candidates = np.flatnonzero(fraction >= spec.min_tissue)
    if candidates.size == 0:
        # Keep the best tenth of tissue-bearing positions rather than dropping the image.
        best = np.flatnonzero(fraction > 0)
        order = np.argsort(fraction.ravel()[best])[::-1]
        candidates = best[order[: max(1, best.size // 10)]]
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
