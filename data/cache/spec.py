"""What shapes a cache entry, and so names it: :class:`CacheSpec`, and the files an entry holds.

The folder of an entry is named by a hash of its spec, the cache version, the
stain reference and every record with its file's size and modification time
(:meth:`CacheSpec.digest`): a change of any of them gives another folder, so a
stale entry is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

from data.patches import PatchSpec
from data.records import ImageRecord

CACHE_VERSION = 5
"""2: Macenko with two search passes and the OD table; 3: ties in that search; 4: patch centres by image name;
5: arrays written with their exact row count, and a DONE manifest with the digests of every file."""

#: The arrays of an entry, (N,Sc,Sc,3) and (N,Sd,Sd,3) uint8.
ARRAY_FILES = ("context.npy", "detail.npy")
#: The JSON files of an entry besides DONE: per-patch metadata and the skipped images.
JSON_FILES = ("patches.json", "skipped.json")


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
        fields = asdict(self)
        if fields["patch"]["centres"] == "tissue":  # added later: caches built before keep their key
            del fields["patch"]["centres"]
        h = hashlib.sha256(json.dumps([CACHE_VERSION, fields, _stamp(self.stain_reference)], sort_keys=True).encode())
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
