"""The patch cache on a bad disk: entries that changed after they were written, and disks that fill up."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.cache as cache
import data.cache.build as cache_build
import data.cache.integrity as integrity
import data.files as files
from data.cache import CachedPairs, CacheSpec, build_split
from data.discovery import load_records
from data.files import WriteError
from data.patches import PatchSpec
from data.records import ImageRecord
from data.report import SkipReport
from data.synthetic import SyntheticSpec, generate

SPEC = SyntheticSpec(num_hospitals=1, patients_per_grade=1, images_per_patient=1, image_size=128)
PATCHES = CacheSpec(PatchSpec(64, 48, 96, 0.05), 2, "macenko", "", 0, 0.0)
ARRAYS = ("context.npy", "detail.npy")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    """Three synthetic images and one of bare glass (it gives no patch, so the arrays hold fewer rows than reserved)."""
    root = tmp_path_factory.mktemp("data")
    found, _, _ = load_records(generate(root / "synthetic", SPEC, progress=False).parent)
    Image.fromarray(np.full((128, 128, 3), 245, np.uint8)).save(root / "glass.png")
    return [*found, ImageRecord(str(root / "glass.png"), 0, "10x", "P9", found[0].hospital, found[0].split)]


@pytest.fixture
def new_process(monkeypatch):
    """Forget which entries this process has checked, as a fresh run would."""

    def forget():
        monkeypatch.setattr(integrity, "_VERIFIED", {})

    return forget


def _build(records, root: Path) -> Path:
    return build_split(records, PATCHES, root, SkipReport(), name="h", progress=False)


def _temporary_or_done(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if "tmp" in p.name or p.name == "DONE")


def test_entry_is_a_plain_npy_of_the_pairs_and_the_same_at_every_build(records, tmp_path):
    # Prepare: the pairs of every image, cut as the cache cuts them
    normalizer = cache.fitted_normalizer(PATCHES.stain, PATCHES.stain_reference)
    pairs = [
        p for p in (cache_build._image_pairs(r, PATCHES, normalizer, SkipReport()) for r in records) if p is not None
    ]
    expected = [np.concatenate([p[i] for p in pairs]) for i in (0, 1)]
    # Execute
    first, second = _build(records, tmp_path / "one"), _build(records, tmp_path / "two")
    # Assert: memory-mappable .npy files with exactly the rows written, byte for byte what np.save writes
    assert len(pairs) == len(records) - 1
    count = json.loads((first / "patches.json").read_text())["count"]
    assert count == len(expected[0]) < len(records) * PATCHES.patches_per_image
    for name, want in zip(ARRAYS, expected):
        array = np.load(first / name, mmap_mode="r")
        assert array.dtype == np.uint8 and array.shape == want.shape
        assert np.array_equal(array, want)
        saved = io.BytesIO()
        np.save(saved, want)
        assert (first / name).read_bytes() == saved.getvalue() == (second / name).read_bytes()
    ((context, detail),) = CachedPairs([first]).arrays()
    assert np.array_equal(context, expected[0]) and np.array_equal(detail, expected[1])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)


DAMAGES = {
    "flipped context": (lambda f: _flip(f / "context.npy"), r"context\.npy differs from its digest in bytes \d+-\d+"),
    "truncated detail": (lambda f: _truncate(f / "detail.npy"), r"detail\.npy has \d+ bytes, not \d+"),
    "deleted detail": (lambda f: (f / "detail.npy").unlink(), r"detail\.npy is missing"),
    "garbled patches": (lambda f: _flip(f / "patches.json"), r"patches\.json differs from its digest"),
    "unparsable manifest": (lambda f: (f / "DONE").write_text("ok\n"), r"DONE is not a manifest of this cache"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_entry_is_named_and_rebuilt(records, tmp_path, new_process, caplog, damage):
    # Prepare: a built entry, damaged on disk, and a fresh process
    fresh = _build(records, tmp_path / "fresh")
    folder = _build(records, tmp_path / "cache")
    harm, reason = DAMAGES[damage]
    harm(folder)
    new_process()
    # Execute
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        again = _build(records, tmp_path / "cache")
    # Assert: one warning naming the entry and the reason, and the arrays of a fresh build
    assert again == folder
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"cache entry {folder} is corrupt (")
    assert messages[0].endswith("): rebuilding")
    assert re.search(reason, messages[0]), messages[0]
    for name in ARRAYS:
        assert (folder / name).read_bytes() == (fresh / name).read_bytes()
    assert (folder / "patches.json").read_bytes() == (fresh / "patches.json").read_bytes()
    new_process()
    assert integrity.entry_fault(folder) is None
    assert _temporary_or_done(tmp_path / "cache") == [f"{folder.name}/DONE"]


def test_corrupt_entry_that_cannot_be_rebuilt_is_one_line(records, tmp_path, new_process, monkeypatch):
    # Prepare
    folder = _build(records, tmp_path / "cache")
    _flip(folder / "context.npy")
    new_process()
    # Execute / Assert: opened directly, without records to rebuild it from
    with pytest.raises(ValueError, match=r"^cache entry .* is corrupt \(context\.npy differs from its digest") as err:
        CachedPairs([folder])
    assert isinstance(err.value, cache.CorruptCache) and err.value.folder == folder and "\n" not in str(err.value)

    # Execute / Assert: through build_split on a read-only cache
    class ReadOnly:
        def __init__(self, target):
            pass

        def __enter__(self):
            raise PermissionError(errno.EROFS, "Read-only file system")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cache_build, "exclusive", ReadOnly)
    with pytest.raises(
        cache.CorruptCache,
        match=r"^cache entry .* is corrupt \(context\.npy differs .*\) and cannot "
        r"be rebuilt: read-only file system while writing ",
    ):
        _build(records, tmp_path / "cache")


def test_entry_is_checked_once_per_process_and_never_in_workers(records, tmp_path, new_process, monkeypatch):
    # Prepare: a built entry, seen by a fresh process
    folder = _build(records, tmp_path / "cache")
    new_process()
    reads = []
    check = integrity._check_contents
    monkeypatch.setattr(integrity, "_check_contents", lambda *a: reads.append(a[0].name) or check(*a))
    # Execute: the run opens it three times (build_split, its split's dataset, a union)
    _build(records, tmp_path / "cache")
    dataset = CachedPairs([folder])
    CachedPairs([folder, folder])
    # Assert: every file read once
    assert sorted(reads) == sorted(["patches.json", "skipped.json", *ARRAYS])
    # Execute / Assert: a DataLoader worker receives the dataset and reads its patches without checking again
    worker_copy = pickle.loads(pickle.dumps(dataset))
    assert len(worker_copy) == len(dataset) and np.array_equal(worker_copy[0][0], dataset[0][0])
    assert len(reads) == 4


def test_full_disk_before_writing_is_one_line_and_leaves_nothing(records, tmp_path, monkeypatch):
    # Prepare: a disk with 1 MiB free
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    # Execute
    with pytest.raises(WriteError) as err:
        _build(records, tmp_path / "cache")
    # Assert
    text, folder = str(err.value), cache.split_folder(records, PATCHES, tmp_path / "cache", "h")
    assert text.startswith(f"no space left on device while writing {folder}: ") and text.endswith(" MiB needed"), text
    assert "\n" not in text
    assert _temporary_or_done(tmp_path / "cache") == []


class _FillingDisk:
    """``open`` for data.files, whose files take ``room`` bytes in all and then fail with ENOSPC."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - a stand-in for open(): its caller closes it
        return self._Limited(handle, self) if "w" in mode else handle

    class _Limited:
        def __init__(self, handle, disk):
            self._handle, self._disk = handle, disk

        def write(self, data):
            size = memoryview(data).nbytes
            if size > self._disk.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._disk.room -= size
            return self._handle.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()
            return False

        def __getattr__(self, name):
            return getattr(self._handle, name)


