"""Tests of image decoding, folder scanning and manifests (data/images.py, data/discovery/, data/report.py)."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HE_SAMPLE
from data.discovery import (
    grade_from_folder,
    load_records,
    magnification_from_name,
    read_manifest,
    resolve_classes,
    scan_tree,
)
from data.images import IMAGE_SUFFIXES, BadImage, is_image_name, load_rgb, probe
from data.records import EXTRA_CLASS_NAMES, GRADE_NAMES, UNKNOWN
from data.report import SkipReport

_CROPS: list[np.ndarray] = []


def _tile(index: int = 0, size: int = 24) -> np.ndarray:
    """A small RGB tile: a crop of the real H&E sample when present, else noise."""
    if not _CROPS:
        if HE_SAMPLE.is_file():
            with Image.open(HE_SAMPLE) as img:
                region = np.asarray(img.convert("RGB").crop((800, 800, 1312, 1312)))
            _CROPS.extend(region[y : y + 64, x : x + 64] for y in range(0, 512, 64) for x in range(0, 512, 64))
        else:
            rng = np.random.default_rng(0)
            _CROPS.extend(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8))
    return np.ascontiguousarray(_CROPS[index % len(_CROPS)][:size, :size])


def _save(path: Path, index: int = 0) -> Path:
    """Write a small tile to ``path`` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".bmp": "BMP"}
    Image.fromarray(_tile(index)).save(path, fmt[path.suffix.lower()])
    return path


# --- class and magnification names -------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("CRC_Grade__1__Well_Diff", 0),
        ("CRC_Grade__2__Mod_Diff", 1),
        ("CRC_Grade__3__Poorly_Diff", 2),
        ("Grade_1", 0),
        ("grade2", 1),
        ("G3", 2),
        ("g1", 0),
        ("Grade I", 0),
        ("Grade II", 1),
        ("Grade III", 2),
        ("GRADE-iii", 2),
        ("grade_ii", 1),
        ("well", 0),
        ("Well_Diff", 0),
        ("well-differentiated", 0),
        ("moderately", 1),
        ("mod_diff", 1),
        ("Moderate", 1),
        ("Moderately-Differentiated", 1),
        ("poorly", 2),
        ("poor_diff", 2),
        ("POORLY_DIFFERENTIATED", 2),
        # traps
        ("Normal_Colon", None),
        ("normal", None),
        ("Mixed_Normal_Tumoral_Colon", None),
        ("mixed", None),
        ("II", None),
        ("III", None),
        ("Batch_2", None),
        ("10x", None),
        ("Grade_1_Poorly", None),
        ("Grade 4", None),
        ("images", None),
        ("", None),
        ("Welldone", None),
        ("model", None),
        ("GradeIII", 2),
        ("gradeii", 1),
        ("Grade II-III", None),
        ("Grade 1-2", None),
        ("Grade_3_2019", 2),
    ],
)
def test_grade_from_folder(name: str, expected: int | None) -> None:
    assert grade_from_folder(name) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Normal_Colon", 3),
        ("normal", 3),
        ("NORMAL", 3),
        ("Mixed_Normal_Tumoral_Colon", 4),
        ("mixed", 4),
        ("CRC_Grade__3__Poorly_Diff", 2),
        ("Grade_2_Normal", None),
        ("tumour", None),
    ],
)
def test_grade_from_folder_with_extras(name: str, expected: int | None) -> None:
    assert grade_from_folder(name, extras=True) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("4x", "4x"),
        ("10X", "10x"),
        ("20x", "20x"),
        ("40x", "40x"),
        ("4X", "4x"),
        ("x40", "40x"),
        ("X10", "10x"),
        ("40X_slide3.jpg", "40x"),
        ("p07_x20_001.png", "20x"),
        ("040x", "40x"),
        ("P10x3", None),
        ("5x", None),
        ("400x", None),
        ("x", None),
        ("10x_40x", None),
        ("slide.jpg", None),
        ("Grade_1", None),
    ],
)
def test_magnification_from_name(name: str, expected: str | None) -> None:
    assert magnification_from_name(name) == expected


