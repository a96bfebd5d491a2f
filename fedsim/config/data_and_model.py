"""The tables of what a run reads and the network it trains: ``data.*`` (with ``data.synthetic.*``) and ``model.*``.

Each field is declared once with :func:`fedsim.settings.setting` (type, default, flags, whether it changes
the weights) and documented by the docstring under it: the README's tables and the command lines' help
come from these declarations, so their wording is part of the interface. Each table checks its own
values in ``__post_init__`` (the checks of :mod:`fedsim.config.checks`), so no table is ever built
holding a value the code cannot use.
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from typing import ClassVar, Literal

from data.limits import MAX_SITE_SHIFT
from data.records import GRADE_NAMES
from fedsim.config.checks import (
    MAX_DIRICHLET,
    MAX_HIDDEN,
    MAX_HOSPITALS,
    MAX_PATCHES,
    MAX_SIDE,
    MAX_SYNTHETIC,
    MAX_WORKERS,
    ConfigError,
    _check_choices,
    _within,
)
from fedsim.settings import setting, table


@table
class SyntheticConfig:
    """The embedded synthetic dataset, used when ``data.path`` is empty."""

    PREFIX: ClassVar[str] = "data.synthetic."  # the dotted name of a field, in its error messages

    patients_per_grade: int = 4
    """Patients per grade and hospital, 3..1000."""
    images_per_patient: int = 4
    """Images per patient, spread over the magnifications, 1..1000."""
    image_size: int = 800
    """Side of each square image in pixels, 64..8192 (CRC-HGD images are 800x800)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("data.synthetic.patients_per_grade", self.patients_per_grade, 3, MAX_SYNTHETIC)
        _within("data.synthetic.images_per_patient", self.images_per_patient, 1, MAX_SYNTHETIC)
        _within("data.synthetic.image_size", self.image_size, 64, MAX_SIDE)


