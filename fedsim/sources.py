"""The embedded known-answer benchmark as a run's data (``data.source = benchmark``, ``data.path`` empty).

The benchmark (:mod:`data.benchmark`) is rendered once per spec into the cache folder and read like any
manifest dataset: its manifest names every tile's hospital and split, so the partition is natural and the
splits are the benchmark's own. Its patch geometry is part of the design (one pair per tile, the context
field 4x the detail field, centres that keep both windows inside the tile), so a run must use the data
settings the preset implies; :func:`check_benchmark_settings` refuses any other, naming each setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from data.benchmark import BENCHMARK_VERSION, HELDOUT, BenchmarkSpec, geometry, preset
from data.benchmark.dataset import MANIFEST_NAME, Progress, render_dataset
from data.cache import default_cache_root
from fedsim.config import ConfigError, RunConfig
from fedsim.errors import UserError

log = logging.getLogger(__name__)


def benchmark_spec(cfg: RunConfig) -> BenchmarkSpec:
    """The benchmark of this config: its preset, the training tiles drawn from ``train.seed``."""
    b = cfg.data.benchmark
    try:
        return preset(b.preset, seed=cfg.train.seed, test_seed=b.test_seed, alpha=b.alpha, confound=b.confound)
    except ValueError as err:
        raise ConfigError(f"data.benchmark: {err}") from None


def benchmark_settings(spec: BenchmarkSpec) -> dict[str, Any]:
    """The data settings a run on ``spec`` must have, by dotted key."""
    g = geometry(spec)
    return {
        "data.detail_size": g["detail_size"],
        "data.context_fov": g["context_fov"],
        "data.context_size": g["context_size"],
        "data.patches_per_image": g["patches_per_image"],
        "data.eval_patches_per_image": g["eval_patches_per_image"],
        "data.patch_centres": "inside",
        "data.min_tissue": 0.0,  # every pixel of a tile is tumour; Otsu would call pale lumens background
    }


def check_benchmark_settings(cfg: RunConfig) -> None:
    """Refuse, before any work, data settings that do not fit the benchmark's design.

    Raises:
        ConfigError: one line naming every setting that differs and the value it needs.
    """
    spec = benchmark_spec(cfg)
    wrong = []
    for key, needed in benchmark_settings(spec).items():
        got = getattr(cfg.data, key.split(".", 1)[1])
        if got != needed:
            wrong.append(f"{key} = {needed!r} (not {got!r})")
    if HELDOUT not in cfg.data.heldout_hospitals:
        wrong.append(f"data.heldout_hospitals holding {HELDOUT!r} (it has only test tiles and never trains)")
    if cfg.data.num_hospitals not in (0, spec.hospitals):
        wrong.append(f"data.num_hospitals = {spec.hospitals} or 0 (not {cfg.data.num_hospitals})")
    if wrong:
        raise ConfigError(
            f"data.source = benchmark (preset {spec.preset}) needs {'; '.join(wrong)}: "
            f"--config configs/benchmark-{spec.preset}.toml sets them"
        )


def benchmark_root(cfg: RunConfig, spec: BenchmarkSpec) -> Path:
    """Where the rendered benchmark lives: ``benchmark-<preset>-<hash of the spec>`` in the cache folder."""
    text = json.dumps([BENCHMARK_VERSION, spec.to_dict()], sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    base = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_root()
    return base / f"benchmark-{spec.preset}-{digest}"


def render_benchmark(spec: BenchmarkSpec, root: Path, progress: bool = False) -> Path:
    """``root`` holding the rendered benchmark: reused when its manifest is there, else rendered (into a
    hidden folder renamed into place, so a reader never sees half a dataset)."""
    if (root / MANIFEST_NAME).exists():
        return root
    if progress:
        log.info(
            "rendering the %s benchmark (seed %d, test seed %d) into %s", spec.preset, spec.seed, spec.test_seed, root
        )
    try:
        render_dataset(spec, root, progress=Progress(enabled=progress))
    except FileExistsError:
        if not (root / MANIFEST_NAME).exists():  # not another writer that finished meanwhile
            raise UserError(
                f"{root} holds files but no {MANIFEST_NAME}: delete it to render the benchmark again"
            ) from None
    return root
