"""Tissue masks for H&E images: Otsu thresholding and windowed tissue fractions."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

#: Channels ``tissue_mask`` can threshold.
CHANNELS: tuple[str, ...] = ("grey", "saturation")
#: ITU-R BT.709 luma weights, the ones ``skimage.color.rgb2gray`` uses.
_LUMA = np.array([0.2125, 0.7154, 0.0721])


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of some values, identical to ``skimage.filters.threshold_otsu``.

    A constant input has no split; its single value is returned (as skimage does).

    Args:
        values: Any array of finite numbers (flattened).

    Returns:
        The threshold: values above it form the upper class.

    Raises:
        ValueError: If ``values`` is empty or holds NaN or infinity.
    """
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    if not np.all(np.isfinite(flat)):
        raise ValueError("otsu_threshold needs finite values")
    return float(threshold_otsu(flat))


def grey_level(rgb: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1] of a uint8 HxWx3 image (same weights as ``skimage.color.rgb2gray``)."""
    return (_check_rgb(rgb).astype(np.float64) / 255.0) @ _LUMA


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 HxWx3 image; 0 for black pixels."""
    arr = _check_rgb(rgb).astype(np.float64)
    top = arr.max(axis=-1)
    spread = top - arr.min(axis=-1)
    return np.divide(spread, top, out=np.zeros_like(top), where=top > 0)


def tissue_mask(
    rgb: np.ndarray, min_object_px: int = 64, channel: str = "grey", min_contrast: float = 0.04
) -> np.ndarray:
    """Boolean mask of the tissue in an H&E image, by Otsu's threshold on one channel.

    Channels:
        ``"grey"``: luminance (``grey_level``); tissue is darker than the threshold.
        ``"saturation"``: HSV saturation (``saturation``); tissue is above the threshold.

    Otsu always splits, even an image of background and noise. The split is
    therefore kept only when the means of its two classes differ by at least
    ``min_contrast`` (on the [0, 1] channel); otherwise the image is taken to be
    one class, background, and the mask is all False. A constant image is all
    False. Connected tissue regions (4-connectivity) under ``min_object_px``
    pixels are then dropped.

    Args:
        rgb: uint8 image, HxWx3.
        min_object_px: Smallest tissue region kept, in pixels (0 keeps all).
        channel: ``"grey"`` or ``"saturation"``.
        min_contrast: Smallest gap between the class means for the split to count.

    Returns:
        HxW bool array, True on tissue.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    values = grey_level(rgb) if channel == "grey" else saturation(rgb)
    if values.size == 0 or values.min() == values.max():
        return np.zeros(values.shape, dtype=bool)
    threshold = otsu_threshold(values)
    upper = values > threshold
    if not upper.any() or upper.all() or values[upper].mean() - values[~upper].mean() < min_contrast:
        return np.zeros(values.shape, dtype=bool)
    mask = ~upper if channel == "grey" else upper
    return remove_small_regions(mask, min_object_px)


def remove_small_regions(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop the 4-connected True regions of a 2-D mask that have fewer than ``min_px`` pixels.

    Done with ``scipy.ndimage`` rather than ``skimage.morphology.remove_small_objects``
    because the latter's size argument changed meaning between skimage releases.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_px <= 1 or not mask.any():
        return mask.copy()
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False  # label 0 is the background
    return keep[labels]


def window_tissue_fraction(mask: np.ndarray, size: int) -> np.ndarray:
    """Fraction of tissue in the ``size`` x ``size`` window centred on every pixel, in O(HW).

    The window around pixel (i, j) spans rows ``i - size // 2`` to
    ``i - size // 2 + size - 1`` (columns alike), so for even sizes the centre
    is the lower-right of the four middle pixels. Parts of the window outside
    the image count as background, so the fraction near the border says how much
    of a patch centred there would be tissue. Computed from one integral image.

    Args:
        mask: HxW boolean (or 0/1) tissue mask.
        size: Window side in pixels, >= 1.

    Returns:
        HxW float64 array in [0, 1].
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    before, after = size // 2, size - size // 2
    # zero padding makes every window a full size x size box of the padded integral image
    padded = np.pad(mask.astype(np.int64), ((before, after), (before, after)))
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)
    total = (
        integral[size : size + h, size : size + w]
        - integral[:h, size : size + w]
        - integral[size : size + h, :w]
        + integral[:h, :w]
    )
    return total / float(size * size)


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of True pixels in a mask (0.0 for an empty mask)."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else 0.0


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    """The image as an array, after checking it is uint8 HxWx3."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    return arr
