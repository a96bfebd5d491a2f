"""Tests of the synthetic CRC-HGD generator (the data.synthetic package)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from data.records import GRADE_NAMES, MAGNIFICATIONS
from data.synthetic import (
    CLASS_FOLDERS,
    CUE_AGREEMENT,
    MANIFEST_COLUMNS,
    StainProfile,
    SyntheticSpec,
    default_root,
    draw_cue_grade,
    generate,
    render_image,
)

#: Small enough to render in a second or two, big enough to hold glands and nuclei.
SPEC = SyntheticSpec(num_hospitals=2, patients_per_grade=2, images_per_patient=4, image_size=256, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A generated dataset, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate(root, SPEC, progress=False).parent


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def tissue_of(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels by Otsu's threshold on HSV saturation (glass is grey, stains are not)."""
    top = rgb.max(axis=-1).astype(float)
    sat = (top - rgb.min(axis=-1)) / np.maximum(top, 1.0)
    return sat > threshold_otsu(sat)


def mean_haematoxylin(rgb: np.ndarray) -> float:
    """Mean haematoxylin optical density of the tissue, by skimage's colour deconvolution."""
    return float(rgb2hed(rgb)[..., 0][tissue_of(rgb)].mean())


# ------------------------------------------------------------------- layout


def test_manifest_header_and_row_count(dataset: Path) -> None:
    with open(dataset / "manifest.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == MANIFEST_COLUMNS == ("path", "label", "magnification", "patient", "hospital")
    expected = SPEC.num_hospitals * len(GRADE_NAMES) * SPEC.patients_per_grade * SPEC.images_per_patient
    assert len(read_rows(dataset)) == expected


def test_rows_match_the_folder_layout(dataset: Path) -> None:
    rows = read_rows(dataset)
    for row in rows:
        path = dataset / row["path"]
        assert path.is_file(), row
        class_folder, mag_folder, name = Path(row["path"]).parts
        assert CLASS_FOLDERS.index(class_folder) == int(row["label"])
        assert mag_folder == row["magnification"] and mag_folder in MAGNIFICATIONS
        hospital, patient_number = row["patient"].split("-")
        assert hospital == row["hospital"]
        assert name.startswith(f"{hospital}_{patient_number}_{mag_folder}_")
        assert name.endswith(".jpg")
    assert {row["hospital"] for row in rows} == {"H1", "H2"}
    assert {int(row["label"]) for row in rows} == {0, 1, 2}
    assert {row["magnification"] for row in rows} == set(SPEC.magnifications)
    jpgs = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.jpg"))
    assert jpgs == sorted(row["path"] for row in rows)


def test_patients_keep_one_hospital_and_one_grade(dataset: Path) -> None:
    hospitals, labels, mags = defaultdict(set), defaultdict(set), defaultdict(list)
    for row in read_rows(dataset):
        hospitals[row["patient"]].add(row["hospital"])
        labels[row["patient"]].add(row["label"])
        mags[row["patient"]].append(row["magnification"])
    assert len(hospitals) == SPEC.num_hospitals * len(GRADE_NAMES) * SPEC.patients_per_grade
    assert all(len(h) == 1 for h in hospitals.values())
    assert all(len(g) == 1 for g in labels.values())
    # Four images over four magnifications: one of each per patient.
    assert all(sorted(m) == sorted(SPEC.magnifications) for m in mags.values())


def test_images_have_the_spec_size(dataset: Path) -> None:
    for row in read_rows(dataset)[::5]:
        with Image.open(dataset / row["path"]) as image:
            assert image.format == "JPEG"
            assert image.size == (SPEC.image_size, SPEC.image_size)
            assert image.mode == "RGB"


def test_spec_json_records_the_spec(dataset: Path) -> None:
    document = json.loads((dataset / "spec.json").read_text())
    assert document["spec"]["seed"] == SPEC.seed
    assert document["spec"]["image_size"] == SPEC.image_size
    assert document["spec"]["magnifications"] == list(SPEC.magnifications)
    assert isinstance(document["generator_version"], int)


# ------------------------------------------------------ determinism, caching


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_spec_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SPEC, progress=False).parent
    first, second = all_files(dataset), all_files(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_another_seed_gives_other_images(dataset: Path, tmp_path: Path) -> None:
    spec = SyntheticSpec(
        num_hospitals=1, patients_per_grade=1, images_per_patient=1, image_size=256, seed=SPEC.seed + 1
    )
    other = generate(tmp_path / "other", spec, progress=False).parent
    name = read_rows(other)[0]["path"]
    assert (other / name).read_bytes() != (dataset / name).read_bytes()


def test_second_call_returns_at_once_without_rewriting(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=2, image_size=128)
    manifest = generate(tmp_path / "d", spec, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*") if p.is_file()}
    assert generate(tmp_path / "d", spec, progress=True) == manifest
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_interrupted_run_is_resumed(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=2, image_size=128)
    root = tmp_path / "d"
    generate(root, spec, progress=False)
    complete = all_files(root)
    rows = read_rows(root)
    # An interruption leaves no manifest and some images missing.
    (root / "manifest.csv").unlink()
    (root / rows[-1]["path"]).unlink()
    kept = root / rows[0]["path"]
    stamp = kept.stat().st_mtime_ns
    generate(root, spec, progress=False)
    assert all_files(root) == complete
    assert kept.stat().st_mtime_ns == stamp


def test_no_manifest_means_regeneration_for_a_changed_spec(tmp_path: Path) -> None:
    small = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=2, image_size=128)
    root = tmp_path / "d"
    generate(root, small, progress=False)
    (root / "manifest.csv").unlink()
    fewer = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=1, image_size=128, seed=1)
    generate(root, fewer, progress=False)
    rows = read_rows(root)
    assert len(rows) == len(GRADE_NAMES)
    # Images of the abandoned spec are gone, so folder scans agree with the manifest.
    assert len(list(root.rglob("*.jpg"))) == len(rows)


