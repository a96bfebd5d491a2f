"""eval.py's offline evaluation of a saved checkpoint: image- and patch-level metrics with patient-bootstrap CIs.

:func:`evaluate_checkpoint` checks every input (:func:`load_checked`, :func:`fitted_model`: bad input is an
:class:`EvalError` of one line), rebuilds the checkpoint's model and the split of its data, predicts as training
does (:func:`eval_settings`), and writes eval.json (the keys of :mod:`fedsim.evaluation.schema`), the image-level
confusion matrix PNG and the text report of :mod:`fedsim.evaluation.report`. The torch part of the package.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.cache import CachedPairs, build_split, collate_batch
from data.datasets import SkipReport, load_records
from data.splits import split_by_patient
from data.synthetic import generate
from fedsim import checkpoint, plots
from fedsim.client import StepSettings, predict
from fedsim.config import ConfigError, from_dict
from fedsim.datasetup import cache_root, cache_spec, synthetic_root, synthetic_spec
from fedsim.dist import choose_backend
from fedsim.errors import UserError
from fedsim.evaluation.levels import summaries
from fedsim.evaluation.report import format_report
from fedsim.evaluation.schema import headline
from fedsim.logger import setup_logging, write_json
from models import build_model, check_backbone, state_mismatch

__all__ = ["EvalError", "eval_settings", "evaluate_checkpoint", "fitted_model", "load_checked"]

log = logging.getLogger("fedsim.eval")


class EvalError(UserError, RuntimeError):
    """The evaluation cannot run (bad checkpoint, empty split): bad input, one line."""


def _one_line(text: str, limit: int = 240) -> str:
    """The first line of an error text, cut to ``limit`` characters (torch's load errors run to paragraphs)."""
    line = text.strip().splitlines()[0].rstrip() if text.strip() else text
    if len(line) > limit:
        line = line[:limit].rstrip() + "..."
    if line.count("(") > line.count(")"):
        line += ")"
    return line


def load_checked(path: str | Path) -> tuple[dict[str, Any], Any, list[str]]:
    """A checkpoint, its config and class names, checked before any work.

    Raises:
        EvalError: one line: missing or corrupt file, no ``config`` or ``class_names``, a config that
            does not resolve, weights that do not fit the model its config describes.
    """
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise EvalError(_one_line(str(err))) from None
    lacking = [key for key in ("config", "class_names") if key not in state]
    if lacking:
        raise EvalError(f"checkpoint {path} lacks {' and '.join(lacking)}: not a checkpoint written by train.py")
    if not isinstance(state["config"], dict):
        raise EvalError(f"checkpoint {path}: its config is not a table of settings")
    names = state["class_names"]
    if not isinstance(names, (list, tuple)) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise EvalError(f"checkpoint {path}: class_names must be a list of at least two names, got {names!r}")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise EvalError(f"checkpoint {path}: its model entry is not a state dict of tensors")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as err:
        raise EvalError(f"checkpoint {path}: its config is not valid here: {err}") from None
    try:
        check_backbone(cfg.model.backbone)
    except UserError as err:
        raise EvalError(f"checkpoint {path}: {err}") from None
    return state, cfg, list(names)


def fitted_model(state: dict[str, Any], cfg, class_names: list[str], path: str | Path) -> torch.nn.Module:
    """The network the checkpoint's config describes, with the checkpoint's weights.

    Raises:
        EvalError: the weights do not fit (another backbone, scales, head width or class count), one line
            with the first missing and unexpected keys and shape mismatches.
    """
    with torch.device("meta"):  # shapes only: a mismatch is found without allocating the model
        probe = build_model(cfg.model.backbone, cfg.model.scales, len(class_names), cfg.model.hidden, norm=cfg.norm)
    problem = state_mismatch(probe.state_dict(), state["model"])
    if problem:
        raise EvalError(
            f"checkpoint {path} does not fit the {cfg.model.scales}-stream {cfg.model.backbone} model "
            f"of its config ({len(class_names)} classes, hidden {cfg.model.hidden}): {problem}"
        )
    model = build_model(
        cfg.model.backbone, cfg.model.scales, len(class_names), cfg.model.hidden, cfg.model.dropout, norm=cfg.norm
    )
    model.load_state_dict(state["model"])
    return model


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by eval.py's arguments; returns the eval.json content.

    Every input is checked before any work: the checkpoint (exists, loads, has a config and class
    names, its weights fit the model of its config), ``--data`` (exists), ``--batch-size`` and
    ``--bootstrap``; each problem is an :class:`EvalError` of one line.
    """
    setup_logging("eval")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size} must be at least 1")
    if args.bootstrap < 0:
        raise EvalError(f"--bootstrap {args.bootstrap} must be 0 (no intervals) or more")
    if args.data and not Path(args.data).exists():
        raise EvalError(f"--data {args.data}: data path does not exist")
    state, cfg, class_names = load_checked(args.checkpoint)
    if not args.data and cfg.data.path and not Path(cfg.data.path).exists():
        raise EvalError(
            f"the run's data path {cfg.data.path} (data.path of the checkpoint's config) does not exist; give --data"
        )
    if not args.data and not cfg.data.path and not isinstance(state.get("hospitals"), (list, tuple)):
        raise EvalError(
            f"checkpoint {args.checkpoint} lacks hospitals, needed to regenerate its synthetic data; give --data"
        )
    _, device, _ = choose_backend(args.device, 1)
    model = fitted_model(state, cfg, class_names, args.checkpoint)
    model.to(device)
    dataset = _dataset(cfg, args, class_names, len(state.get("hospitals") or ()))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_batch)
    probs, labels, idx = predict(model, loader, eval_settings(cfg, device))
    result = headline(summaries(dataset, probs, labels, idx, class_names, args.bootstrap, cfg.train.seed))
    result.update(checkpoint=str(args.checkpoint), split=args.split, round=int(state["round"]) + 1)
    if cfg.train.bn == "local":
        result["batchnorm_of"] = _fedbn_caveat(state)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    plots.save_confusion_matrix_png(
        np.asarray(result["image"]["confusion_matrix"]),
        class_names,
        out / "confusion_matrix.png",
        title=f"{args.split} split, image level",
    )
    print(format_report(result["image"], title=f"Image level ({args.split} split)"))
    print(format_report(result["patch"], title=f"Patch level ({args.split} split)"))
    print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return result


def _fedbn_caveat(state: dict[str, Any]) -> str:
    """Under FedBN the saved BatchNorm tensors are rank 0's hospital's own: say so, and whose."""
    hospital = (state.get("hospitals") or ["?"])[0]
    log.warning(
        "FedBN checkpoint: its BatchNorm tensors are hospital %s's, applied here to every image "
        "(final.json tested each hospital with its own)",
        hospital,
    )
    return hospital


def eval_settings(cfg, device: torch.device) -> StepSettings:
    """Inference as in training (:func:`fedsim.assembly.step_settings`: the run's precision, channels-last on
    CUDA, its on-device stain normalization if any)."""
    from fedsim.assembly import step_settings

    return step_settings(cfg, device)


def _dataset(cfg, args: argparse.Namespace, class_names: list[str], hospitals: int) -> CachedPairs:
    root = Path(args.data) if args.data else _data_root(cfg, hospitals)
    records, report, names = load_records(root, cfg.data.classes, cfg.data.patient_regex or None)
    if list(names) != class_names:
        raise EvalError(f"the data's classes {list(names)} differ from the checkpoint's {class_names}")
    if args.split != "all":
        records = split_by_patient(records, cfg.data.split, cfg.train.seed, cfg.data.patient_regex or None)
        records = [r for r in records if r.split == args.split]
    if not records:
        raise EvalError(f"no images in the {args.split} split of {root}")
    folder = build_split(records, cache_spec(cfg, "test"), cache_root(cfg), SkipReport(), name=f"eval-{args.split}")
    return CachedPairs([folder])


def _data_root(cfg, hospitals: int) -> Path:
    """The run's data; the embedded dataset is regenerated (identically) if its cache was cleared."""
    if cfg.data.path:
        return Path(cfg.data.path)
    if cfg.data.source == "benchmark":
        from fedsim.sources import benchmark_root, benchmark_spec, render_benchmark

        spec = benchmark_spec(cfg)
        return render_benchmark(spec, benchmark_root(cfg, spec))
    spec = synthetic_spec(cfg, hospitals)
    return generate(synthetic_root(cfg, spec), spec, progress=False).parent
