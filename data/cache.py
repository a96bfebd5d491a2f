"""A cache of masked, stain-normalized patch pairs, so epochs never decode a JPEG.

One folder per (hospital, split) holds ``context.npy`` (N,Sc,Sc,3) and
``detail.npy`` (N,Sd,Sd,3) uint8 arrays, read back as memory maps, plus
``patches.json`` (per patch: image, label, magnification, patient),
``skipped.json`` and a ``DONE`` marker written last. The folder name is a hash
of everything that shapes its content, so a change of setting never reuses a
stale cache; an entry is written in a temporary folder beside it and renamed
into place whole, so a folder without the marker is a build that never ended.

``DONE`` is the entry's manifest: the byte size and CRC-32 of every other
file, per 4 MiB block for the arrays. Opening an entry checks it once per
process; a changed, truncated or missing file makes it *corrupt*:
:func:`build_split` names it in a warning and rebuilds it, :class:`CachedPairs`
(which has no records to rebuild from) refuses it with :class:`CorruptCache`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from data.datasets import SkipReport
from data.errors import DataError
from data.files import WriteError, atomic_writer, ensure_free_space, exclusive, storage_error, write_json
from data.images import BadImage, load_rgb
from data.patches import NoTissue, PatchSpec, extract_pairs, sample_centres
from data.records import ImageRecord
from data.sites import site_profile
from data.stain import build_normalizer
from data.tissue import tissue_mask

log = logging.getLogger(__name__)
CACHE_VERSION = 5
"""2: Macenko with two search passes and the OD table; 3: ties in that search; 4: patch centres by image name;
5: arrays written with their exact row count, and a DONE manifest with the digests of every file."""


#: Arrays and JSON files are digested in blocks of this many bytes (a CRC-32 each): a mismatch says where it lies.
DIGEST_BLOCK = 4 * 2**20
_ARRAYS = ("context.npy", "detail.npy")
_FILES = ("patches.json", "skipped.json")
_JSON_BYTES_PER_PATCH = 1024  # patches.json, generously (paths are its longest field)
#: Entries this process has checked (or built): folder -> the (size, mtime, inode) of their files then.
_VERIFIED: dict[str, tuple | None] = {}


class CorruptCache(DataError):
    """A cache entry whose files do not match the digests of its DONE manifest; one line naming it and why."""

    def __init__(self, folder: str | Path, reason: str, consequence: str = ""):
        self.folder, self.reason = Path(folder), reason
        super().__init__(f"cache entry {folder} is corrupt ({reason}){consequence}")


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
        h = hashlib.sha256(
            json.dumps([CACHE_VERSION, asdict(self), _stamp(self.stain_reference)], sort_keys=True).encode()
        )
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


def split_specs(
    patch: PatchSpec,
    train_patches: int,
    eval_patches: int,
    stain: str = "macenko",
    stain_reference: str = "",
    seed: int = 0,
    site_shift: float = 0.0,
) -> dict[str, CacheSpec]:
    """The spec of each split: ``train_patches`` pairs per training image, ``eval_patches`` per val/test image."""
    return {
        split: CacheSpec(
            patch, train_patches if split == "train" else eval_patches, stain, stain_reference, seed, site_shift
        )
        for split in ("train", "val", "test")
    }


def split_folder(records: Sequence[ImageRecord], spec: CacheSpec, root: Path, name: str = "") -> Path:
    """Where the cache of these records under this spec lives (built or not)."""
    return Path(root) / f"{name or 'split'}-{spec.digest(records)}"


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
    fault = _fault(folder)
    if fault is not None:
        try:
            with exclusive(folder):  # ranks or runs sharing the cache: one builds, the others wait
                fault = _fault(folder)  # again: another process may have built or rebuilt it meanwhile
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
        for small in _FILES:
            files[small] = _digest_file(tmp / small)
        count = int(files[_ARRAYS[0]]["shape"][0])
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
    _VERIFIED[_key(folder)] = _signature(folder)  # its digests were taken while writing: no need to read it back


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
    with atomic_writer(folder / _ARRAYS[0]) as context_file, atomic_writer(folder / _ARRAYS[1]) as detail_file:
        outputs = (
            _ArrayWriter(context_file, (p.context_size, p.context_size, 3), capacity),
            _ArrayWriter(detail_file, (p.detail_size, p.detail_size, 3), capacity),
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
        files = {file: output.finish() for file, output in zip(_ARRAYS, outputs)}
    degenerate = int(getattr(normalizer, "num_degenerate", 0))
    write_json(
        folder / "patches.json", {"count": len(meta), "stain_degenerate": degenerate, "patches": meta}, indent=None
    )
    return files


def _npy_header(shape: Sequence[int], length: int | None = None) -> bytes:
    """The .npy 1.0 header of a C-order uint8 array of ``shape``, byte for byte as ``np.save`` writes it.

    With ``length``, padded with spaces to that many bytes (a header reserved for
    more rows than were written then keeps its place).
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": tuple(int(n) for n in shape),
        },
    )
    head = buf.getvalue()
    if length is not None and len(head) != length:
        if len(head) > length or length - 10 > 0xFFFF:
            raise ValueError(f".npy header of {len(head)} bytes does not fit in {length}")
        head = head[:8] + struct.pack("<H", length - 10) + head[10:-1] + b" " * (length - len(head)) + b"\n"
    return head