def test_disk_filling_up_midway_is_one_line_and_leaves_nothing(records, tmp_path, monkeypatch):
    # Prepare: room for the first few patches only
    row = 3 * (64 * 64 + 48 * 48)
    monkeypatch.setattr(files, "open", _FillingDisk(3 * row), raising=False)
    # Execute
    with pytest.raises(WriteError) as err:
        _build(records, tmp_path / "cache")
    # Assert: the entry named (not its temporary folder), the room it needs, and nothing left behind
    text = str(err.value)
    folder = cache.split_folder(records, PATCHES, tmp_path / "cache", "h")
    assert text.startswith(f"no space left on device while writing {folder}: ") and text.endswith(" MiB needed"), text
    assert _temporary_or_done(tmp_path / "cache") == [] and not folder.exists()
    # the disk freed, the next build succeeds
    monkeypatch.undo()
    assert (_build(records, tmp_path / "cache") / "DONE").exists()


def test_interrupted_build_leaves_nothing(records, tmp_path, monkeypatch):
    # Prepare: Ctrl-C on the second image
    calls = []
    pairs = cache_build._image_pairs

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return pairs(*args)

    monkeypatch.setattr(cache_build, "_image_pairs", interrupted)
    # Execute / Assert
    with pytest.raises(KeyboardInterrupt):
        _build(records, tmp_path / "cache")
    assert _temporary_or_done(tmp_path / "cache") == []
    assert not cache.split_folder(records, PATCHES, tmp_path / "cache", "h").exists()


def test_prepare_ends_a_full_disk_in_one_line(records, tmp_path, monkeypatch, capsys):
    from data import prepare

    # Prepare: a manifest of the synthetic images, and a disk whose room is enough for the small files only
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,patient,hospital,split\n"
        + "".join(f"{r.path},{r.label},{r.patient},H1,train\n" for r in records[:-1])
    )
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    # Execute
    code = prepare.main(
        [
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "cache"),
            "--hospitals",
            "1",
            "--context-size",
            "64",
            "--detail-size",
            "48",
            "--context-fov",
            "96",
            "--min-tissue",
            "0.05",
        ]
    )
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("data.prepare: error: no space left on device while writing "), err
    assert err[0].endswith(" MiB needed")
    assert not [p for p in (tmp_path / "cache").rglob("*") if "tmp" in p.name or p.name == "DONE"]