def test_resolve_classes_orders_and_rejects() -> None:
    assert resolve_classes(("mixed", "Grade III", "grade 1", "Grade II")) == (
        "Grade I",
        "Grade II",
        "Grade III",
        "Mixed",
    )
    with pytest.raises(ValueError, match="unknown class name 'Tumour'"):
        resolve_classes(("Tumour",))


@pytest.mark.parametrize(
    "classes, message",
    [
        (["Grade I", "grade 1", "Grade II"], "'Grade I' and 'grade 1' both mean 'Grade I'"),
        (["G1", "Grade I", "Grade II"], "'G1' and 'Grade I' both mean 'Grade I'"),
        (["Grade II", "Grade III", "poorly"], "'Grade III' and 'poorly' both mean 'Grade III'"),
        (["Grade I", "Grade II", "Grade I"], "'Grade I' is given twice"),
    ],
)
def test_resolve_classes_refuses_a_class_named_twice(classes: list[str], message: str) -> None:
    # Execute / Assert: one line naming both spellings, not a silently shorter class list
    with pytest.raises(ValueError, match=message) as info:
        resolve_classes(classes)
    assert "\n" not in str(info.value)


def test_is_image_name_case_insensitive() -> None:
    assert all(is_image_name(f"a{s.upper()}") and is_image_name(f"a{s}") for s in IMAGE_SUFFIXES)
    assert not is_image_name("notes.txt") and not is_image_name("jpg")


# --- folder trees -----------------------------------------------------------------


def _crc_tree(root: Path) -> dict[str, tuple[str, str]]:
    """A CRC-HGD-like tree; returns {file name: (class folder, magnification)}."""
    layout = {
        "CRC_Grade__1__Well_Diff/4X/p01_a.jpg": "4x",
        "CRC_Grade__1__Well_Diff/10x/p01_b.JPG": "10x",
        "CRC_Grade__1__Well_Diff/40x/deeper/slide/p02_c.png": "40x",
        "CRC_Grade__2__Mod_Diff/20X/p03_d.jpeg": "20x",
        "CRC_Grade__2__Mod_Diff/40x/p03_e.tif": "40x",
        "CRC_Grade__3__Poorly_Diff/p04_40X_f.jpg": "40x",
        "CRC_Grade__3__Poorly_Diff/p05_x10_g.bmp": "10x",
        "CRC_Grade__3__Poorly_Diff/p06_h.jpg": UNKNOWN,
        "Normal_Colon/10x/p07_i.jpg": "10x",
        "Mixed_Normal_Tumoral_Colon/20X/p08_j.jpg": "20x",
    }
    for i, rel in enumerate(layout):
        _save(root / rel, i)
    (root / "CRC_Grade__1__Well_Diff" / "4X" / "notes.txt").write_text("not an image")
    (root / "CRC_Grade__1__Well_Diff" / "4X" / ".DS_Store").write_bytes(b"\0junk")
    (root / "CRC_Grade__2__Mod_Diff" / "20X" / "empty.jpg").write_bytes(b"")
    _save(root / "Unsorted" / "stray.jpg")
    _save(root / "Unsorted" / "stray2.jpg")
    _save(root / "__MACOSX" / "CRC_Grade__1__Well_Diff" / "._p01_a.jpg")
    return {Path(rel).name: (rel.split("/")[0], mag) for rel, mag in layout.items()}


def test_scan_tree_crc_hgd_layout(tmp_path: Path) -> None:
    expected = _crc_tree(tmp_path)
    records, report, names = scan_tree(tmp_path)
    assert names == GRADE_NAMES
    got = {Path(r.path).name: (r.label, r.magnification) for r in records}
    want = {
        name: (grade_from_folder(folder), mag)
        for name, (folder, mag) in expected.items()
        if grade_from_folder(folder) is not None
    }
    assert got == want
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert [r.path for r in records] == sorted(r.path for r in records)
    assert report.counts == {"unknown class folder": 1, "class not requested": 2, "empty file": 1}
    assert report.examples["unknown class folder"] == ["Unsorted (2 images)"]
    assert report.total == 4