class _BlockDigest:
    """CRC-32 of consecutive ``DIGEST_BLOCK``-byte blocks of a stream of bytes."""

    def __init__(self):
        self.crcs: list[int] = []
        self._crc, self._fill = 0, 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(DIGEST_BLOCK - self._fill, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == DIGEST_BLOCK:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def finish(self) -> list[int]:
        if self._fill:
            self.crcs.append(self._crc)
            self._crc, self._fill = 0, 0
        return self.crcs


class _ArrayWriter:
    """Rows of a uint8 array written to an open .npy file whose header is fixed up to the final count at the end."""

    def __init__(self, handle, row_shape: tuple[int, ...], capacity: int):
        self.handle, self.row_shape, self.rows = handle, tuple(row_shape), 0
        placeholder = _npy_header((capacity, *self.row_shape))  # as long as any header for fewer rows
        self.offset = len(placeholder)
        handle.write(placeholder)
        self.digest = _BlockDigest()

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"patches of shape {array.shape[1:]} in a cache of {self.row_shape}")
        view = memoryview(array).cast("B")
        self.handle.write(view)
        self.digest.update(view)
        self.rows += len(array)

    def finish(self) -> dict:
        """Write the real header; the file's manifest entry (size, header and block digests)."""
        header = _npy_header((self.rows, *self.row_shape), self.offset)
        self.handle.seek(0)
        self.handle.write(header)
        self.handle.seek(0, os.SEEK_END)
        size = self.offset + self.rows * int(np.prod(self.row_shape))
        return {
            "bytes": size,
            "offset": self.offset,
            "header": zlib.crc32(header),
            "shape": [self.rows, *self.row_shape],
            "crc32": self.digest.finish(),
        }


