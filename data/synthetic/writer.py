"""Write a synthetic dataset to disk: render each planned image, under a lock, resumably, manifest last.

Several ranks or runs may share one cache folder, so one renders while the
others wait; an interrupted run leaves no manifest and is resumed image by
image, and a folder that is not ours is never written into.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data.files import exclusive, write_atomic
from data.synthetic.optics import StainProfile
from data.synthetic.render import render_image
from data.synthetic.spec import (
    _IMAGE_STREAM,
    _SLIDE_STREAM,
    CLASS_FOLDERS,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPEC_NAME,
    PlannedImage,
    SyntheticSpec,
    plan,
    spec_document,
)


def render_item(spec: SyntheticSpec, item: PlannedImage) -> bytes:
    """The JPEG bytes of one planned image; depends only on the spec and the item."""
    stain = StainProfile.for_hospital(spec.seed, item.hospital)
    # One slide per patient: its staining varies a little around the lab's.
    slide = np.random.default_rng([spec.seed, _SLIDE_STREAM, item.hospital, item.patient])
    stain = stain.jittered(slide)
    rng = np.random.default_rng([spec.seed, _IMAGE_STREAM, item.hospital, item.patient, item.image])
    pixels = render_image(item.grade, item.magnification, stain, rng, spec.image_size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=spec.jpeg_quality)
    return buffer.getvalue()


def generate(root: str | os.PathLike, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Render the dataset under ``root`` (idempotent) and return ``root/manifest.csv``.

    A finished dataset (manifest present, ``spec.json`` equal to this spec) is
    returned at once. An interrupted one with the same spec is resumed: images
    are written whole (temporary file, then rename) and the manifest last, so
    only a complete dataset has a manifest.

    Args:
        root: Dataset folder; created if missing.
        spec: What to render.
        progress: Show a progress bar.

    Raises:
        FileExistsError: If ``root`` holds files but no ``spec.json`` (it is
            not a synthetic dataset), or a finished dataset of another spec.
    """
    root = Path(root)
    manifest = root / MANIFEST_NAME
    document = spec_document(spec)
    if manifest.is_file() and _spec_on_disk(root) == document:
        return manifest  # finished: no lock needed, so a read-only copy serves too
    with exclusive(root):  # ranks or runs sharing the cache: one renders, the others wait
        return _render(root, spec, document, progress)


def _render(root: Path, spec: SyntheticSpec, document: dict, progress: bool) -> Path:
    """``generate`` under the lock: claim the folder, render what is missing, write the manifest last."""
    manifest = root / MANIFEST_NAME
    resume = _claim(root, document)
    if resume and manifest.is_file():
        return manifest
    items = plan(spec)
    for item in _progress(items, progress):
        path = root / item.relpath
        if not (resume and path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, render_item(spec, item))
    _remove_strays(root, {item.relpath for item in items})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(item.row() for item in items)
    write_atomic(manifest, text.getvalue().encode("utf-8"))
    return manifest


def _claim(root: Path, document: dict) -> bool:
    """Make ``root`` ours for this spec; True if it already was (so files can be kept).

    Raises:
        FileExistsError: See ``generate``.
    """
    spec_path = root / SPEC_NAME
    if spec_path.is_file():
        if _spec_on_disk(root) == document:
            return True
        if (root / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{root} holds a synthetic dataset of another spec; delete it or choose another folder"
            )
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and has no {SPEC_NAME}; refusing to write a synthetic dataset into it"
        )
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_atomic(spec_path, text.encode("utf-8"))
    return False


def _spec_on_disk(root: Path) -> dict | None:
    """The spec document saved in ``root``; None when missing or unreadable."""
    try:
        return json.loads((root / SPEC_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_strays(root: Path, keep: set[str]) -> None:
    """Delete images left in our class folders by an interrupted run of another spec."""
    for folder in CLASS_FOLDERS:
        for path in (root / folder).glob("*/*.jpg"):
            if path.relative_to(root).as_posix() not in keep:
                path.unlink()


def _progress(items: list[PlannedImage], enabled: bool) -> Iterator[PlannedImage]:
    """The items, behind a tqdm progress bar when enabled and stderr is a terminal; one plain line otherwise
    (a bar's redraws in a log file are one line of hundreds of updates)."""
    if not enabled:
        return iter(items)
    if not sys.stderr.isatty():
        print(f"synthetic CRC-HGD: rendering {len(items)} images", file=sys.stderr, flush=True)
        return iter(items)
    from tqdm import tqdm  # only needed for the bar

    return iter(tqdm(items, desc="synthetic CRC-HGD", unit="img"))