def test_scan_tree_extra_classes_when_asked(tmp_path: Path) -> None:
    _crc_tree(tmp_path)
    records, report, names = scan_tree(tmp_path, GRADE_NAMES + EXTRA_CLASS_NAMES)
    assert names == ("Grade I", "Grade II", "Grade III", "Normal", "Mixed")
    by_name = {Path(r.path).name: r.label for r in records}
    assert by_name["p07_i.jpg"] == 3 and by_name["p08_j.jpg"] == 4
    assert "class not requested" not in report.counts
    records, _, names = scan_tree(tmp_path, GRADE_NAMES + ("Mixed",))
    assert names[-1] == "Mixed"
    assert {Path(r.path).name: r.label for r in records}["p08_j.jpg"] == 3
    assert "p07_i.jpg" not in {Path(r.path).name for r in records}


def test_scan_tree_patient_regex(tmp_path: Path) -> None:
    _crc_tree(tmp_path)
    records, _, _ = scan_tree(tmp_path, patient_regex=r"(p\d+)_")
    assert {Path(r.path).name: r.patient for r in records}["p01_b.JPG"] == "p01"
    assert {r.patient for r in records} == {"p01", "p02", "p03", "p04", "p05", "p06"}
    records, _, _ = scan_tree(tmp_path)
    assert {r.patient for r in records} == {""}


def test_scan_tree_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_tree(tmp_path / "nowhere")


# --- decoding ---------------------------------------------------------------------


def _jpeg_bytes() -> bytes:
    """A JPEG large enough that cutting it in half keeps the header intact."""
    buffer = io.BytesIO()
    Image.fromarray(np.tile(_tile(0, 64), (3, 3, 1))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, payload, reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"this is a text file, not a JPEG\n", "unreadable"),
        ("cut.jpg", None, "truncated"),
        ("header_only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated"),
    ],
)
def test_load_rgb_unusable_files(tmp_path: Path, name: str, payload: bytes | None, reason: str) -> None:
    data = _jpeg_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2] if payload is None else payload)
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    assert type(info.value) is BadImage and info.value.reason == reason
    assert str(path) in str(info.value)


def test_load_rgb_missing_and_small(tmp_path: Path) -> None:
    with pytest.raises(BadImage) as info:
        load_rgb(tmp_path / "absent.png")
    assert info.value.reason == "missing file"
    copy = pickle.loads(pickle.dumps(info.value))  # as raised from a loader worker
    assert (copy.reason, copy.path) == ("missing file", str(tmp_path / "absent.png"))
    path = _save(tmp_path / "small.png")  # 24 x 24
    assert load_rgb(path, min_size=24).shape == (24, 24, 3)
    with pytest.raises(BadImage) as info:
        load_rgb(path, min_size=25)
    assert info.value.reason == "too small"
    with pytest.raises(BadImage):
        probe(path, min_size=25)
    assert probe(path) == (24, 24)


def test_load_rgb_float_mode_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    assert info.value.reason == "unsupported mode"


