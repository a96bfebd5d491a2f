"""From ``data.path`` to each rank's cached patch pairs.

Every rank derives the same image list, patient-level split and hospital
partition (they depend only on the files and the seed), so nothing about the
data crosses ranks. Each rank then decodes, masks and normalizes the images of
its own hospital(s) only — in federated mode no hospital touches another's
images.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.cache import (
    CachedPairs,
    CacheSpec,
    build_hospital,
    build_split,
    default_cache_root,
    fitted_normalizer,
    split_folder,
    split_specs,
)
from data.datasets import SkipReport, load_records
from data.files import write_atomic
from data.patches import PatchSpec
from data.records import ImageRecord
from data.sites import write_site_profiles
from data.splits import (
    count_table,
    hospital_names,
    missing_splits,
    partition,
    resolve_partition,
    split_by_patient,
    write_splits_csv,
)
from data.synthetic import SyntheticSpec, default_root, generate
from fedsim.config import ConfigError, RunConfig, save
from fedsim.dist import DistInfo, barrier
from fedsim.engine import hosted_by
from fedsim.logger import write_json

log = logging.getLogger(__name__)
SYNTHETIC_HOSPITALS = 3


@dataclass
class HospitalData:
    """One hospital's cached splits."""

    name: str
    index: int
    folders: dict[str, Path] = field(default_factory=dict)
    report: SkipReport = field(default_factory=SkipReport)

    datasets: dict[str, CachedPairs] = field(default_factory=dict)

    def dataset(self, split: str) -> CachedPairs:
        """The cached split (opened once)."""
        if split not in self.datasets:
            self.datasets[split] = CachedPairs([self.folders[split]])
        return self.datasets[split]


@dataclass
class DataPlan:
    """What the run knows about its data."""

    class_names: tuple[str, ...]
    hospitals: list[str]
    records: list[ImageRecord]
    mine: list[HospitalData]
    all_train_folders: list[Path]
    scan_report: SkipReport = field(default_factory=SkipReport)
    """Files skipped while reading the data (before any hospital's cache), as this rank saw them."""
    heldout: list[HospitalData] = field(default_factory=list)
    """The held-out hospitals' test splits (``data.heldout_hospitals``), cached on rank 0 only: rank 0 hosts
    them, so their images are read by one process and never reach another."""
    heldout_records: list[ImageRecord] = field(default_factory=list)
    """The held-out hospitals' test images (every rank knows them, as it knows every hospital's)."""


def num_hospitals(cfg: RunConfig, world_size: int) -> int:
    """Hospitals in the federation: data.num_hospitals, else one per rank when federated (3 centralized)."""
    wanted = cfg.data.num_hospitals
    if not wanted and not cfg.data.path and cfg.data.source == "benchmark":
        from fedsim.sources import benchmark_spec

        wanted = benchmark_spec(cfg).hospitals
    if cfg.train.mode == "federated":
        if wanted and wanted < world_size:
            raise ConfigError(
                f"data.num_hospitals = {wanted} but {world_size} rank(s) were started: every rank hosts at least "
                f"one hospital (use --nproc_per_node={wanted} or fewer)"
            )
        return wanted or world_size
    return wanted or SYNTHETIC_HOSPITALS


def synthetic_spec(cfg: RunConfig, hospitals: int) -> SyntheticSpec:
    """The embedded dataset's spec for this config.

    Raises:
        ConfigError: the generator cannot make what the settings ask (its bounds are tighter than the config's:
            at most 99 hospitals, 333 patients per grade, 4096-pixel images).
    """
    s = cfg.data.synthetic
    try:
        return SyntheticSpec(
            num_hospitals=hospitals,
            patients_per_grade=s.patients_per_grade,
            images_per_patient=s.images_per_patient,
            image_size=s.image_size,
        )
    except ValueError as err:
        raise ConfigError(f"the embedded synthetic data (data.path empty) cannot be made: {err}") from None


def synthetic_root(cfg: RunConfig, spec: SyntheticSpec) -> Path:
    """Where the embedded dataset lives: under data.cache_dir when set, else the default cache."""
    root = default_root(spec)
    return Path(cfg.data.cache_dir) / root.name if cfg.data.cache_dir else root


def data_root(cfg: RunConfig, info: DistInfo, hospitals: int) -> Path:
    """The data path, generating the embedded synthetic dataset when none is given."""
    if cfg.data.path:
        return Path(cfg.data.path).expanduser()
    if cfg.data.source == "benchmark":
        from fedsim.sources import benchmark_root, benchmark_spec, render_benchmark

        spec = benchmark_spec(cfg)
        root = benchmark_root(cfg, spec)
        if info.local_rank == 0:
            render_benchmark(spec, root, progress=info.is_main)
        barrier()
        return root
    spec = synthetic_spec(cfg, hospitals)
    root = synthetic_root(cfg, spec)
    if info.local_rank == 0:  # one writer per node; the others wait at the barrier
        generate(root, spec, progress=info.is_main)
    barrier()
    return root


