"""Tests of data.tissue: Otsu threshold, tissue masks and windowed tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from data.tissue import (
    grey_level,
    otsu_threshold,
    remove_small_regions,
    saturation,
    tissue_fraction,
    tissue_mask,
    window_tissue_fraction,
)


@pytest.fixture(scope="module")
def he_image(he_pixels: np.ndarray) -> np.ndarray:
    """The real H&E sample, every 4th pixel (about 740 x 555) to keep tests fast."""
    return he_pixels[::4, ::4].copy()


def test_otsu_equals_skimage_on_random_values() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.3, 0.05, 5000), rng.normal(0.8, 0.1, 3000)])
    assert otsu_threshold(values) == threshold_otsu(values)


def test_otsu_equals_skimage_on_real_image(he_image: np.ndarray) -> None:
    grey = grey_level(he_image)
    assert otsu_threshold(grey) == threshold_otsu(grey)
    sat = saturation(he_image)
    assert otsu_threshold(sat) == threshold_otsu(sat)


def test_otsu_constant_and_invalid_input() -> None:
    assert otsu_threshold(np.full(10, 0.7)) == threshold_otsu(np.full(10, 0.7))
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))
    with pytest.raises(ValueError):
        otsu_threshold(np.array([0.1, np.nan]))


def test_grey_and_saturation_match_skimage(he_image: np.ndarray) -> None:
    from skimage.color import rgb2gray, rgb2hsv

    crop = he_image[:64, :64]
    # both float64 on values <= 1: a 3-term dot product and one ratio, a few ulps (~1e-16) apart on any CPU
    np.testing.assert_allclose(grey_level(crop), rgb2gray(crop), atol=1e-12)
    np.testing.assert_allclose(saturation(crop), rgb2hsv(crop)[..., 1], atol=1e-7)


@pytest.mark.parametrize("channel", ["grey", "saturation"])
def test_real_image_has_plausible_tissue_fraction(he_image: np.ndarray, channel: str) -> None:
    mask = tissue_mask(he_image, channel=channel)
    assert mask.dtype == bool and mask.shape == he_image.shape[:2]
    # the sample is a strip of skin on glass: roughly a quarter of the field is tissue
    assert 0.15 < tissue_fraction(mask) < 0.45
    # the top-right and bottom-left corners are bare glass (the top-left holds debris)
    assert not mask[:60, -60:].any() and not mask[-60:, :60].any()
    grey = grey_level(he_image)
    assert grey[mask].mean() < grey[~mask].mean() - 0.2


def test_channels_agree_on_real_image(he_image: np.ndarray) -> None:
    grey = tissue_mask(he_image, channel="grey")
    sat = tissue_mask(he_image, channel="saturation")
    assert (grey & sat).sum() / (grey | sat).sum() > 0.8


@pytest.mark.parametrize("channel", ["grey", "saturation"])
def test_background_only_images_give_empty_masks(channel: str) -> None:
    white = np.full((64, 80, 3), 255, np.uint8)
    assert not tissue_mask(white, channel=channel).any()
    flat = np.full((64, 80, 3), (200, 120, 170), np.uint8)
    assert not tissue_mask(flat, channel=channel).any()
    rng = np.random.default_rng(1)
    glass = np.clip(244 + rng.integers(-4, 5, (64, 80, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, channel=channel).any()  # noise alone is not tissue


def test_small_objects_are_removed() -> None:
    img = np.full((60, 60, 3), 240, np.uint8)
    img[10:30, 10:30] = (120, 60, 130)  # 400 px region
    img[50:53, 50:53] = (120, 60, 130)  # 9 px speck
    mask = tissue_mask(img, min_object_px=64)
    assert mask[10:30, 10:30].all()
    assert not mask[50:53, 50:53].any()
    assert mask.sum() == 400
    assert tissue_mask(img, min_object_px=0).sum() == 409


def test_remove_small_regions_keeps_exact_threshold() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0, :5] = True  # 5 px
    mask[5:7, 5:7] = True  # 4 px
    kept = remove_small_regions(mask, 5)
    assert kept[0, :5].all() and not kept[5:7, 5:7].any()


def test_tissue_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4, 3), np.uint8), channel="hue")
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4), np.uint8))


def _brute_force_fraction(mask: np.ndarray, size: int) -> np.ndarray:
    h, w = mask.shape
    before = size // 2
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            r0, c0 = i - before, j - before
            window = mask[max(r0, 0) : max(r0 + size, 0), max(c0, 0) : max(c0 + size, 0)]
            out[i, j] = window.sum() / size**2
    return out


@pytest.mark.parametrize("size", [1, 2, 5, 8, 31])
def test_window_fraction_matches_brute_force(size: int) -> None:
    rng = np.random.default_rng(size)
    mask = rng.random((23, 17)) < 0.4
    np.testing.assert_allclose(window_tissue_fraction(mask, size), _brute_force_fraction(mask, size), atol=1e-12)


def test_window_fraction_on_real_mask(he_image: np.ndarray) -> None:
    mask = tissue_mask(he_image)
    frac = window_tissue_fraction(mask, 56)
    assert frac.shape == mask.shape and frac.min() >= 0.0 and frac.max() <= 1.0
    assert frac.max() > 0.95  # somewhere a window is (nearly) all tissue
    assert frac[~mask].mean() < frac[mask].mean()
    with pytest.raises(ValueError):
        window_tissue_fraction(mask, 0)


def test_tissue_fraction() -> None:
    assert tissue_fraction(np.array([[True, False], [False, False]])) == 0.25
    assert tissue_fraction(np.zeros((0, 3), bool)) == 0.0
