"""Decode, mask, stain-normalize and cut a dataset into the patch-pair cache ahead of training.

    python -m data.prepare --data /path/to/CRC-HGD --out /scratch/fedsim-cache --hospitals 3 --partition iid

Training with the same data settings and ``--set data.cache_dir=CACHE`` then
reads the cache instead of decoding images (``train.py`` also builds it on
first use; this command is for preparing it once, e.g. on a login node).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from data.cache import build_hospital, split_specs
from data.datasets import SkipReport, load_records
from data.files import WriteError, storage_error, write_atomic
from data.limits import MAX_SITE_SHIFT
from data.patches import PatchSpec
from data.sites import write_site_profiles
from data.splits import count_table, hospital_names, partition, split_by_patient, write_splits_csv
from fedsim.config import SETTINGS, RunConfig, from_dict, set_dotted
from fedsim.errors import UserError
from fedsim.settings import add_flags, given

log = logging.getLogger("data.prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The data source, the cache folder and the hospitals, then every data setting the cache depends on.

    Those settings are the config's own (declared with ``prepare=`` in the tables of fedsim/config/), with the
    config's defaults: a cache prepared with the defaults is the one training with the defaults looks for.
    """
    p = argparse.ArgumentParser(description="Build the patch-pair cache of a dataset.")
    p.add_argument("--data", required=True, help="CRC-HGD-style folder, folder with manifest.csv, or manifest CSV")
    p.add_argument("--out", required=True, help="cache folder (pass it to train.py as --set data.cache_dir=...)")
    p.add_argument("--hospitals", type=int, required=True, help="number of hospitals (ranks of the federated run)")
    add_flags(p, SETTINGS, which="prepare")
    args = p.parse_args(argv)
    shift = getattr(args, "data.site_shift")
    if shift is not None and not 0 <= shift <= MAX_SITE_SHIFT:
        p.error(f"--site-shift must lie in [0, {MAX_SITE_SHIFT:g}], got {shift}")
    return args


def settings(args: argparse.Namespace) -> RunConfig:
    """The run config these arguments describe, checked as train.py checks it (ConfigError naming the field)."""
    tree: dict = {}
    for key, value in [("data.path", args.data), ("data.num_hospitals", args.hospitals), *given(args, SETTINGS)]:
        set_dotted(tree, key, value)
    return from_dict(tree)


def prepare(args: argparse.Namespace) -> dict:
    """Build every hospital's cache; returns the data report."""
    cfg = settings(args)
    d, seed = cfg.data, cfg.train.seed
    regex = d.patient_regex or None
    records, report, class_names = load_records(d.path, d.classes, regex)
    records = split_by_patient(records, d.split, seed, regex)
    records = partition(records, d.num_hospitals, d.partition, d.dirichlet_alpha, seed)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, out) from None
    write_splits_csv(records, out / "splits.csv", class_names)
    print(count_table(records, class_names))
    if d.site_shift > 0:
        print(f"site profiles (--site-shift {d.site_shift:g}):")
        print("\n".join(write_site_profiles(out / "site_profiles.json", hospital_names(records), seed, d.site_shift)))
    patch = PatchSpec(d.context_size, d.detail_size, d.context_fov, d.min_tissue, d.patch_centres)
    specs = split_specs(
        patch, d.patches_per_image, d.eval_patches_per_image, d.stain, d.stain_reference, seed, d.site_shift
    )
    for hospital in hospital_names(records):
        hospital_report = SkipReport()
        folders = build_hospital(records, hospital, specs, out, hospital_report)
        report.merge(hospital_report)
        print(f"{hospital}: " + ", ".join(f"{split} -> {folder.name}" for split, folder in folders.items()))
    result = report.to_dict()
    write_atomic(out / "data_report.json", json.dumps(result, indent=2) + "\n")
    for line in report.summary_lines():
        print(line)
    return result


#: Bad input (a UserError: bad settings, a bad manifest, a corrupt cache entry that cannot be rebuilt; a data path
#: that does not exist) and storage failures (a full disk, a read-only cache): one line, exit code 2
#: (FEDSIM_DEBUG=1: the traceback too). Anything else is a bug and shows its traceback.
USER_ERRORS = (UserError, FileNotFoundError, WriteError)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        prepare(args)
    except USER_ERRORS as err:
        if os.environ.get("FEDSIM_DEBUG"):
            traceback.print_exc()
        print(f"data.prepare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
