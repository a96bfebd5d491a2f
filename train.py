"""Federated training entry point: each torchrun rank hosts one or more hospitals.

    torchrun --nproc_per_node=3 train.py --config configs/demo.toml --out runs/demo

See README.md for every flag and output.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from fedsim.config import ConfigError, RunConfig, parse_assignment, resolve

log = logging.getLogger("fedsim.train")

# Named flags -> config keys. Each flag documents itself in --help.
FLAGS: list[tuple[str, str, type, str]] = [
    ("--data", "data.path", str, "CRC-HGD-style folder, folder with manifest.csv, or manifest CSV (default: embedded synthetic data)"),
    ("--out", "out", str, "run directory (default runs/latest)"),
    ("--rounds", "train.rounds", int, "communication rounds (paper: 10)"),
    ("--local-epochs", "train.local_epochs", int, "local epochs per round (paper: 3)"),
    ("--mu", "train.mu", float, "FedProx proximal weight; 0 = FedAvg (paper: 0.01)"),
    ("--seed", "train.seed", int, "seed of every random draw"),
    ("--mode", "train.mode", str, "federated | centralized"),
    ("--scales", "model.scales", str, "dual | detail | context"),
    ("--backbone", "model.backbone", str, "timm model name (default resnetrs50)"),
    ("--bn", "train.bn", str, "average | local (FedBN)"),
    ("--batch-size", "train.batch_size", int, "patch pairs per step and rank"),
    ("--lr", "train.lr", float, "Adam learning rate (paper: 3e-4)"),
    ("--device", "train.device", str, "auto | cuda | cpu"),
    ("--precision", "train.precision", str, "auto | bf16 | fp32"),
    ("--stain", "data.stain", str, "macenko | reinhard | none"),
    ("--partition", "data.partition", str, "auto (natural when every image names its hospital, else iid) | natural | iid | dirichlet"),
    ("--num-hospitals", "data.num_hospitals", int, "hospitals, at least the number of ranks (default: one per rank)"),
    ("--clients-per-round", "train.clients_per_round", int, "hospitals trained per round, drawn from (seed, round); 0 = all"),
    ("--server-optimizer", "train.server_optimizer", str, "sgd (FedAvg with --server-lr 1) | avgm | adam | yogi | adagrad"),
    ("--server-lr", "train.server_lr", float, "server learning rate (default 1.0: with sgd, plain FedAvg)"),
    ("--algorithm", "train.algorithm", str, "fedavg (FedProx with --mu > 0) | scaffold"),
    ("--pretrained", "model.pretrained", str, "local backbone weights (.safetensors or torch state dict)"),
    ("--dropout", "train.dropout", float, "probability a client drops out of a round"),
    ("--straggler", "train.straggler", float, "probability a client stops early in a round"),
    ("--workers", "data.num_workers", int, "DataLoader workers per rank"),
    ("--dp", "train.dp.level", str, "off | sample (DP-SGD in each hospital) | client (DP-FedAvg)"),
    ("--noise-multiplier", "train.dp.noise_multiplier", float, "DP noise multiplier sigma (default 1.0)"),
    ("--target-epsilon", "train.dp.target_epsilon", float, "derive sigma so the run spends this epsilon (0 = use sigma)"),
    ("--mixup-alpha", "train.mixup_alpha", float, "MixUp alpha; 0 disables it (needed under --dp sample)"),
]


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Build the run config from a preset, --set overrides and the named flags."""
    parser = argparse.ArgumentParser(description="Federated training of the dual-stream grading network.")
    parser.add_argument("--config", help="TOML preset (configs/paper.toml, configs/demo.toml)")
    for flag, key, kind, text in FLAGS:
        parser.add_argument(flag, dest=key, type=kind, help=text)
    parser.add_argument("--resume", action="store_true", help="expect to continue a run: warn if OUT has no checkpoint (a run on a directory with round checkpoints of the same config always continues after the last)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="sum the hospitals' contributions with pairwise masks that cancel in the all-reduce")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, e.g. --set data.context_fov=640 (repeatable)")
    args = parser.parse_args(argv)
    assignments = [parse_assignment(text) for text in args.set]
    assignments += [(key, getattr(args, key)) for _, key, _, _ in FLAGS if getattr(args, key) is not None]
    if args.resume:
        assignments.append(("train.resume", True))
    if args.compile:
        assignments.append(("train.compile", True))
    if args.secure_aggregation:
        assignments.append(("train.secure_aggregation", True))
    return resolve(args.config, assignments)


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