def _convertible(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray | None]]:
    """Files in non-RGB modes with the RGB they must decode to (None: not exact)."""
    rgb = _tile(3, 16)
    out: dict[str, tuple[Path, np.ndarray | None]] = {}
    # Not multiples of 257, so that wrapping to 8 bits could not pass for scaling.
    ramp16 = np.random.default_rng(0).integers(0, 65536, (16, 16)).astype(np.uint16)
    ramp16[0, :2] = (0, 65535)
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    want16 = np.round(ramp16 / 257.0).astype(np.uint8)
    out["deep.png"] = (tmp_path / "deep.png", np.repeat(want16[:, :, None], 3, axis=2))
    rgba = np.dstack([rgb, np.tile(np.array([0, 255], np.uint8), (16, 8))])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    want = rgb.copy()
    want[:, 0::2] = 255  # transparent columns become white background
    out["alpha.png"] = (tmp_path / "alpha.png", want)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    out["cmyk.jpg"] = (tmp_path / "cmyk.jpg", None)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "palette.png")
    out["palette.png"] = (tmp_path / "palette.png", np.asarray(palette.convert("RGB")))
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "gray.PNG")
    out["gray.PNG"] = (tmp_path / "gray.PNG", np.repeat(np.asarray(gray)[:, :, None], 3, axis=2))
    Image.fromarray(rgb).convert("1").save(tmp_path / "bits.bmp")
    out["bits.bmp"] = (tmp_path / "bits.bmp", None)
    la = Image.fromarray(np.dstack([np.asarray(gray), np.zeros((16, 16), np.uint8)]), "LA")
    la.save(tmp_path / "gray_alpha.png")
    out["gray_alpha.png"] = (tmp_path / "gray_alpha.png", np.full((16, 16, 3), 255, np.uint8))
    return out


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    files = _convertible(tmp_path)
    assert load_rgb(files["deep.png"][0])[0, 1, 0] == 255
    for name, (path, want) in files.items():
        arr = load_rgb(path)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, name
        assert arr.flags["C_CONTIGUOUS"], name
        if want is not None:
            np.testing.assert_array_equal(arr, want, err_msg=name)
    cmyk = load_rgb(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(cmyk - _tile(3, 16).astype(int)).mean() < 20  # lossy, but the same picture
    assert set(np.unique(load_rgb(tmp_path / "bits.bmp"))) <= {0, 255}


@pytest.mark.skipif(not HE_SAMPLE.is_file(), reason="shared H&E sample not present")
def test_load_rgb_real_he_image() -> None:
    arr = load_rgb(HE_SAMPLE, min_size=512)
    assert arr.shape == (2967, 2220, 3) and arr.dtype == np.uint8
    assert arr.mean() > 100  # mostly bright background with stained tissue


def test_load_records_counts_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "CRC_Grade__1__Well_Diff" / "10x"
    _save(folder / "good.jpg")
    _convertible(folder)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("plain text")
    data = _jpeg_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # header intact
    (folder / "stub.jpg").write_bytes(data[:40])  # header cut
    records, report, _ = load_records(tmp_path)
    names = {Path(r.path).name for r in records}
    assert "zero.jpg" not in names and "text.jpg" not in names
    assert {"good.jpg", "deep.png", "alpha.png", "cmyk.jpg", "cut.jpg"} <= names
    assert report.counts == {"empty file": 1, "unreadable": 1, "truncated": 1}
    assert report.examples["truncated"] == [str(folder / "stub.jpg")]
    with pytest.raises(BadImage, match="truncated"):  # found only when decoded
        load_rgb(folder / "cut.jpg")


# --- skip report ------------------------------------------------------------------


def test_skip_report_counts_and_merges(tmp_path: Path) -> None:
    first, second = SkipReport(max_examples=2), SkipReport(max_examples=2)
    for i in range(3):
        first.add(f"/a/{i}.jpg", "empty file")
    second.add("/b/x.jpg", "unreadable")
    second.add("/b/y.jpg", "empty file")
    assert first.merge(second) is first
    assert first.total == 5 and first.counts == {"empty file": 4, "unreadable": 1}
    assert first.examples["empty file"] == ["/a/0.jpg", "/a/1.jpg"]
    data = json.loads(json.dumps(first.to_dict()))
    assert data["total"] == 5 and data["reasons"]["unreadable"]["examples"] == ["/b/x.jpg"]
    lines = first.summary_lines()
    assert lines[0] == "skipped: 5" and any("unreadable: 1" in line for line in lines)
    first.write_json(tmp_path / "data_report.json")
    assert json.loads((tmp_path / "data_report.json").read_text()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_report.json"]  # no temporary left
    assert SkipReport().summary_lines() == ["skipped: nothing"]


def _strings(obj: object) -> list[str]:
    """Every string of a JSON-like object, keys included."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def test_skip_report_counts_only_has_no_paths(tmp_path: Path) -> None:
    # Prepare: a tree with every kind of skip, a manifest with bad rows, and a reason that names a file
    _crc_tree(tmp_path / "tree")
    (tmp_path / "tree" / "CRC_Grade__1__Well_Diff" / "10x" / "text.jpg").write_text("plain text")
    _, report, _ = load_records(tmp_path / "tree")
    _, from_csv, _ = read_manifest(_manifest(tmp_path, MANIFEST))
    report.merge(from_csv)
    report.add(tmp_path / "x.jpg", f"cannot open {tmp_path / 'P0042_slide.jpg'}")
    report.add(tmp_path / "y.jpg", "no tissue in P0042_slide.tif")

    # Execute
    shared = report.counts_only()

    # Assert: counts and reasons kept, no path or file name anywhere
    assert json.loads(json.dumps(shared)) == shared
    assert shared["total"] == report.total == sum(shared["reasons"].values())
    assert shared["reasons"]["unreadable"] == 1 and shared["reasons"]["missing file"] == 1
    assert shared["reasons"]["empty file"] == report.counts["empty file"]
    strings = _strings(shared)
    assert strings and not [s for s in strings if "/" in s or "\\" in s]
    assert not [s for s in strings if re.search(r"\.(jpe?g|png|tiff?|bmp|csv)\b", s, re.IGNORECASE)]
    assert not [s for s in strings if "P0042" in s or "manifest" in s or "Unsorted" in s]
    assert report.to_dict()["reasons"]["unreadable"]["examples"]  # the local report keeps them


# --- manifests --------------------------------------------------------------------


def _manifest(tmp_path: Path, text: str) -> Path:
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg"):
        _save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "zero.jpg").write_bytes(b"")
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


MANIFEST = """Path,Label,magnification,patient,hospital,split
imgs/a.jpg,0,40X,P1,Site A,train
imgs/b.jpg,Grade II,10,P2,Site B,Validation
imgs/missing.jpg,1,,P3,Site A,test
imgs/c.png,CRC_Grade__3__Poorly_Diff,,P4,Site B,test
imgs/d.jpg,grade 7,,P5,Site A,train
imgs/e.jpg,Normal_Colon,,P6,Site A,train
imgs/zero.jpg,2,,P7,Site A,train
imgs/a.jpg,0,,P1,Site A,train
"""


def test_read_manifest(tmp_path: Path) -> None:
    path = _manifest(tmp_path, MANIFEST)
    records, report, names = read_manifest(path)
    assert names == GRADE_NAMES
    got = [(Path(r.path).name, r.label, r.magnification, r.patient, r.hospital, r.split) for r in records]
    assert got == [
        ("a.jpg", 0, "40x", "P1", "Site A", "train"),
        ("b.jpg", 1, "10x", "P2", "Site B", "val"),
        ("c.png", 2, UNKNOWN, "P4", "Site B", "test"),
    ]
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert report.counts == {
        "missing file": 1,
        "bad label": 1,
        "class not requested": 1,
        "empty file": 1,
        "duplicate path": 1,
    }
    assert report.examples["missing file"] == ["manifest.csv:4: imgs/missing.jpg"]
    assert report.examples["bad label"] == ["manifest.csv:6: imgs/d.jpg"]
    records, _, names = read_manifest(path, GRADE_NAMES + ("Normal",))
    assert names[-1] == "Normal" and records[-1].label == 3


def test_read_manifest_magnification_from_path(tmp_path: Path) -> None:
    _save(tmp_path / "x" / "20X" / "a.jpg")
    path = tmp_path / "m.csv"
    path.write_text(f"path,label\nx/20X/a.jpg,1\n{tmp_path / 'x' / '20X' / 'a.jpg'},1\n")
    records, report, _ = read_manifest(path)
    assert [r.magnification for r in records] == ["20x"] and report.counts == {"duplicate path": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,grade\nimgs/a.jpg,0\n", "required column 'label'"),
        ("file,label\nimgs/a.jpg,0\n", "required column 'path'"),
        ("", "is empty"),
        ("path,label\n", "has no rows"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_read_manifest_refuses_a_column_named_twice(tmp_path: Path) -> None:
    # Prepare: csv.DictReader would keep the last 'path' silently
    path = _manifest(tmp_path, "path,label,Path\nimgs/a.jpg,0,imgs/b.jpg\n")

    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"manifest .*manifest\.csv names the column 'path' twice "
        r"\(as 'path' and 'Path', line 1\)",
    ):
        read_manifest(path)


def test_read_manifest_field_over_the_csv_limit(tmp_path: Path) -> None:
    # Prepare: a 200 KiB field on line 3, past the csv module's 128 KiB limit
    path = _manifest(tmp_path, "path,label\nimgs/a.jpg,0\n" + "x" * 200 * 1024 + ",1\n")

    # Execute / Assert: one line naming the file and the line, not a csv traceback
    with pytest.raises(ValueError) as info:
        read_manifest(path)
    assert str(path) in str(info.value) and "(line 3)" in str(info.value)
    assert "longer than" in str(info.value) and "\n" not in str(info.value)


def test_read_manifest_not_utf8_names_the_line(tmp_path: Path) -> None:
    # Prepare: a manifest saved as Latin-1 with an é on line 3
    path = _manifest(tmp_path, "")
    path.write_bytes("path,label\nimgs/a.jpg,0\nimgs/caf\u00e9.jpg,1\n".encode("latin-1"))

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"manifest {re.escape(str(path))} is not UTF-8 \(line 3\): "):
        read_manifest(path)


def test_read_manifest_nul_byte_names_the_line(tmp_path: Path) -> None:
    # Prepare: a NUL on line 3 (the csv module of Python 3.11+ lets it through to the path)
    path = _manifest(tmp_path, "path,label\nimgs/a.jpg,0\nimgs/b\0.jpg,1\n")

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"manifest {re.escape(str(path))} holds a NUL byte \(line 3\)"):
        read_manifest(path)


def test_read_manifest_with_byte_order_mark(tmp_path: Path) -> None:
    # Prepare: UTF-8 with a byte-order mark (as Excel saves it) and a non-ASCII path
    _save(tmp_path / "imgs" / "caf\u00e9.jpg")
    path = _manifest(tmp_path, "")
    path.write_bytes(b"\xef\xbb\xbf" + "Path,Label\nimgs/caf\u00e9.jpg,1\nimgs/a.jpg,0\n".encode("utf-8"))

    # Execute
    records, report, _ = read_manifest(path)

    # Assert: the first column is 'path', not '\ufeffpath'
    assert [(Path(r.path).name, r.label) for r in records] == [("a.jpg", 0), ("caf\u00e9.jpg", 1)]
    assert report.total == 0


def test_load_records_dispatch(tmp_path: Path) -> None:
    path = _manifest(tmp_path, MANIFEST)
    from_csv, _, _ = load_records(path)
    from_dir, _, _ = load_records(tmp_path)  # holds manifest.csv
    assert from_csv == from_dir and len(from_csv) == 3
    tree = tmp_path / "tree"
    _crc_tree(tree)
    scanned, _, _ = load_records(tree, patient_regex=r"p\d+")
    assert len(scanned) == 8 and all(r.patient.startswith("p") for r in scanned)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty" / "Unknown_Folder" / "a.jpg")
    with pytest.raises(ValueError, match="no usable images under .*unknown class folder"):
        load_records(tmp_path / "empty")
    with pytest.raises(ValueError, match="expected a data folder or a .csv"):
        load_records(tmp_path / "imgs" / "a.jpg")


def test_the_old_module_data_datasets_still_holds_every_name():
    # The names data/datasets.py defined before discovery moved to data/discovery/ and SkipReport to data/report.py
    import data.datasets as old
    import data.discovery as discovery
    import data.report as report

    moved = [
        "ALL_CLASS_NAMES",
        "grade_from_folder",
        "load_records",
        "magnification_from_name",
        "patient_from_name",
        "read_manifest",
        "resolve_classes",
        "scan_tree",
        "verify_records",
    ]
    assert all(getattr(old, name) is getattr(discovery, name) for name in moved)
    assert old.SkipReport is report.SkipReport and old.WITHHELD_REASON is report.WITHHELD_REASON
    assert sorted(old.__all__) == sorted([*moved, "SkipReport", "WITHHELD_REASON"])
