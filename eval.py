"""Evaluate a checkpoint on a split of the data (default: the run's own test split).

    python eval.py --checkpoint runs/demo/checkpoint.pt [--data PATH] [--split test] [--out DIR]

A checkpoint that is missing, corrupt, lacks its config or class names, or whose weights do not fit
the model its config describes is refused with one line (exit code 2) before any data is read; any
other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys

from fedsim.config import setting_of
from fedsim.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    device = setting_of("train.device")  # the same choices and default as training's --device
    parser = argparse.ArgumentParser(description="Evaluate a fedsim checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by train.py")
    parser.add_argument("--data", help="data to evaluate on (default: the data the run was trained on)")
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="patient-level split to evaluate (default test; 'all' for external data)",
    )
    parser.add_argument(
        "--out", help="folder for eval.json and confusion_matrix.png (default: the checkpoint's folder)"
    )
    parser.add_argument("--device", default=device.default, choices=list(device.choices))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of patients for the CIs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, check every input, evaluate; returns the exit code (2: a bad input, one line on stderr)."""
    args = parse_args(argv)
    from data.files import WriteError
    from fedsim.evaluation.offline import evaluate_checkpoint
    from fedsim.logger import print_error

    try:
        evaluate_checkpoint(args)
    except (UserError, FileNotFoundError, WriteError) as err:  # FileNotFoundError: a data path that vanished
        print_error("eval.py: error", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