@table
class BenchmarkConfig:
    """The embedded known-answer benchmark (``data.source = benchmark``): :mod:`data.benchmark`."""

    PREFIX: ClassVar[str] = "data.benchmark."

    preset: Literal["demo", "study", "paper"] = setting("demo", omit_default=True)
    """Which benchmark: demo (seconds on one core), study (the CPU study: 48 px pairs, 600 training tiles per
    hospital on average) or paper (224/320 px pairs for GPUs). Its data settings are fixed by the preset
    (``configs/benchmark-*.toml`` set them); the training tiles are drawn from ``train.seed``."""
    test_seed: int = setting(0, omit_default=True)
    """Seed of the hospitals' lab profiles and of every test tile, 0..2^63-1: kept fixed while the study's
    seeds redraw the training tiles, so every seed is tested on the same images."""
    alpha: float = setting(2.0, omit_default=True)
    """Dirichlet concentration of each hospital's grade mix in its training and validation tiles, in [0, 1e6];
    0 = every hospital balanced (no label skew)."""
    confound: bool = setting(False, omit_default=True)
    """The darkest-staining hospital gets more Grade III (a stain-label confound)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("data.benchmark.test_seed", self.test_seed, 0, 2**63 - 1)
        _within("data.benchmark.alpha", self.alpha, 0.0, MAX_DIRICHLET)


@table
class DataConfig:
    """Where images come from and how they become patch pairs."""

    PREFIX: ClassVar[str] = "data."

    path: str = setting(
        "",
        flag="--data",
        help="CRC-HGD-style folder, folder with manifest.csv, or manifest CSV (default: embedded synthetic data)",
    )
    """CRC-HGD-style folder, a folder with manifest.csv, or a manifest CSV (it must exist); empty = embedded
    synthetic data."""
    source: Literal["synthetic", "benchmark"] = setting(
        "synthetic",
        flag="--data-source",
        help="embedded data when --data is not given: synthetic | benchmark (see data.benchmark.*)",
        omit_default=True,
    )
    """The embedded data used when ``data.path`` is empty: synthetic (``data.synthetic.*``) or benchmark
    (the known-answer benchmark, ``data.benchmark.*``, with its held-out hospital ``HOLDOUT``)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    heldout_hospitals: list[str] = setting([], omit_default=True)
    """Hospitals of the data that never train: not federation clients, their test split evaluated by rank 0
    at the end and reported apart (``final.json`` ``heldout``). The benchmark's ``HOLDOUT`` must be listed."""
    classes: list[str] = setting(list(GRADE_NAMES), prepare="--classes", help="comma-separated classes in label order")
    """Classes to use, in label order (at least two, no two alike ignoring case); add "Normal" / "Mixed"
    for CRC-HGD's extra folders."""
    num_hospitals: int = setting(
        0, flag="--num-hospitals", help="hospitals, at least the number of ranks (default: one per rank)"
    )
    """Hospitals in the federation, 0..4096; 0 = the world size (federated) or 3 (centralized)."""
    partition: Literal["auto", "natural", "iid", "dirichlet"] = setting(
        "auto",
        flag="--partition",
        prepare="--partition",
        help="auto (natural when every image names its hospital, else iid) | natural | iid | dirichlet",
    )
    """How images are assigned to hospitals: auto (natural when every image has a hospital, else
    stratified iid), natural (the manifest's hospital column), iid (patients dealt out per split and
    grade) or dirichlet (label skew)."""
    dirichlet_alpha: float = setting(0.5, prepare="--alpha", help="Dirichlet concentration (partition dirichlet)")
    """Concentration of the Dirichlet label skew, in (0, 1e6]; small = more skewed."""
    split: list[float] = setting([0.7, 0.15, 0.15], prepare="--split", metavar=("TRAIN", "VAL", "TEST"))
    """Train/val/test fractions of patients."""
    patient_regex: str = setting("", prepare="--patient-regex", help="regex on file stems giving patient ids")
    """Regex on the file stem giving the patient id when the data has none."""
    context_size: int = setting(320, prepare="--context-size")
    """Side of the context patch fed to the network, 1..8192 pixels."""
    detail_size: int = setting(224, prepare="--detail-size")
    """Side of the detail patch fed to the network (native resolution), 1..8192 pixels."""
    context_fov: int = setting(320, prepare="--context-fov")
    """Native pixels covered by the context patch, resized to context_size (wider = more context), 1..8192."""
    patches_per_image: int = setting(4, prepare="--patches-per-image")
    """Patch pairs drawn per training image, 1..4096."""
    eval_patches_per_image: int = setting(4, prepare="--eval-patches-per-image")
    """Patch pairs drawn per validation/test image (their probabilities are averaged), 1..4096."""
    min_tissue: float = setting(0.5, prepare="--min-tissue")
    """Minimum tissue fraction of a detail window for its centre to be sampled."""
    patch_centres: Literal["tissue", "inside"] = setting(
        "tissue", prepare="--patch-centres", help="tissue | inside (both windows inside the image)", omit_default=True
    )
    """Where patch centres may lie: tissue (wherever the detail window holds min_tissue; windows reaching past
    the image are reflect-padded) or inside (also with both windows inside the image: nothing mirrored)."""
    stain: Literal["macenko", "reinhard", "none"] = setting(
        "macenko", flag="--stain", prepare="--stain", help="macenko | reinhard | none"
    )
    """Stain normalization: macenko, reinhard or none."""
    stain_reference: str = setting(
        "",
        prepare="--stain-reference",
        help="image to fit the normalizer to (default: the built-in reference of data/stain/)",
    )
    """Image file to fit the stain normalizer to (it must exist and be readable); empty = the built-in
    reference (Macenko: the published constants; Reinhard: the Lab statistics of a real H&E region after
    Macenko, see data/stain/reinhard.py)."""
    site_shift: float = setting(
        0.0,
        prepare="--site-shift",
        help="simulated lab differences per hospital (data.sites): 0 = off, 1 = a typical spread",
    )
    """Simulated lab differences per hospital (stain vectors, dye strength, light, blur, JPEG); 0 = off, 1 = typical."""
    stain_on_device: bool = False
    """Normalize each patch batch on the training device instead of once in the cache (the cache then holds
    raw pixels)."""
    cache_dir: str = ""
    """Where decoded, normalized patch pairs are cached; empty = $FEDSIM_CACHE or ~/.cache/fedsim."""
    num_workers: int = setting(0, flag="--workers", help="DataLoader workers per rank", weights=False)
    """DataLoader worker processes per rank, 0..256."""
    augment: bool = True
    """Random flips, 90-degree rotations and light colour jitter in training."""
    only_hospital: str = ""
    """Centralized mode only: train on this hospital alone (the local-only baseline); tests still cover all."""

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):
            self.synthetic = SyntheticConfig(**self.synthetic)
        if isinstance(self.benchmark, dict):
            self.benchmark = BenchmarkConfig(**self.benchmark)
        if len(set(self.heldout_hospitals)) != len(self.heldout_hospitals) or not all(
            h.strip() for h in self.heldout_hospitals
        ):
            raise ConfigError(f"data.heldout_hospitals = {self.heldout_hospitals} must name distinct hospitals")
        _check_choices(self)
        _within("data.num_hospitals", self.num_hospitals, 0, MAX_HOSPITALS)
        _within("data.dirichlet_alpha", self.dirichlet_alpha, 0.0, MAX_DIRICHLET, inclusive=False)
        if not 0 <= self.site_shift <= MAX_SITE_SHIFT:
            raise ConfigError(
                f"data.site_shift = {self.site_shift!r} must lie in [0, {MAX_SITE_SHIFT:g}] (0 = off, 1 = typical)"
            )
        if (
            len(self.split) != 3
            or not all(math.isfinite(f) and f >= 0 for f in self.split)
            or abs(sum(self.split) - 1) > 1e-6
        ):
            raise ConfigError(f"data.split = {self.split} must be three non-negative fractions summing to 1")
        for name in ("context_size", "detail_size", "context_fov"):
            _within(f"data.{name}", getattr(self, name), 1, MAX_SIDE)
        for name in ("patches_per_image", "eval_patches_per_image"):
            _within(f"data.{name}", getattr(self, name), 1, MAX_PATCHES)
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"data.min_tissue = {self.min_tissue} must lie in [0, 1]")
        _within("data.num_workers", self.num_workers, 0, MAX_WORKERS)
        if len(self.classes) < 2:
            raise ConfigError(f"data.classes = {self.classes} must name at least two classes")
        seen: dict[str, str] = {}
        for name in self.classes:
            if not name.strip():
                raise ConfigError(f"data.classes = {self.classes} holds an empty class name")
            key = name.strip().casefold()
            if key in seen:
                how = "" if seen[key] == name else f" ({seen[key]!r} and {name!r} differ only in case or spaces)"
                raise ConfigError(f"data.classes = {self.classes} names {seen[key]!r} twice{how}")
            seen[key] = name
        try:
            re.compile(self.patient_regex)
        except re.error as err:
            raise ConfigError(
                f"data.patient_regex = {self.patient_regex!r} is not a regular expression: {err}"
            ) from None


