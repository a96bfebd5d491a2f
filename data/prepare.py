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
from data.patches import PatchSpec
from data.sites import MAX_SITE_SHIFT, write_site_profiles
from data.splits import count_table, hospital_names, partition, split_by_patient, write_splits_csv

log = logging.getLogger("data.prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build the patch-pair cache of a dataset.")
    p.add_argument("--data", required=True, help="CRC-HGD-style folder, folder with manifest.csv, or manifest CSV")
    p.add_argument("--out", required=True, help="cache folder (pass it to train.py as --set data.cache_dir=...)")
    p.add_argument("--hospitals", type=int, required=True, help="number of hospitals (ranks of the federated run)")
    p.add_argument("--partition", default="auto", choices=["auto", "natural", "iid", "dirichlet"],
                   help="auto (the default, as in training): natural when every image names its hospital, else iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (partition dirichlet)")
    p.add_argument("--seed", type=int, default=0, help="the run's train.seed: it fixes the split and the patch centres")
    p.add_argument("--split", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--classes", default="Grade I,Grade II,Grade III", help="comma-separated classes in label order")
    p.add_argument("--patient-regex", default="", help="regex on file stems giving patient ids")
    p.add_argument("--context-size", type=int, default=320)
    p.add_argument("--detail-size", type=int, default=224)
    p.add_argument("--context-fov", type=int, default=320)
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--patches-per-image", type=int, default=4)
    p.add_argument("--eval-patches-per-image", type=int, default=4)
    p.add_argument("--stain", default="macenko", choices=["macenko", "reinhard", "none"])
    p.add_argument("--stain-reference", default="", help="image to fit the normalizer to (default: the built-in reference of data/stain.py)")
    p.add_argument("--site-shift", type=float, default=0.0,
                   help="simulated lab differences per hospital (data.sites): 0 = off, 1 = a typical spread")
    args = p.parse_args(argv)
    if not 0 <= args.site_shift <= MAX_SITE_SHIFT:
        p.error(f"--site-shift must lie in [0, {MAX_SITE_SHIFT:g}], got {args.site_shift}")
    return args


def prepare(args: argparse.Namespace) -> dict:
    """Build every hospital's cache; returns the data report."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    regex = args.patient_regex or None
    records, report, class_names = load_records(args.data, classes, regex)
    records = split_by_patient(records, args.split, args.seed, regex)
    records = partition(records, args.hospitals, args.partition, args.alpha, args.seed)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, out) from None
    write_splits_csv(records, out / "splits.csv", class_names)
    print(count_table(records, class_names))
    if args.site_shift > 0:
        print(f"site profiles (--site-shift {args.site_shift:g}):")
        print("\n".join(write_site_profiles(out / "site_profiles.json", hospital_names(records), args.seed,
                                             args.site_shift)))
    patch = PatchSpec(args.context_size, args.detail_size, args.context_fov, args.min_tissue)
    specs = split_specs(patch, args.patches_per_image, args.eval_patches_per_image, args.stain,
                        args.stain_reference, args.seed, args.site_shift)
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


#: Bad input (missing files, bad values, a corrupt cache entry that cannot be rebuilt) and storage failures
#: (a full disk, a read-only cache): one line, exit code 2 (FEDSIM_DEBUG=1: the traceback too).
USER_ERRORS = (FileNotFoundError, ValueError, WriteError)


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
