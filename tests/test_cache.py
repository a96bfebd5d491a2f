"""The patch cache and the synthetic dataset: hospitals that yield nothing, and several processes filling
one cache at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.cache import CachedPairs, CacheSpec, build_hospital, build_split, split_specs
from data.discovery import load_records
from data.patches import PatchSpec
from data.records import ImageRecord
from data.report import SkipReport
from data.synthetic import SyntheticSpec, generate

WRITERS = 3
SPEC = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=2, image_size=128)
PATCHES = CacheSpec(PatchSpec(64, 48, 96, 0.05), 2, "macenko", "", 0, 0.0)


def _generate(root: str, start, results) -> None:
    start.wait()
    try:
        results.put(str(generate(root, SPEC, progress=False)))
    except BaseException as err:
        results.put(f"{type(err).__name__}: {err}")


def _cache(data: str, root: str, start, results) -> None:
    records, _, _ = load_records(Path(data))
    start.wait()
    try:
        results.put(str(build_split(records, PATCHES, Path(root), SkipReport(), name="h", progress=False)))
    except BaseException as err:
        results.put(f"{type(err).__name__}: {err}")


def _race(target, *args) -> list[str]:
    """Start WRITERS processes on ``target`` at the same moment; what each returned or raised."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, results)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def test_concurrent_generation_of_one_dataset(tmp_path):
    root = tmp_path / "synthetic"
    outcomes = _race(_generate, str(root))
    assert outcomes == [str(root / "manifest.csv")] * WRITERS
    alone = generate(tmp_path / "alone", SPEC, progress=False).parent
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == sorted(
        p.relative_to(alone).as_posix() for p in alone.rglob("*.jpg")
    )
    assert not [p.name for p in root.rglob(".*tmp*")]


def test_concurrent_caching_of_one_split(tmp_path):
    data = generate(tmp_path / "data", SPEC, progress=False).parent
    outcomes = _race(_cache, str(data), str(tmp_path / "cache"))
    assert len(set(outcomes)) == 1 and Path(outcomes[0]).is_dir(), outcomes
    records, _, _ = load_records(data)
    alone = build_split(records, PATCHES, tmp_path / "alone", SkipReport(), name="h", progress=False)
    ((shared_context, shared_detail),) = CachedPairs([Path(outcomes[0])]).arrays()
    ((context, detail),) = CachedPairs([alone]).arrays()
    assert np.array_equal(shared_context, context) and np.array_equal(shared_detail, detail)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [Path(outcomes[0]).name]


def test_exclusive_runs_unlocked_where_the_file_system_has_no_locks(tmp_path, monkeypatch, caplog):
    import errno

    import data.files as files

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", refuse)
    monkeypatch.setattr(files, "_WARNED", False)
    ran = []
    with caplog.at_level("WARNING", logger="data.files"):
        with files.exclusive(tmp_path / "entry"):
            ran.append(True)
        with files.exclusive(tmp_path / "entry"):
            ran.append(True)
    assert ran == [True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "cannot lock files here (No locks available); concurrent writers to one cache may collide"
    ]


def test_hospital_whose_training_images_give_no_patch_is_one_clear_error(tmp_path):
    Image.fromarray(np.full((300, 300, 3), 245, np.uint8)).save(tmp_path / "glass.png")
    records = [ImageRecord(str(tmp_path / "glass.png"), 0, "10x", "P1", "H1", "train")]
    with pytest.raises(ValueError, match=r"hospital H1: none of its 1 training images gave a patch pair \(.*1"):
        build_hospital(
            records, "H1", split_specs(PatchSpec(), 2, 2, "none"), tmp_path / "cache", SkipReport(), progress=False
        )


def test_cache_key_follows_every_record_field_and_the_reference_file(tmp_path):
    import dataclasses
    import os

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    record = ImageRecord(str(image), 0, "10x", "P1", "H1", "test")
    key = PATCHES.digest([record])
    for change in ({"label": 1}, {"magnification": "40x"}, {"patient": "P2"}, {"hospital": "H2"}):
        assert PATCHES.digest([dataclasses.replace(record, **change)]) != key, change
    # a stain reference image edited in place gives another key
    reference = tmp_path / "ref.png"
    reference.write_bytes(b"one")
    fitted = dataclasses.replace(PATCHES, stain_reference=str(reference))
    before = fitted.digest([record])
    reference.write_bytes(b"other")
    os.utime(reference, ns=(1, 1))
    assert fitted.digest([record]) != before
    assert PATCHES.digest([record]) == key


def test_patches_do_not_depend_on_where_the_dataset_lies(tmp_path):
    # The same dataset in two places, read through its manifest and as a bare folder tree: the same patches
    import shutil

    first = generate(tmp_path / "here", SPEC, progress=False).parent
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, moved)
    tree = tmp_path / "tree"
    shutil.copytree(first, tree, ignore=shutil.ignore_patterns("manifest.csv", "spec.json"))
    arrays = []
    for root in (first, moved, tree):
        records, _, _ = load_records(root)
        assert [r.name for r in records] == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
        folder = build_split(records, PATCHES, tmp_path / "cache", SkipReport(), name="h", progress=False)
        arrays.append(CachedPairs([folder]).arrays()[0])
    for context, detail in arrays[1:]:
        assert np.array_equal(context, arrays[0][0]) and np.array_equal(detail, arrays[0][1])


def test_the_cache_package_holds_the_names_of_the_old_module():
    # data/cache.py became the package data/cache/; `from data.cache import ...` names what it named
    import data.cache as cache

    assert sorted(cache.__all__) == sorted(
        [
            "CACHE_VERSION",
            "DIGEST_BLOCK",
            "CacheSpec",
            "CachedPairs",
            "CorruptCache",
            "build_hospital",
            "build_split",
            "collate_batch",
            "default_cache_root",
            "fitted_normalizer",
            "split_folder",
            "split_specs",
        ]
    )
    assert all(hasattr(cache, name) for name in cache.__all__)
