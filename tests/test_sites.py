"""Tests of data.sites: simulated per-hospital lab differences."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import CachedPairs, CacheSpec, build_split
from data.datasets import SkipReport
from data.labs import LabStain
from data.patches import PatchSpec
from data.records import ImageRecord
from data.sites import STANDARD_EOSIN, STANDARD_HAEMATOXYLIN, SiteProfile, stain_basis, unit_vector
from data.stain import Macenko

CORNERS = [(1800, 700), (2200, 900), (2500, 1200), (1500, 800)]


@pytest.fixture(scope="module")
def he_crops(he_pixels: np.ndarray) -> list[np.ndarray]:
    """Four 256 x 256 tissue crops of the real H&E sample."""
    return [he_pixels[r : r + 256, c : c + 256].copy() for r, c in CORNERS]


def _render(amounts: np.ndarray, haematoxylin, eosin, gains=(1.0, 1.0)) -> np.ndarray:
    """Beer-Lambert image (uint8) of H and E amounts (H, W, 2) with the given stain vectors."""
    od = amounts[..., :1] * gains[0] * np.asarray(unit_vector(haematoxylin)) + amounts[..., 1:] * gains[1] * np.asarray(
        unit_vector(eosin)
    )
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def test_zero_strength_is_the_identity(he_crops):
    profile = SiteProfile.for_hospital(0, "H1", 0.0)
    out = profile.apply(he_crops[0])
    assert profile.is_identity
    assert np.array_equal(out, he_crops[0]) and out is not he_crops[0]


def test_profiles_are_fixed_by_seed_and_hospital():
    a = SiteProfile.for_hospital(3, "H2", 1.0)
    assert a == SiteProfile.for_hospital(3, "H2", 1.0)
    assert a != SiteProfile.for_hospital(3, "H1", 1.0)
    assert a != SiteProfile.for_hospital(4, "H2", 1.0)
    assert not a.is_identity and 0 < a.jpeg_quality <= 95 and a.blur_sigma >= 0 and a.brightness > 0


def test_stronger_shift_turns_stains_further():
    def turn(strength):
        p = SiteProfile.for_hospital(0, "H1", strength)
        return math.degrees(math.acos(np.dot(p.haematoxylin, unit_vector(STANDARD_HAEMATOXYLIN))))

    assert 0 < turn(0.5) < turn(1.0) < turn(2.0)


def test_restaining_follows_beer_lambert():
    # A tissue-like image rendered with the standard stains, re-stained by a lab with turned vectors
    # and other dye strengths, equals the same amounts rendered with the lab's stains.
    rng = np.random.default_rng(0)
    amounts = rng.uniform(0.0, 1.2, (64, 64, 2))
    lab = SiteProfile(
        haematoxylin=unit_vector((0.55, 0.75, 0.36)), eosin=unit_vector((0.12, 0.95, 0.25)), h_gain=1.3, e_gain=0.8
    )
    source = _render(amounts, STANDARD_HAEMATOXYLIN, STANDARD_EOSIN)
    expected = _render(amounts, lab.haematoxylin, lab.eosin, (lab.h_gain, lab.e_gain))
    diff = np.abs(lab.apply(source).astype(int) - expected.astype(int))
    # only the source's rounding to uint8 separates them (in exact arithmetic: mean 0.22, max 1); the float32 matmul and
    # exp of the lab, CPU-dependent by a few ulps (~3e-5 of a level), move a value only within that of a rounding
    # boundary, by one level: the max may reach 2, the mean moves by ~1e-4
    assert diff.mean() < 0.3 and diff.max() <= 2


def test_stain_transform_keeps_the_residual():
    lab = SiteProfile(h_gain=2.0)
    residual = stain_basis(STANDARD_HAEMATOXYLIN, STANDARD_EOSIN)[2]
    # float64 3x3 inverse and products of unit vectors: ~1e-16 times a condition number of a few
    np.testing.assert_allclose(residual @ lab.stain_transform(), residual, atol=1e-12)


def test_brightness_scales_the_light():
    glass = np.full((8, 8, 3), 239, np.uint8)
    out = SiteProfile(brightness=0.9).apply(glass)
    assert np.all(out == round(240 * 0.9 - 1))


def test_blur_and_jpeg_degrade_detail(he_crops):
    crop = he_crops[1]

    def sharpness(img):  # mean gradient magnitude of the grey image
        grey = img.astype(np.float64).mean(-1)
        return np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()

    assert sharpness(SiteProfile(blur_sigma=1.0).apply(crop)) < 0.8 * sharpness(crop)
    error = {q: np.abs(SiteProfile(jpeg_quality=q).apply(crop).astype(int) - crop).mean() for q in (30, 90)}
    assert error[30] > error[90] > 0


def test_macenko_sees_the_turned_haematoxylin(he_crops):
    # The stain matrix Macenko estimates on a lab's version of real tissue turns with the lab's haematoxylin.
    lab = SiteProfile(haematoxylin=SiteProfile.for_hospital(0, "H1", 2.0).haematoxylin)
    batch = torch.from_numpy(np.stack(he_crops)).permute(0, 3, 1, 2).contiguous()
    shifted = torch.from_numpy(np.stack([lab.apply(c) for c in he_crops])).permute(0, 3, 1, 2).contiguous()
    norm = Macenko(stride=1)
    before, _, ok_before = norm.stain_matrix(batch)
    after, _, ok_after = norm.stain_matrix(shifted)
    assert ok_before.all() and ok_after.all()
    cos = (before[:, :, 0] * after[:, :, 0]).sum(1).clamp(-1, 1)
    turned = torch.rad2deg(torch.arccos(cos))
    set_turn = math.degrees(math.acos(np.dot(lab.haematoxylin, unit_vector(STANDARD_HAEMATOXYLIN))))
    assert set_turn > 5 and bool((turned > 0.3 * set_turn).all()), (turned, set_turn)


def test_bad_input_and_strength():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        SiteProfile(h_gain=2.0).apply(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        SiteProfile(h_gain=2.0).apply(np.zeros((4, 4, 3), np.float32))
    for bad in (-1.0, math.inf, math.nan, 4.5):
        with pytest.raises(ValueError, match="must lie in"):
            SiteProfile.for_hospital(0, "H1", bad)
    strongest = SiteProfile.for_hospital(0, "H1", 4.0)  # the largest allowed strength still works
    assert 1 <= strongest.jpeg_quality <= 95 and strongest.h_gain > 0


def test_sites_and_the_synthetic_renderer_share_one_lab_stain_model():
    from data.synthetic import StainProfile

    lab_fields = [f.name for f in fields(LabStain)]
    assert lab_fields == ["haematoxylin", "eosin", "h_gain", "e_gain"]
    for profile in (SiteProfile.for_hospital(0, "H2", 1.0), StainProfile.for_hospital(0, 1)):
        assert isinstance(profile, LabStain)
        assert [f.name for f in fields(profile)][:4] == lab_fields
        stain = LabStain(*(getattr(profile, name) for name in lab_fields))
        assert stain.turns() == profile.turns() and stain.turns()[0] > 0.5
        np.testing.assert_array_equal(stain.stain_transform(), profile.stain_transform())
    synthetic = StainProfile.for_hospital(3, 2)
    assert (synthetic.h_strength, synthetic.e_strength) == (synthetic.h_gain, synthetic.e_gain)
    # Standard H&E is the default of every profile, and re-staining with it changes nothing.
    assert LabStain() == LabStain(*(getattr(SiteProfile(), name) for name in lab_fields))
    assert LabStain().haematoxylin == StainProfile().haematoxylin == unit_vector(STANDARD_HAEMATOXYLIN)
    np.testing.assert_allclose(LabStain().stain_transform(), np.eye(3), atol=1e-12)
    # site_profiles.json keeps its keys, in their order.
    assert list(SiteProfile().to_dict()) == [*lab_fields, "brightness", "blur_sigma", "jpeg_quality"]


def _pooled_records(root: Path, crops: list[np.ndarray]) -> list[ImageRecord]:
    """The same four image files given to each of two hospitals: any difference between them is the labs'."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, crop in enumerate(crops):
        path = root / f"img{i}.png"
        Image.fromarray(crop).save(path)
        records += [
            ImageRecord(str(path), label=i % 3, patient=f"{h}-{i}", hospital=h, split="train") for h in ("H1", "H2")
        ]
    return records


