"""Federated training entry point: each torchrun rank hosts one or more hospitals.

    torchrun --nproc_per_node=3 train.py --config configs/demo.toml --out runs/demo

See README.md for every flag and output. Parsing and checking the settings loads no torch:
``--help`` and a bad setting answer at once; training imports come after them.
"""

from __future__ import annotations

import argparse
import os
import sys

from fedsim.config import SETTINGS, ConfigError, RunConfig, parse_assignment, resolve
from fedsim.settings import add_flags, given


def parser() -> argparse.ArgumentParser:
    """The command line: ``--config``, ``--set``, and the named flag of every setting that declares one."""
    p = argparse.ArgumentParser(description="Federated training of the dual-stream grading network.")
    p.add_argument("--config", help="TOML preset (configs/paper.toml, configs/demo.toml)")
    add_flags(p, SETTINGS)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set data.context_fov=640 (repeatable)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Build the run config from a preset, --set overrides and the named flags (which win)."""
    args = parser().parse_args(argv)
    assignments = [parse_assignment(text) for text in args.set]
    return resolve(args.config, assignments + given(args, SETTINGS))


def main(argv: list[str] | None = None) -> int:
    """Parse, check, train; returns the exit code."""
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        # Every rank parses the same command line: the line is printed once, by rank 0.
        from fedsim.logger import report_error

        report_error("train.py: error", err, os.environ.get("RANK", "0"))
        return 2
    from fedsim.run import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
