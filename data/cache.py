"""A cache of masked, stain-normalized patch pairs, so epochs never decode a JPEG.

One folder per (hospital, split) holds ``context.npy`` (N,Sc,Sc,3) and
``detail.npy`` (N,Sd,Sd,3) uint8 arrays, read back as memory maps, plus
``patches.json`` (per patch: image, label, magnification, patient) and a
``DONE`` marker written last. The folder name is a hash of everything that
shapes its content, so a change of setting never reuses a stale cache, and a
half-written folder (no marker) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from data.datasets import SkipReport
from data.files import exclusive
from data.images import BadImage, load_rgb
from data.patches import NoTissue, PatchSpec, extract_pairs, sample_centres
from data.records import ImageRecord
from data.sites import site_profile
from data.stain import build_normalizer
from data.tissue import tissue_mask

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # 2: Macenko with two search passes and the OD table; 3: ties in that search; 4: centres by name


def default_cache_root() -> Path:
    """``$FEDSIM_CACHE`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE") or Path.home() / ".cache" / "fedsim")


@dataclass(frozen=True)
class CacheSpec:
    """Everything that shapes a cached split besides its images."""

    patch: PatchSpec
    patches_per_image: int
    stain: str = "macenko"
    stain_reference: str = ""
    seed: int = 0
    site_shift: float = 0.0
    """Strength of the simulated lab differences applied per hospital (data.sites); 0 = none."""

    def digest(self, records: Sequence[ImageRecord]) -> str:
        """Hash of this spec, the stain reference file and the images (every record field, size, mtime).

        The hospital shapes the pixels (site profiles) and the patient and
        magnification are stored beside them for evaluation, so all count.
        """
        h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(self), _stamp(self.stain_reference)],
                                      sort_keys=True).encode())
        for rec in records:
            h.update(json.dumps([*astuple(rec), _stamp(rec.path)]).encode() + b"\n")
        return h.hexdigest()[:16]


def _stamp(path: str) -> list[int] | None:
    """Size and modification time of a file (so an edited file gives a new cache key); None if absent."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and [st.st_size, st.st_mtime_ns]


def split_specs(patch: PatchSpec, train_patches: int, eval_patches: int, stain: str = "macenko",
                stain_reference: str = "", seed: int = 0, site_shift: float = 0.0) -> dict[str, CacheSpec]:
    """The spec of each split: ``train_patches`` pairs per training image, ``eval_patches`` per val/test image."""
    return {split: CacheSpec(patch, train_patches if split == "train" else eval_patches, stain, stain_reference,
                             seed, site_shift) for split in ("train", "val", "test")}


def split_folder(records: Sequence[ImageRecord], spec: CacheSpec, root: Path, name: str = "") -> Path:
    """Where the cache of these records under this spec lives (built or not)."""
    return Path(root) / f"{name or 'split'}-{spec.digest(records)}"


def build_split(records: Sequence[ImageRecord], spec: CacheSpec, root: Path, report: SkipReport,
                name: str = "", progress: bool = True) -> Path:
    """Cache one hospital's split (reusing a complete cache) and return its folder."""
    folder = split_folder(records, spec, root, name)
    if not (folder / "DONE").exists():
        with exclusive(folder):  # ranks or runs sharing the cache: one builds, the others wait
            if not (folder / "DONE").exists():  # unless it was built while this one waited
                _build(records, spec, folder, name, progress)
    _merge_saved_report(folder, report)
    return folder


def _build(records: Sequence[ImageRecord], spec: CacheSpec, folder: Path, name: str, progress: bool) -> None:
    """Write the split beside ``folder`` and move it in whole, so only complete caches carry DONE."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = SkipReport()
    _write_arrays(records, spec, tmp, local, name, progress)
    (tmp / "skipped.json").write_text(json.dumps(local.to_dict()))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def build_hospital(records: Sequence[ImageRecord], hospital: str, specs: dict[str, CacheSpec], root: Path,
                   report: SkipReport, progress: bool = True) -> dict[str, Path]:
    """Cache every split of one hospital; a split without images is left out (logged).

    Raises:
        ValueError: if the hospital has no training images, or none that gives a patch pair.
    """
    folders = {}
    for split, spec in specs.items():
        chosen = [r for r in records if r.hospital == hospital and r.split == split]
        if not chosen:
            if split == "train":
                raise ValueError(f"hospital {hospital} has no training images; use fewer hospitals or more data")
            log.warning("hospital %s has no %s images: its %s figures will be empty", hospital, split, split)
            continue
        local = SkipReport()
        folders[split] = build_split(chosen, spec, root, local, name=f"{hospital}-{split}", progress=progress)
        report.merge(local)
        if split == "train" and not _patch_count(folders[split]):
            reasons = "; ".join(f"{r}: {n}" for r, n in sorted(local.counts.items())) or "no tissue found"
            raise ValueError(f"hospital {hospital}: none of its {len(chosen)} training images gave a patch pair "
                             f"({reasons})")
    return folders


def _patch_count(folder: Path) -> int:
    return int(json.loads((folder / "patches.json").read_text())["count"])


def _write_arrays(records: Sequence[ImageRecord], spec: CacheSpec, folder: Path, report: SkipReport,
                  name: str, progress: bool) -> None:
    p, k = spec.patch, spec.patches_per_image
    capacity = max(1, len(records) * k)
    contexts = np.lib.format.open_memmap(folder / "context.npy", "w+", np.uint8, (capacity, p.context_size, p.context_size, 3))
    details = np.lib.format.open_memmap(folder / "detail.npy", "w+", np.uint8, (capacity, p.detail_size, p.detail_size, 3))
    normalizer = fitted_normalizer(spec.stain, spec.stain_reference)
    meta, count = [], 0
    for index, rec in enumerate(tqdm(records, desc=f"caching {name}", disable=None if progress else True, leave=False)):
        pairs = _image_pairs(rec, spec, normalizer, report)
        if pairs is None:
            continue
        n = len(pairs[0])
        contexts[count : count + n], details[count : count + n] = pairs
        meta.extend([{"image": index, "path": rec.path, "label": rec.label, "magnification": rec.magnification,
                      "patient": rec.patient, "hospital": rec.hospital}] * n)
        count += n
    contexts.flush(), details.flush()
    degenerate = int(getattr(normalizer, "num_degenerate", 0))
    (folder / "patches.json").write_text(json.dumps({"count": count, "stain_degenerate": degenerate, "patches": meta}))


def fitted_normalizer(stain: str, reference: str = ""):
    """The stain normalizer named ``stain`` (None for "none"), fitted to the image file ``reference`` if given."""
    normalizer = build_normalizer(stain)
    if normalizer is not None and reference:
        normalizer.fit(load_rgb(reference))
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
        report.add(rec.path, str(err))
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


class CachedPairs(torch.utils.data.Dataset):
    """Patch pairs of cached splits, as uint8 CHW tensors read from memory maps.

    ``__getitems__`` serves a whole batch with one fancy-index per array, so a
    DataLoader with ``batch_size`` set pays no per-sample Python overhead. The
    memory maps are opened lazily in each process: a DataLoader worker receives
    the folder names, not a copy of the arrays.
    """

    def __init__(self, folders: Sequence[Path]):
        self.folders = [Path(f) for f in folders]
        self.meta: list[dict] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []
        for part, folder in enumerate(self.folders):
            info = json.loads((folder / "patches.json").read_text())
            self.offsets.append(len(self.meta))
            self.counts.append(info["count"])
            self.meta.extend({**m, "image": f"{folder.name}:{m['image']}", "part": part} for m in info["patches"])
        self.labels = torch.tensor([m["label"] for m in self.meta], dtype=torch.long)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopened in the receiving process
        return state

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(context, detail) memory maps of every part, opened on first use."""
        if self._arrays is None:
            self._arrays = [(np.load(f / "context.npy", mmap_mode="r")[:n], np.load(f / "detail.npy", mmap_mode="r")[:n])
                            for f, n in zip(self.folders, self.counts)]
        return self._arrays

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]):
        """A batch: (context uint8 (B,3,Hc,Wc), detail uint8 (B,3,Hd,Wd), labels, indices)."""
        idx = np.asarray(indices, dtype=np.int64)
        ctx, det = self._gather(idx)
        # NHWC memory viewed as NCHW: a free channels-last view, no copy.
        return (torch.from_numpy(ctx).permute(0, 3, 1, 2), torch.from_numpy(det).permute(0, 3, 1, 2),
                self.labels[idx], torch.from_numpy(idx))

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.arrays()
        parts = np.searchsorted(np.asarray(self.offsets), idx, side="right") - 1
        first_c, first_d = arrays[0]
        out_c = np.empty((len(idx), *first_c.shape[1:]), np.uint8)
        out_d = np.empty((len(idx), *first_d.shape[1:]), np.uint8)
        for part in np.unique(parts):
            rows = np.flatnonzero(parts == part)
            local = idx[rows] - self.offsets[part]
            order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
            ctx, det = arrays[part]
            out_c[rows[order]], out_d[rows[order]] = ctx[local[order]], det[local[order]]
        return out_c, out_d


def collate_batch(batch):
    """Identity collate: ``__getitems__`` already returns a batch."""
    return batch