@table
class ModelConfig:
    """The dual-stream network."""

    PREFIX: ClassVar[str] = "model."

    backbone: str = setting("resnetrs50", flag="--backbone", help="timm model name, or small_cnn (default resnetrs50)")
    """Any timm model name, or fedsim's own ``small_cnn`` / ``small_cnn_w32`` (models/small_cnn.py: full
    resolution until the first pooling, for the embedded benchmark on a CPU); tiny timm ones (test_resnet,
    resnet10t) suit CPU demos."""
    scales: Literal["dual", "detail", "context"] = setting("dual", flag="--scales", help="dual | detail | context")
    """dual (context + detail), detail or context (single-stream ablation)."""
    hidden: int = 512
    """Width of the Dense layer of the head, 1..65536."""
    dropout: float = 0.5
    """Dropout before the last layer."""
    pretrained: str = setting("", flag="--pretrained", help="local backbone weights (.safetensors or torch state dict)")
    """Local weights (safetensors or a state dict) for the backbones (the file must exist and fit the
    backbone); nothing is downloaded."""
    norm: Literal["auto", "batch", "group"] = "auto"
    """The backbones' normalization: batch, group (GroupNorm, gcd(C, 32) groups) or auto (group under
    differential privacy, whose per-sample gradients BatchNorm would mix, else batch)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("model.hidden", self.hidden, 1, MAX_HIDDEN)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout = {self.dropout} must lie in [0, 1)")
        if not self.backbone:
            raise ConfigError("model.backbone must name a timm model")
