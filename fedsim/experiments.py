"""Studies: the paper's comparisons as one command, every variant over several seeds.

    python -m fedsim.experiments --preset study --seeds 3     # the embedded benchmark, outcomes with tests
    python -m fedsim.experiments --preset demo --seeds 3
    python -m fedsim.experiments --preset paper --data /path/to/CRC-HGD --only federation,scales
    python -m fedsim.experiments --preset demo --only fedavg --seeds 1 -- --rounds 1 --device cpu

Every (variant, seed) is one ``train.py`` run under torchrun, in
``OUT/runs/<variant>-s<seed>-<hash>``. The hash covers the run's resolved
settings (those that differ from the config defaults) and its number of ranks,
so variants with identical settings share one run, and a run whose
``final.json`` exists is never started again: an interrupted study continues
where it stopped (train.py itself resumes a half-finished run from its last
round checkpoint). Arguments after ``--`` go to every train.py run.

When all runs have ended, ``OUT/results.csv`` (one row per variant and seed),
``OUT/results.md`` (means with 95% Student t intervals over seeds, paired
t-tests of the paper's comparisons, McNemar's test on the test images; on the
embedded benchmark each expected outcome with its test) and ``OUT/results.png``
(bar chart) are written; on the benchmark also ``cross_site.csv`` and ``cross_site.png``.

This module is the command line only: the plan, the runner, the statistics and
the results files live in the :mod:`fedsim.study` package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedsim.config import ConfigError, load_toml
from fedsim.errors import UserError
from fedsim.study.plan import (
    PRESET_DEFAULTS,
    PRESETS,
    STUDY_FLAGS,
    Plan,
    StudyError,
    build_plan,
    describe,
    preset_hospitals,
    select,
    variants,
)
from fedsim.study.results import write_results
from fedsim.study.runner import run_all

log = logging.getLogger("fedsim.experiments")


def parse_cli(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The study's own options, and the train.py arguments after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m fedsim.experiments",
        description="Run the paper's comparisons over seeds and summarize them.",
        epilog="Arguments after -- are passed to every train.py run.",
    )
    parser.add_argument(
        "--preset", default="demo", help="demo, study (the embedded benchmark), paper, or a TOML preset (default demo)"
    )
    parser.add_argument("--data", help="dataset for train.py --data (default: embedded synthetic data)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 for every variant (default 3)")
    parser.add_argument("--out", help="study folder (default runs/study-<preset name>)")
    parser.add_argument("--only", help="comma-separated variants or groups (federation, scales, mu, stain)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is done; run nothing")
    parser.add_argument(
        "--nproc", type=int, help="ranks of federated runs (default 3; 1 on the benchmark, which hosts all 3 there)"
    )
    parser.add_argument("--jobs", type=int, help="runs at a time (default 1; 2 on the benchmark presets)")
    parser.add_argument("--hospitals", help="hospital names for the local-only variants (default: the preset's)")
    return parser.parse_args(argv), extra


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    """Check the options and build the plan.

    Raises:
        StudyError: On a missing, unreadable, non-UTF-8 or malformed preset, a missing data path,
            or counts below one.
    """
    preset = Path(PRESETS.get(args.preset, args.preset)).resolve()
    if not preset.is_file():
        raise StudyError(f"--preset {args.preset}: no such preset or file (presets: {', '.join(PRESETS)})")
    try:  # every run reads it: a preset that is not UTF-8 or not TOML stops the study before any plan
        tree = load_toml(preset)
    except ConfigError as err:
        raise StudyError(f"--preset {args.preset}: {err}") from None
    defaults = PRESET_DEFAULTS.get(args.preset, {})
    args.nproc = args.nproc if args.nproc is not None else defaults.get("nproc", 3)
    args.jobs = args.jobs if args.jobs is not None else defaults.get("jobs", 1)
    if args.seeds < 1 or args.nproc < 1 or args.jobs < 1:
        raise StudyError("--seeds, --nproc and --jobs must be at least 1")
    if args.data and not Path(args.data).exists():
        raise StudyError(f"--data {args.data}: no such file or folder")
    overridden = sorted(STUDY_FLAGS & set(extra))
    if overridden:
        log.warning("the study sets %s itself; those train.py arguments are overridden", ", ".join(overridden))
    hospitals = (
        [h.strip() for h in args.hospitals.split(",") if h.strip()]
        if args.hospitals
        else preset_hospitals(tree if not args.data else {}, args.nproc)
    )
    chosen = select(variants(hospitals), args.only)
    out = Path(args.out or Path("runs") / f"study-{preset.stem}").resolve()
    data = str(Path(args.data).resolve()) if args.data else None
    return build_plan(chosen, args.seeds, preset, data, extra, args.nproc, out, len(hospitals))


def main(argv: Sequence[str] | None = None) -> int:
    """Plan, run what is not done, write the results; exit code 0, 1 (a run failed) or 2 (bad option)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    args, extra = parse_cli(argv)
    try:
        plan = make_plan(args, extra)
    except UserError as err:  # StudyError above all: a bad option, one line
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(plan))
        return 0
    failed = run_all(plan, jobs=args.jobs)
    write_results(plan, failed)
    if failed:
        log.error("%d run(s) failed: %s (see their log.txt)", len(failed), ", ".join(failed))
    log.info("results: %s", ", ".join(str(plan.out / name) for name in ("results.csv", "results.md", "results.png")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
