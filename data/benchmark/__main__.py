"""``python -m data.benchmark --preset {demo,study,paper} --seed S --out DIR``: render a benchmark dataset.

Writes the image tree, ``manifest.csv``, ``benchmark.json`` and ``examples.png``
without training. Bad input prints one line (``error: ...``) and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from data.benchmark.dataset import Progress, check_destination, render_dataset
from data.benchmark.design import PRESETS, geometry, preset
from data.files import WriteError


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as a :class:`UsageError` instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m data.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--seed", type=int, default=0, help="data seed: the training and validation tiles (default 0)")
    p.add_argument("--test-seed", type=int, default=None, help="seed of the sites and test tiles (default 0: fixed)")
    p.add_argument("--out", required=True, help="destination folder (must not exist or be empty)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (0 = none; preset default)")
    p.add_argument("--confound", action="store_true", help="the darkest-staining site gets more Grade III")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: the CPUs, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def spec_from_args(args: argparse.Namespace):
    """The spec the arguments ask for.

    Raises:
        UsageError: For an unknown preset or a bad value.
    """
    changes = {"seed": args.seed, "confound": args.confound or PRESETS.get(args.preset, PRESETS["demo"]).confound}
    if args.test_seed is not None:
        changes["test_seed"] = args.test_seed
    if args.alpha is not None:
        changes["alpha"] = args.alpha
    try:
        return preset(args.preset, **changes)
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 2 bad input or destination, 1 storage failure)."""
    try:
        args = build_parser().parse_args(argv)
        spec = spec_from_args(args)
        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {args.workers})")
        out = Path(args.out).expanduser()
        check_destination(out)
    except (UsageError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = Progress(enabled=not args.quiet)
    settings = ", ".join(f"{k}={v}" for k, v in geometry(spec).items())
    progress.line(f"benchmark preset {spec.preset}, seed {spec.seed}, test seed {spec.test_seed}: {settings}")
    try:
        manifest = render_dataset(spec, out, progress, workers=args.workers)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    progress.line(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