def _hospital_gap(records, root: Path, stain: str, shift: float) -> float:
    """Distance between the two hospitals' mean optical density over their cached detail patches."""
    spec = CacheSpec(PatchSpec(96, 64, 128, 0.3), 32, stain, "", 0, shift)
    means = []
    for hospital in ("H1", "H2"):
        mine = [r for r in records if r.hospital == hospital]
        folder = build_split(mine, spec, root, SkipReport(), name=hospital, progress=False)
        _, detail = CachedPairs([folder]).arrays()[0]
        means.append(-np.log((detail.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0).mean(0))
    return float(np.linalg.norm(means[0] - means[1]))


def test_site_shift_separates_hospitals_and_normalization_narrows_it(tmp_path, he_crops):
    records = _pooled_records(tmp_path / "images", he_crops)
    without = _hospital_gap(records, tmp_path / "cache", "none", 0.0)
    shifted = _hospital_gap(records, tmp_path / "cache", "none", 1.0)
    normalized = _hospital_gap(records, tmp_path / "cache", "macenko", 1.0)
    assert without == 0.0  # same files, same patches: nothing tells the hospitals apart
    assert shifted > 0.1  # the labs do
    assert normalized < 0.5 * shifted  # and stain normalization removes most of it


def test_prepare_writes_site_profiles(tmp_path, he_crops, capsys):
    from data.prepare import main

    rows = []
    for hospital in ("H1", "H2"):  # a manifest lists each file once, so each hospital gets its own copies
        for i, crop in enumerate(he_crops):
            path = tmp_path / hospital / f"img{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(crop).save(path)
            rows.append(f"{path},{i % 3},{hospital}-{i},{hospital}\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient,hospital\n" + "".join(rows))
    args = [
        "--data",
        str(manifest),
        "--out",
        str(tmp_path / "cache"),
        "--hospitals",
        "2",
        "--split",
        "1",
        "0",
        "0",
        "--context-size",
        "96",
        "--detail-size",
        "64",
        "--context-fov",
        "128",
        "--site-shift",
        "1",
    ]
    assert main(args) == 0
    saved = json.loads((tmp_path / "cache" / "site_profiles.json").read_text())
    assert set(saved["hospitals"]) == {"H1", "H2"} and saved["site_shift"] == 1.0
    assert SiteProfile(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["hospitals"]["H2"].items()}
    ) == SiteProfile.for_hospital(0, "H2", 1.0)
    for bad in ("-0.5", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main([*args[:-1], bad])
        assert exit_info.value.code == 2 and "--site-shift must lie in [0, 4]" in capsys.readouterr().err
