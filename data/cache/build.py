"""Building cache entries: every image decoded, masked, stain-normalized and cut into patch pairs once.

An entry is written in a temporary folder beside its own and renamed into
place whole, with ``DONE`` (its digests, :mod:`data.cache.integrity`) last, so
a folder without the marker is a build that never ended. A complete entry is
reused; a corrupt one is named in a warning and rebuilt under the same lock as
a first build (ranks or runs sharing the cache: one builds, the others wait).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.cache.integrity import DIGEST_BLOCK, CorruptCache, digest_file, entry_fault, remember_sound
from data.cache.npy import ArrayWriter
from data.cache.spec import ARRAY_FILES, CACHE_VERSION, JSON_FILES, CacheSpec, split_folder
from data.errors import DataError
from data.files import WriteError, atomic_writer, ensure_free_space, exclusive, storage_error, write_json
from data.images import BadImage, load_rgb
from data.patches import NoTissue, extract_pairs, sample_centres
from data.records import ImageRecord
from data.report import SkipReport
from data.sites import site_profile
from data.stain import build_normalizer
from data.tissue import tissue_mask

log = logging.getLogger(__name__)
_JSON_BYTES_PER_PATCH = 1024  # patches.json, generously (paths are its longest field)


def build_split(
    records: Sequence[ImageRecord],
    spec: CacheSpec,
    root: Path,
    report: SkipReport,
    name: str = "",
    progress: bool = True,
) -> Path:
    """Cache one hospital's split (reusing a complete, sound entry) and return its folder.

    An entry whose files no longer match the digests of its ``DONE`` manifest
    (changed, truncated, missing) is named in a warning and rebuilt, under the
    same lock as a first build.

    Raises:
        WriteError: the cache's disk is full or not writable; nothing of the entry is left behind.
        CorruptCache: the entry is corrupt and cannot be rebuilt (e.g. a read-only cache).
    """
    folder = split_folder(records, spec, root, name)
    fault = entry_fault(folder)
    if fault is not None:
        try:
            with exclusive(folder):  # ranks or runs sharing the cache: one builds, the others wait
                fault = entry_fault(folder)  # again: another process may have built or rebuilt it meanwhile
                if fault is not None:
                    if fault:
                        log.warning("cache entry %s is corrupt (%s): rebuilding", folder, fault)
                    _build(records, spec, folder, name, progress)
        except OSError as err:
            err = storage_error(err, folder)
            if fault:
                raise CorruptCache(folder, fault, f" and cannot be rebuilt: {err}") from None
            raise err from None
    _merge_saved_report(folder, report)
    return folder


def _build(records: Sequence[ImageRecord], spec: CacheSpec, folder: Path, name: str, progress: bool) -> None:
    """Write the split beside ``folder`` and move it in whole, so only complete entries carry DONE.

    Free space for the largest possible entry is checked first; on any failure
    (a full disk midway, an interruption) the temporary folder is removed.

    Raises:
        WriteError: ``no space left on device while writing FOLDER: N MiB needed`` and the like.
    """
    p = spec.patch
    capacity = max(1, len(records) * spec.patches_per_image)
    row_bytes = 3 * (p.context_size**2 + p.detail_size**2)
    needed = capacity * (row_bytes + _JSON_BYTES_PER_PATCH) + 2**20  # the arrays at most, and the JSON files
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        ensure_free_space(folder.parent, needed, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = SkipReport()
        files = _write_arrays(records, spec, tmp, local, name, progress)
        write_json(tmp / "skipped.json", local.to_dict(), indent=None)
        for small in JSON_FILES:
            files[small] = digest_file(tmp / small)
        count = int(files[ARRAY_FILES[0]]["shape"][0])
        write_json(
            tmp / "DONE",
            {"version": CACHE_VERSION, "digest": "crc32", "block": DIGEST_BLOCK, "count": count, "files": files},
            indent=None,
        )
        shutil.rmtree(folder, ignore_errors=True)  # a corrupt entry, or a build that never ended
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        clean = storage_error(OSError(err.errno, err.strerror), folder, needed)  # name the entry, not a temporary file
        if isinstance(clean, WriteError):
            raise clean from None
        raise
    except BaseException:  # KeyboardInterrupt included
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remember_sound(folder)  # its digests were taken while writing: no need to read it back


def build_hospital(
    records: Sequence[ImageRecord],
    hospital: str,
    specs: dict[str, CacheSpec],
    root: Path,
    report: SkipReport,
    progress: bool = True,
) -> dict[str, Path]:
    """Cache every split of one hospital; a split without images is left out (logged).

    Raises:
        DataError: if the hospital has no training images, or none that gives a patch pair.
    """
    folders = {}
    for split, spec in specs.items():
        chosen = [r for r in records if r.hospital == hospital and r.split == split]
        if not chosen:
            if split == "train":
                raise DataError(f"hospital {hospital} has no training images; use fewer hospitals or more data")
            log.warning("hospital %s has no %s images: its %s figures will be empty", hospital, split, split)
            continue
        local = SkipReport()
        folders[split] = build_split(chosen, spec, root, local, name=f"{hospital}-{split}", progress=progress)
        report.merge(local)
        if split == "train" and not _patch_count(folders[split]):
            reasons = "; ".join(f"{r}: {n}" for r, n in sorted(local.counts.items())) or "no tissue found"
            raise DataError(
                f"hospital {hospital}: none of its {len(chosen)} training images gave a patch pair ({reasons})"
            )
    return folders


def _patch_count(folder: Path) -> int:
    return int(json.loads((folder / "patches.json").read_text())["count"])


def _write_arrays(
    records: Sequence[ImageRecord], spec: CacheSpec, folder: Path, report: SkipReport, name: str, progress: bool
) -> dict[str, dict]:
    """Stream every image's pairs into ``context.npy`` / ``detail.npy`` and write ``patches.json``.

    Ordinary writes, not a memory map, so a full disk is an error and not a
    SIGBUS. Returns the manifest entries (size, digests) of the two arrays.
    """
    p, k = spec.patch, spec.patches_per_image
    capacity = max(1, len(records) * k)
    normalizer = fitted_normalizer(spec.stain, spec.stain_reference)
    meta = []
    with atomic_writer(folder / ARRAY_FILES[0]) as context_file, atomic_writer(folder / ARRAY_FILES[1]) as detail_file:
        outputs = (
            ArrayWriter(context_file, (p.context_size, p.context_size, 3), capacity),
            ArrayWriter(detail_file, (p.detail_size, p.detail_size, 3), capacity),
        )
        for index, rec in enumerate(
            tqdm(records, desc=f"caching {name}", disable=None if progress else True, leave=False)
        ):
            pairs = _image_pairs(rec, spec, normalizer, report)
            if pairs is None:
                continue
            for output, array in zip(outputs, pairs):
                output.append(array)
            meta.extend(
                [
                    {
                        "image": index,
                        "path": rec.path,
                        "label": rec.label,
                        "magnification": rec.magnification,
                        "patient": rec.patient,
                        "hospital": rec.hospital,
                    }
                ]
                * len(pairs[0])
            )
        files = {file: output.finish() for file, output in zip(ARRAY_FILES, outputs)}
    degenerate = int(getattr(normalizer, "num_degenerate", 0))
    write_json(
        folder / "patches.json", {"count": len(meta), "stain_degenerate": degenerate, "patches": meta}, indent=None
    )
    return files


def fitted_normalizer(stain: str, reference: str = ""):
    """The stain normalizer named ``stain`` (None for "none"), fitted to the image file ``reference`` if given.

    Raises:
        DataError: ``reference`` cannot be decoded, or the normalizer is undefined on it (too little tissue).
    """
    normalizer = build_normalizer(stain)
    if normalizer is not None and reference:
        try:
            image = load_rgb(reference)
        except BadImage as err:
            raise DataError(f"data.stain_reference = {reference!r} is not a usable image: {err}") from None
        normalizer.fit(image)
    return normalizer


def _image_pairs(rec: ImageRecord, spec: CacheSpec, normalizer, report: SkipReport):
    """Decode, mask, normalize and cut one image; None (and a counted skip) if unusable."""
    try:
        rgb = load_rgb(rec.path)
    except BadImage as err:
        report.add(rec.path, err.reason)
        return None
    if spec.site_shift > 0:  # the hospital's lab, before anything a pipeline would do to its images
        rgb = site_profile(spec.seed, rec.hospital, spec.site_shift).apply(rgb)
    mask = tissue_mask(rgb)
    if normalizer is not None:
        batch = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        rgb = normalizer.normalize(batch)[0].permute(1, 2, 0).contiguous().numpy()
    rng = np.random.default_rng([spec.seed, zlib.crc32(rec.identity.encode())])  # not the path: the data may move
    try:
        centres = sample_centres(rgb, spec.patches_per_image, spec.patch, rng, mask=mask)
    except NoTissue as err:
        report.add(rec.path, str(err))  # a fixed reason, no path: counts of it leave the hospital
        return None
    return extract_pairs(rgb, centres, spec.patch)


def _merge_saved_report(folder: Path, report: SkipReport) -> None:
    saved = folder / "skipped.json"
    if saved.exists():
        saved_report = SkipReport()
        for reason, entry in json.loads(saved.read_text())["reasons"].items():
            saved_report.counts[reason] = entry["count"]
            saved_report.examples[reason] = entry["examples"]
        report.merge(saved_report)