def _digest_file(path: Path) -> dict:
    """The manifest entry of a small file: its size and block digests."""
    digest = _BlockDigest()
    digest.update(path.read_bytes())
    return {"bytes": path.stat().st_size, "crc32": digest.finish()}


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _signature(folder: Path) -> tuple | None:
    """Size, modification time and inode of every file of an entry (None if one is missing)."""
    try:
        return tuple(
            (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
            for st in (os.stat(folder / f) for f in ("DONE", *_FILES, *_ARRAYS))
        )
    except OSError:
        return None


def _fault(folder: Path) -> str | None:
    """What is wrong with the entry in ``folder``: None if sound, "" if never completed (no DONE), else the reason.

    Every file is checked against the sizes and block digests of the DONE
    manifest: all sizes first, then the contents, small files before the
    arrays. Done once per process and entry: afterwards only the files'
    size, modification time and inode are compared with what they were.
    """
    folder = Path(folder)
    try:
        raw = (folder / "DONE").read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as err:
        return f"DONE is unreadable: {err.strerror}"
    signature = _signature(folder)
    if signature is not None and _VERIFIED.get(_key(folder)) == signature:
        return None
    try:
        manifest = json.loads(raw)
        version, block = manifest["version"], int(manifest["block"])
        listed = ((name, manifest["files"][name]) for name in (*_FILES, *_ARRAYS))
        entries = [
            _Digest(name, int(e["bytes"]), int(e.get("offset", 0)), e.get("header"), [int(c) for c in e["crc32"]])
            for name, e in listed
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        return "DONE is not a manifest of this cache"
    if version != CACHE_VERSION:
        return f"DONE is of cache version {version}, not {CACHE_VERSION}"
    if block <= 0 or any(len(e.crcs) != -(-(e.size - e.offset) // block) for e in entries):
        return "DONE is not a manifest of this cache"
    for entry in entries:
        try:
            size = os.stat(folder / entry.name).st_size
        except FileNotFoundError:
            return f"{entry.name} is missing"
        except OSError as err:
            return f"{entry.name} is unreadable: {err.strerror}"
        if size != entry.size:
            return f"{entry.name} has {size} bytes, not {entry.size}"
    for entry in entries:
        reason = _check_contents(folder / entry.name, entry, block)
        if reason:
            return reason
    _VERIFIED[_key(folder)] = signature
    return None


class _Digest(NamedTuple):
    """A file's line of the DONE manifest."""

    name: str
    size: int
    offset: int  # where the digested blocks start (after an array's header)
    header: int | None  # CRC-32 of the bytes before ``offset``
    crcs: list[int]  # CRC-32 of each block from ``offset`` on


def _check_contents(path: Path, entry: _Digest, block: int) -> str | None:
    """Why the bytes of ``path`` differ from its manifest entry, or None."""
    try:
        with open(path, "rb", buffering=0) as handle:
            if entry.offset and zlib.crc32(handle.read(entry.offset)) != entry.header:
                return f"{path.name} has another header"
            buf = memoryview(bytearray(block))
            for index, expected in enumerate(entry.crcs):
                got = _read_full(handle, buf)
                if zlib.crc32(buf[:got]) != expected:
                    start = entry.offset + index * block
                    return f"{path.name} differs from its digest in bytes {start}-{start + got}"
    except OSError as err:
        return f"{path.name} is unreadable: {err.strerror}"
    return None


def _read_full(handle, buf: memoryview) -> int:
    """Fill ``buf`` from ``handle`` as far as the file goes; the bytes read."""
    got = 0
    while got < len(buf):
        n = handle.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


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
    except NoTissue:
        report.add(rec.path, "all background")  # a fixed reason: counts of it leave the hospital
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
        """Open cached splits; each entry is checked against its digests once per process (not in workers).

        A folder without a DONE marker (arrays written by hand, as benchmarks
        do) is read as it is.

        Raises:
            CorruptCache: an entry's files differ from its digests; it cannot be rebuilt from here.
        """
        self.folders = [Path(f) for f in folders]
        self.meta: list[dict] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []
        for part, folder in enumerate(self.folders):
            fault = _fault(folder)
            if fault:
                raise CorruptCache(folder, fault, ": delete it and build it again (train.py or python -m data.prepare)")
            info = json.loads((folder / "patches.json").read_text())
            self.offsets.append(len(self.meta))
            self.counts.append(info["count"])
            self.meta.extend({**m, "image": f"{folder.name}:{m['image']}", "part": part} for m in info["patches"])
        self.labels = torch.tensor([m["label"] for m in self.meta], dtype=torch.long)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        """What a DataLoader worker receives: folder names and metadata; it neither copies nor re-checks arrays."""
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopened in the receiving process
        return state

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(context, detail) memory maps of every part, opened on first use."""
        if self._arrays is None:
            self._arrays = [
                (np.load(f / "context.npy", mmap_mode="r")[:n], np.load(f / "detail.npy", mmap_mode="r")[:n])
                for f, n in zip(self.folders, self.counts)
            ]
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
        return (
            torch.from_numpy(ctx).permute(0, 3, 1, 2),
            torch.from_numpy(det).permute(0, 3, 1, 2),
            self.labels[idx],
            torch.from_numpy(idx),
        )

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