def test_refuses_a_folder_that_is_not_a_synthetic_dataset(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "photos", SPEC, progress=False)
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"mine"


def test_refuses_to_overwrite_a_finished_dataset_of_another_spec(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=1, image_size=128)
    generate(tmp_path / "d", spec, progress=False)
    with pytest.raises(FileExistsError):
        generate(
            tmp_path / "d",
            SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=1, image_size=128, seed=5),
            progress=False,
        )


def test_default_root_follows_cache_variable_and_spec(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    root = default_root(SPEC)
    assert root.parent == tmp_path and root.name.startswith("synthetic-")
    assert default_root(SyntheticSpec(**SPEC.to_dict())) == root
    assert default_root(SyntheticSpec(image_size=256, seed=8)) != default_root(SyntheticSpec(image_size=256, seed=7))
    monkeypatch.delenv("FEDSIM_CACHE")
    assert default_root(SPEC).parent == Path.home() / ".cache" / "fedsim"


# ------------------------------------------------------------ H&E likeness


def test_images_hold_tissue_and_glass(dataset: Path) -> None:
    fractions = []
    for row in read_rows(dataset):
        rgb = load(dataset / row["path"])
        fractions.append(1.0 - tissue_of(rgb).mean())
    # Glass around the section and in lumens, but tissue dominates.
    assert 0.1 < np.mean(fractions) < 0.5
    assert min(fractions) > 0.02 and max(fractions) < 0.8


def test_glass_is_bright_and_tissue_is_pink_purple(dataset: Path) -> None:
    for row in read_rows(dataset)[::3]:
        rgb = load(dataset / row["path"])
        tissue = tissue_of(rgb)
        r, g, b = rgb[tissue].astype(float).mean(axis=0)
        assert r > g + 10 and b > g + 10, row["path"]
        # The brightest pixels are bare glass: near white, barely tinted.
        grey = rgb.astype(float).mean(axis=-1)
        glass = rgb[grey >= np.percentile(grey, 97)].astype(float)
        assert glass.mean() > 220, row["path"]
        assert np.ptp(glass.mean(axis=0)) < 30, row["path"]


# -------------------------------------------------------------------- grades


def rendered_haematoxylin(grade: int, count: int = 12, **cues: int) -> float:
    """Mean tissue haematoxylin over images of one grade at every magnification."""
    values = []
    for i in range(count):
        rng = np.random.default_rng([99, grade, i])
        mag = MAGNIFICATIONS[i % len(MAGNIFICATIONS)]
        values.append(mean_haematoxylin(render_image(grade, mag, StainProfile(), rng, 192, **cues)))
    return float(np.mean(values))


def test_haematoxylin_rises_with_grade_in_the_dataset(dataset: Path) -> None:
    per_grade = defaultdict(list)
    for row in read_rows(dataset):
        per_grade[int(row["label"])].append(mean_haematoxylin(load(dataset / row["path"])))
    means = [np.mean(per_grade[g]) for g in range(len(GRADE_NAMES))]
    assert means[0] < means[1] < means[2]


def test_nuclear_cue_alone_raises_haematoxylin() -> None:
    # Same architecture, nuclei of rising grade: bigger, darker, more pleomorphic.
    means = [rendered_haematoxylin(1, architecture=1, nuclear=g) for g in range(3)]
    assert means[0] < means[1] < means[2]


def white_of(rgb: np.ndarray) -> np.ndarray:
    """Unstained pixels: glass and gland lumens."""
    top = rgb.max(axis=-1).astype(float)
    return (top - rgb.min(axis=-1)) / np.maximum(top, 1.0) < 0.12


def lumen_solidity(rgb: np.ndarray) -> float:
    """Area-weighted solidity of the unstained regions inside the image (1 for convex ones)."""
    size = rgb.shape[0]
    regions = [
        p
        for p in regionprops(label(white_of(rgb)))
        if 20 < p.area < 3000 and min(p.bbox[:2]) > 0 and max(p.bbox[2:]) < size
    ]
    if not regions:
        return float("nan")
    return float(np.average([p.solidity for p in regions], weights=[p.area for p in regions]))


def test_architecture_cue_alone_changes_gland_formation() -> None:
    # Same seed (hence the same section outline) and nuclei; only the architecture changes.
    white, solidity = defaultdict(list), defaultdict(list)
    for i in range(8):
        for arch in range(3):
            rng = np.random.default_rng([98, i])
            rgb = render_image(arch, "10x", StainProfile(), rng, 192, architecture=arch, nuclear=1)
            white[arch].append(white_of(rgb).mean())
            solidity[arch].append(lumen_solidity(rgb))
    # Sheets (III) have hardly any lumens; glands (I, II) do.
    assert np.mean(white[2]) < 0.8 * min(np.mean(white[0]), np.mean(white[1]))
    # Grade I lumens are round, Grade II lumens irregular and fused.
    assert np.nanmean(solidity[0]) > np.nanmean(solidity[1]) + 0.1


def test_cue_grades_agree_with_the_label_three_times_in_four() -> None:
    rng = np.random.default_rng(0)
    for grade in range(len(GRADE_NAMES)):
        draws = np.array([draw_cue_grade(grade, rng) for _ in range(4000)])
        assert abs(np.mean(draws == grade) - CUE_AGREEMENT) < 0.03
        assert np.all(np.abs(draws - grade) <= 1)
        assert draws.min() >= 0 and draws.max() < len(GRADE_NAMES)
    middle = np.array([draw_cue_grade(1, rng) for _ in range(4000)])
    assert abs(np.mean(middle == 0) - np.mean(middle == 2)) < 0.04


def test_magnification_scales_the_structures() -> None:
    # The same section at rising magnification: fewer, larger glands in view.
    counts = {mag: 0 for mag in MAGNIFICATIONS}
    for i in range(3):
        for mag in MAGNIFICATIONS:
            rng = np.random.default_rng([4, i])
            rgb = render_image(0, mag, StainProfile(), rng, 256, architecture=0, nuclear=0)
            sizes = np.bincount(label(white_of(rgb)).ravel())[1:]
            counts[mag] += int((sizes >= 4).sum())
    ordered = [counts[mag] for mag in MAGNIFICATIONS]
    assert ordered == sorted(ordered, reverse=True) and len(set(ordered)) == len(ordered)


# ----------------------------------------------------------------- hospitals


def stain_colour(rgb: np.ndarray) -> np.ndarray:
    """Chromaticity (percent) of the lighter half of the tissue, mostly eosin-stained."""
    tissue = rgb[tissue_of(rgb)].astype(float)
    grey = tissue.mean(axis=1)
    light = tissue[grey > np.median(grey)]
    return 100.0 * (light / light.sum(axis=1, keepdims=True)).mean(axis=0)


def test_hospitals_differ_in_colour_more_than_images_within_one(dataset: Path) -> None:
    # Compare like with like: images of the same grade and magnification.
    colours = defaultdict(lambda: defaultdict(list))
    for row in read_rows(dataset):
        cell = (row["label"], row["magnification"])
        colours[cell][row["hospital"]].append(stain_colour(load(dataset / row["path"])))
    between, within = [], []
    for by_hospital in colours.values():
        h1, h2 = np.array(by_hospital["H1"]), np.array(by_hospital["H2"])
        between.append(np.linalg.norm(h1.mean(axis=0) - h2.mean(axis=0)))
        within.extend(np.linalg.norm(h[0] - h[1]) for h in (h1, h2))
    assert np.mean(between) > 1.5 * np.mean(within)


def test_same_content_changes_colour_with_the_hospital() -> None:
    def colour(profile: StainProfile) -> np.ndarray:
        rgb = render_image(1, "20x", profile, np.random.default_rng(3), 192)
        return rgb[tissue_of(rgb)].astype(float).mean(axis=0)

    labs = [StainProfile.for_hospital(0, h) for h in range(3)]
    slides = [labs[0].jittered(np.random.default_rng(s)) for s in range(2)]
    slide_gap = np.linalg.norm(colour(slides[0]) - colour(slides[1]))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.linalg.norm(colour(labs[a]) - colour(labs[b])) > 2 * slide_gap


def test_stain_profiles_are_deterministic_and_h1_is_near_standard() -> None:
    assert StainProfile.for_hospital(3, 1) == StainProfile.for_hospital(3, 1)
    assert StainProfile.for_hospital(3, 1) != StainProfile.for_hospital(3, 2)
    assert StainProfile.for_hospital(3, 1) != StainProfile.for_hospital(4, 1)
    standard = np.array(StainProfile().haematoxylin)
    for seed in range(5):
        profile = StainProfile.for_hospital(seed, 0)
        turn = np.degrees(np.arccos(np.clip(np.dot(profile.haematoxylin, standard), -1, 1)))
        assert turn < 2.5
        other = StainProfile.for_hospital(seed, 1)
        assert np.degrees(np.arccos(np.dot(other.haematoxylin, standard))) > 5.0
        for vector in (profile.haematoxylin, profile.eosin):
            assert np.all(np.array(vector) > 0) and abs(np.linalg.norm(vector) - 1) < 1e-9


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hospitals", 0),
        ("patients_per_grade", 0),
        ("patients_per_grade", True),
        ("images_per_patient", 1.5),
        ("image_size", 16),
        ("magnifications", ("5x",)),
        ("magnifications", ()),
        ("magnifications", ("4x", "4x")),
        ("seed", -1),
        ("jpeg_quality", 101),
    ],
)
def test_spec_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**{field: value})


def test_spec_accepts_a_list_of_magnifications() -> None:
    spec = SyntheticSpec(magnifications=["10x", "40x"])
    assert spec.magnifications == ("10x", "40x")
    assert hash(spec) == hash(SyntheticSpec(magnifications=("10x", "40x")))


def test_the_package_keeps_the_names_callers_import() -> None:
    import data.synthetic as synthetic

    assert all(hasattr(synthetic, name) for name in synthetic.__all__)
    # data.benchmark draws with these primitives of the renderer.
    assert all(callable(getattr(synthetic, name)) for name in ("_fibres", "_noise", "_scatter", "_harmonic_edge"))


def test_render_image_checks_its_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="grade"):
        render_image(3, "10x", StainProfile(), rng, 64)
    with pytest.raises(ValueError, match="magnification"):
        render_image(0, "15x", StainProfile(), rng, 64)
    image = render_image(0, "10x", StainProfile(), rng, 96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