def plan_data(cfg: RunConfig, info: DistInfo, out: Path) -> DataPlan:
    """Find, split, partition and cache the data this rank needs."""
    hospitals_wanted = num_hospitals(cfg, info.world_size)
    root = data_root(cfg, info, hospitals_wanted)
    records, report, class_names = load_records(root, cfg.data.classes, cfg.data.patient_regex or None)
    records = split_by_patient(records, cfg.data.split, cfg.train.seed, cfg.data.patient_regex or None)
    records, heldout_records = hold_out(cfg, records, info.is_main)
    method = resolve_partition(records, cfg.data.partition)
    if method != cfg.data.partition:
        if info.is_main:
            log.info(
                "data.partition = %s: %s (%s)",
                cfg.data.partition,
                method,
                "every image names its hospital"
                if method == "natural"
                else f"no hospital column: a stratified split into {hospitals_wanted} hospitals",
            )
        cfg.data.partition = method  # config.json and the checkpoints record what was done
    records = partition(records, hospitals_wanted, method, cfg.data.dirichlet_alpha, cfg.train.seed)
    hospitals = hospital_names(records)
    check_against_data(cfg, records, hospitals)
    trained = _trained_on(cfg, hospitals)
    if info.is_main:
        log.info(
            "data: %d images, classes %s\n%s", len(records), ", ".join(class_names), count_table(records, class_names)
        )
    mine_idx = (
        hosted_by(info.rank, info.world_size, len(hospitals))
        if cfg.train.mode == "federated"
        else list(range(info.rank, len(hospitals), info.world_size))
    )
    mine = [_cache_hospital(cfg, records, hospitals[i], i, info) for i in mine_idx]
    heldout = _cache_heldout(cfg, heldout_records, info) if info.is_main else []
    barrier()  # centralized ranks read the caches others built
    return DataPlan(
        class_names,
        hospitals,
        records,
        mine,
        [_folder(cfg, records, h, "train") for h in trained],
        scan_report=report,
        heldout=heldout,
        heldout_records=heldout_records,
    )


