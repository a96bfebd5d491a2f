"""Writing a benchmark dataset: the image tree, ``manifest.csv``, ``benchmark.json`` and ``examples.png``.

The tree is CRC-HGD's (``<class folder>/20x/<tile>.jpg``) and the manifest has
the columns :data:`MANIFEST_COLUMNS`; ``data.datasets.read_manifest`` reads
``path``, ``label``, ``magnification``, ``patient``, ``hospital`` and ``split``
and ignores the others. Everything is written into a hidden folder beside the
destination and renamed into place at the end, so an interrupted render leaves
no half-written dataset under the destination's name. Tiles are rendered by a
pool of worker processes (each tile depends only on its spec, seed stream and
hospital, so the bytes do not depend on the number of workers).
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from data.benchmark.design import BENCHMARK_VERSION, HELDOUT, MAGNIFICATION, BenchmarkSpec, Tile, ceiling, geometry
from data.benchmark.hospitals import HospitalProfile, plan, profiles
from data.benchmark.render import tile_jpeg
from data.files import write_atomic, write_json, write_with
from data.synthetic import CLASS_FOLDERS

MANIFEST_NAME, SPEC_NAME, EXAMPLES_NAME = "manifest.csv", "benchmark.json", "examples.png"
MANIFEST_COLUMNS = (
    "path",
    "label",
    "magnification",
    "patient",
    "hospital",
    "split",
    "arch_level",
    "nuclear_level",
    "arch_shown",
    "nuclear_shown",
)


def relpath(tile: Tile) -> str:
    """Where a tile lies below the dataset root, e.g. ``CRC_Grade__1__Well_Diff/20x/H1_train_00007.jpg``."""
    return f"{CLASS_FOLDERS[tile.grade]}/{MAGNIFICATION}/{tile.hospital}_{tile.split}_{tile.index:05d}.jpg"


def manifest_row(tile: Tile) -> list[str]:
    """A tile's manifest row, in :data:`MANIFEST_COLUMNS` order."""
    return [
        relpath(tile),
        str(tile.grade),
        MAGNIFICATION,
        tile.patient,
        tile.hospital,
        tile.split,
        str(tile.arch),
        str(tile.nuclear),
        str(tile.arch_shown),
        str(tile.nuclear_shown),
    ]


def manifest_text(tiles: Iterable[Tile]) -> str:
    """The whole ``manifest.csv``."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(manifest_row(t) for t in tiles)
    return text.getvalue()


def document(spec: BenchmarkSpec, sites: dict[str, HospitalProfile]) -> dict:
    """What ``benchmark.json`` holds: the spec, the data settings it implies, the sites, the ceiling."""
    return {
        "benchmark_version": BENCHMARK_VERSION,
        "spec": spec.to_dict(),
        "data_settings": geometry(spec),
        "ceiling": ceiling(spec.noise),
        "heldout_hospital": HELDOUT,
        "hospitals": {name: p.to_dict() for name, p in sites.items()},
    }


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per stage (to ``stream``)."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def stage(self, label: str, items: list) -> Iterator:
        """Iterate ``items``, announcing the stage."""
        if not self.enabled:
            return iter(items)
        if self.bar:
            from tqdm import tqdm  # only needed on a terminal

            return iter(tqdm(items, desc=label, unit="tile", file=self.stream, leave=False))
        print(f"{label}: {len(items)} tiles", file=self.stream, flush=True)
        return iter(items)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


def _stages(tiles: list[Tile]) -> list[tuple[str, list[Tile]]]:
    """Tiles grouped by (hospital, split) in plan order."""
    groups: dict[tuple[str, str], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault((tile.hospital, tile.split), []).append(tile)
    return [(f"{h} {s}", group) for (h, s), group in groups.items()]


def check_destination(out: Path) -> None:
    """Refuse a destination that already holds something.

    Raises:
        FileExistsError: ``out`` is a file or a non-empty folder.
    """
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or delete it")


def render_dataset(
    spec: BenchmarkSpec,
    out: str | os.PathLike,
    progress: Progress | None = None,
    examples: Callable[[Path, list[Tile]], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Render the benchmark into ``out`` (which must not exist or be empty); returns ``out/manifest.csv``.

    Args:
        spec: What to render.
        out: Destination folder.
        progress: Where to report stages (default: silent).
        examples: ``examples(root, tiles)`` writes ``examples.png`` into the
            unfinished root (default: :func:`data.benchmark.examples.write_examples`).
        workers: Rendering processes (default :func:`default_workers`; 1 renders in this process).

    Raises:
        FileExistsError: See :func:`check_destination`.
        WriteError: The storage refused a file.
    """
    out = Path(out).expanduser().absolute()
    check_destination(out)
    progress = progress or Progress(enabled=False)
    if examples is None:
        from data.benchmark.examples import write_examples as examples
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _fill(tmp, spec, progress, examples, default_workers() if workers is None else max(1, int(workers)))
        check_destination(out)  # another writer may have finished meanwhile
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / MANIFEST_NAME


def default_workers() -> int:
    """The CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


_WORKER: dict = {}


def _start_worker(spec: BenchmarkSpec, sites: dict[str, HospitalProfile]) -> None:
    _WORKER.update(spec=spec, sites=sites)


def _render_in_worker(tile: Tile) -> bytes:
    return tile_jpeg(_WORKER["spec"], tile, _WORKER["sites"][tile.hospital])


def _fill(root: Path, spec: BenchmarkSpec, progress: Progress, examples, workers: int) -> None:
    """Every file of the dataset, written under ``root``; the manifest last."""
    sites = profiles(spec)
    tiles = plan(spec)
    started = time.perf_counter()
    pool = None
    if workers > 1 and len(tiles) >= 4 * workers:
        # spawn, not fork: the caller may be a training process with threads (OpenMP, gloo) running.
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(workers, initializer=_start_worker, initargs=(spec, sites))
    try:
        for label, group in _stages(tiles):
            if pool is None:
                encoded = (tile_jpeg(spec, tile, sites[tile.hospital]) for tile in group)
            else:
                encoded = pool.imap(_render_in_worker, group, chunksize=8)
            for tile, data in zip(progress.stage(label, group), encoded):
                write_atomic(root / relpath(tile), data)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    processes = "1 process" if pool is None else f"{workers} processes"
    progress.line(f"rendered {len(tiles)} tiles in {time.perf_counter() - started:.1f} s ({processes})")
    write_json(root / SPEC_NAME, document(spec, sites))
    progress.line("writing examples.png")
    examples(root, tiles)
    write_with(root / MANIFEST_NAME, lambda handle: handle.write(manifest_text(tiles).encode("utf-8")))


def read_manifest_rows(root: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a rendered dataset's manifest as dictionaries (every column, as text)."""
    with open(Path(root) / MANIFEST_NAME, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