def hold_out(
    cfg: RunConfig, records: list[ImageRecord], announce: bool = False
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The federation's records and the held-out hospitals' test records (``data.heldout_hospitals``); the
    held-out hospitals' other images are not used.

    Raises:
        ConfigError: a held-out name that is no hospital of the data, or one without test images.
    """
    names = cfg.data.heldout_hospitals
    if not names:
        return records, []
    present = hospital_names(r for r in records if r.hospital)
    for name in names:
        if name not in present:
            have = ", ".join(present) if present else "none: the data names no hospitals"
            raise ConfigError(f"data.heldout_hospitals names {name!r}, which is not a hospital of the data ({have})")
    kept = [r for r in records if r.hospital not in names]
    held = [r for r in records if r.hospital in names and r.split == "test"]
    for name in names:
        count = sum(r.hospital == name for r in held)
        if not count:
            raise ConfigError(f"data.heldout_hospitals: hospital {name!r} has no test images to evaluate")
        if announce:
            log.info("held out: %s (%d test images; it never trains)", name, count)
    return kept, held


def _cache_heldout(cfg: RunConfig, records: list[ImageRecord], info: DistInfo) -> list[HospitalData]:
    """The held-out hospitals' test splits, cached by rank 0 (which evaluates them)."""
    out = []
    for name in cfg.data.heldout_hospitals:
        data = HospitalData(name, -1)
        chosen = [r for r in records if r.hospital == name]
        data.folders["test"] = build_split(
            chosen, cache_spec(cfg, "test"), cache_root(cfg), data.report, name=f"{name}-test", progress=True
        )
        out.append(data)
    return out


def check_against_data(cfg: RunConfig, records: list[ImageRecord], hospitals: list[str]) -> None:
    """Settings that name hospitals or need splits, checked against the data before any image is cached.

    Raises:
        ConfigError: no validation or test images at all; a hospital name in the
            fault settings that is not a hospital of this federation.
    """
    missing = [split for split in missing_splits(records) if split in ("val", "test")]
    if missing:
        names = {"val": "validation", "test": "test"}
        raise ConfigError(
            f"the data has no {' and no '.join(names[m] for m in missing)} images among its "
            f"{len(records)} usable ones (data.split = {cfg.data.split}, or the manifest's split "
            "column): give each split some patients"
        )
    t = cfg.train
    if t.clients_per_round > len(hospitals):
        raise ConfigError(
            f"train.clients_per_round = {t.clients_per_round} but the federation has "
            f"{len(hospitals)} hospitals; choose at most {len(hospitals)} (0 = all)"
        )
    named = [("train.faulty_hospitals", name) for name in t.faulty_hospitals]
    named += [("train.simulate_nan", name) for name in t.simulate_nan]
    named += [
        (f"train.{key}", getattr(t, key).split(":")[0])
        for key in ("simulate_crash", "simulate_hang")
        if getattr(t, key)
    ]
    for key, name in named:
        if name not in hospitals:
            raise ConfigError(
                f"{key} names {name!r}, which is not a hospital of this federation; choose from: {', '.join(hospitals)}"
            )


def _trained_on(cfg: RunConfig, hospitals: list[str]) -> list[str]:
    """Hospitals whose training data the pooled (centralized) model sees."""
    only = cfg.data.only_hospital
    if not only:
        return hospitals
    if cfg.train.mode != "centralized":
        raise ConfigError("data.only_hospital needs train.mode = centralized (it trains one hospital alone)")
    if only not in hospitals:
        raise ConfigError(
            f"data.only_hospital = {only!r} is not a hospital of this data; choose one of: {', '.join(hospitals)}"
        )
    return [only]


def cache_specs(cfg: RunConfig) -> dict[str, CacheSpec]:
    """The cache spec of every split, from the data settings (the same as ``python -m data.prepare``'s flags)."""
    d = cfg.data
    patch = PatchSpec(d.context_size, d.detail_size, d.context_fov, d.min_tissue, d.patch_centres)
    stain = "none" if d.stain_on_device else d.stain  # normalized per batch on the device instead
    return split_specs(
        patch,
        d.patches_per_image,
        d.eval_patches_per_image,
        stain,
        "" if d.stain_on_device else d.stain_reference,
        cfg.train.seed,
        d.site_shift,
    )


def cache_spec(cfg: RunConfig, split: str) -> CacheSpec:
    return cache_specs(cfg)[split]


def device_normalizer(cfg: RunConfig):
    """The stain normalizer applied per batch on the device when data.stain_on_device is set, else None."""
    return fitted_normalizer(cfg.data.stain, cfg.data.stain_reference) if cfg.data.stain_on_device else None


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_root() / "patches"


def _of(records: list[ImageRecord], hospital: str, split: str) -> list[ImageRecord]:
    return [r for r in records if r.hospital == hospital and r.split == split]


def _folder(cfg: RunConfig, records: list[ImageRecord], hospital: str, split: str) -> Path:
    return split_folder(_of(records, hospital, split), cache_spec(cfg, split), cache_root(cfg), f"{hospital}-{split}")


def _cache_hospital(
    cfg: RunConfig, records: list[ImageRecord], hospital: str, index: int, info: DistInfo
) -> HospitalData:
    data = HospitalData(hospital, index)
    data.folders = build_hospital(
        records, hospital, cache_specs(cfg), cache_root(cfg), data.report, progress=info.local_rank == 0
    )
    return data


def write_run_files(cfg: RunConfig, plan: DataPlan, out: Path) -> None:
    """``OUT/config.json``, ``splits.csv`` and (with ``data.site_shift``) ``site_profiles.json``."""
    out.mkdir(parents=True, exist_ok=True)
    save(cfg, out / "config.json")
    write_splits_csv(plan.records + plan.heldout_records, out / "splits.csv", plan.class_names)
    if cfg.data.site_shift > 0:
        lines = write_site_profiles(out / "site_profiles.json", plan.hospitals, cfg.train.seed, cfg.data.site_shift)
        log.info("site profiles (data.site_shift = %g):\n%s", cfg.data.site_shift, "\n".join(lines))


def hospital_folder(out: Path, hospital: str) -> Path:
    """``OUT/hospitals/<name>``: what a hospital keeps on its own disk (file paths included)."""
    return out / "hospitals" / hospital


def write_hospital_report(out: Path, hospital: HospitalData) -> None:
    """``OUT/hospitals/<name>/data_report.json``: the hospital's skipped files, by reason, with example paths."""
    write_json(hospital_folder(out, hospital.name) / "data_report.json", hospital.report.to_dict())


#: Columns of a hospital's ``predictions.csv``: the image (file name and path on the hospital's disk), its
#: patient, its true label and the final model's prediction (image level: patch probabilities averaged).
PREDICTION_COLUMNS = ("name", "path", "patient", "label", "prediction")


def write_predictions(out: Path, hospital: str, image: dict) -> Path:
    """``OUT/hospitals/<name>/predictions.csv`` from :func:`fedsim.evaluation.levels.levels`'s image level.

    The file stays with the hospital (rank 0 writes the held-out ones); the study reads it to pair two runs'
    answers on the same images (McNemar), as only the researcher who owns every simulated hospital can.
    """
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    predicted = np.asarray(image["probs"]).argmax(axis=1)
    for row, label, guess in zip(image["meta"], image["y"], predicted):
        writer.writerow([os.path.basename(row["path"]), row["path"], row["patient"], int(label), int(guess)])
    path = hospital_folder(out, hospital) / "predictions.csv"
    write_atomic(path, text.getvalue())
    return path


def write_data_report(out: Path, reports: list[dict], scan: SkipReport) -> None:
    """``OUT/data_report.json``: skipped files counted by reason, per hospital and in total.

    ``reports`` carry counts only (they crossed ranks); the paths stay in each
    hospital's own report. ``scan`` is what this rank skipped while reading
    the data, before any hospital's cache.
    """
    total: dict[str, int] = {}
    for counts in [scan.counts_only(), *(entry["report"] for entry in reports)]:
        for reason, count in counts["reasons"].items():
            total[reason] = total.get(reason, 0) + count
    write_json(
        out / "data_report.json",
        {"total_skipped": sum(total.values()), "by_reason": total, "scan": scan.to_dict(), "hospitals": reports},
    )
