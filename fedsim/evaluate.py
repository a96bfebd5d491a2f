"""Offline evaluation of a checkpoint: image- and patch-level metrics with patient-bootstrap CIs."""
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
from fedsim import checkpoint, metrics
from fedsim.client import StepSettings, predict
from fedsim.config import from_dict
from fedsim.datasetup import cache_root, cache_spec, device_normalizer, synthetic_root, synthetic_spec
from fedsim.dist import choose_backend
from fedsim.logger import setup_logging, write_json
from models import build_model

log = logging.getLogger("fedsim.eval")


class EvalError(RuntimeError):
    """The evaluation cannot run (bad checkpoint, empty split)."""


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by eval.py's arguments; returns the eval.json content."""
    setup_logging("eval")
    try:
        state = checkpoint.load(args.checkpoint)
    except checkpoint.CheckpointError as err:
        raise EvalError(str(err)) from None
    cfg = from_dict(state["config"])
    class_names = list(state["class_names"])
    _, device, _ = choose_backend(args.device, 1)
    model = build_model(cfg.model.backbone, cfg.model.scales, len(class_names), cfg.model.hidden, cfg.model.dropout)
    model.load_state_dict(state["model"])
    model.to(device)
    dataset = _dataset(cfg, args, class_names, len(state["hospitals"]))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_batch)
    probs, labels, idx = predict(model, loader, eval_settings(cfg, device))
    result = summaries(dataset, probs, labels, idx, class_names, args.bootstrap, cfg.train.seed)
    result.update(checkpoint=str(args.checkpoint), split=args.split, round=int(state["round"]) + 1)
    if cfg.train.bn == "local":
        result["batchnorm_of"] = _fedbn_caveat(state)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    metrics.save_confusion_matrix_png(np.asarray(result["image"]["confusion_matrix"]), class_names,
                                      out / "confusion_matrix.png", title=f"{args.split} split, image level")
    print(metrics.format_report(result["image"], title=f"Image level ({args.split} split)"))
    print(metrics.format_report(result["patch"], title=f"Patch level ({args.split} split)"))
    print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return result


def _fedbn_caveat(state: dict[str, Any]) -> str:
    """Under FedBN the saved BatchNorm tensors are rank 0's hospital's own: say so, and whose."""
    hospital = (state.get("hospitals") or ["?"])[0]
    log.warning("FedBN checkpoint: its BatchNorm tensors are hospital %s's, applied here to every image "
                "(final.json tested each hospital with its own)", hospital)
    return hospital


def eval_settings(cfg, device: torch.device) -> StepSettings:
    """Inference as in training: bf16 and channels-last on CUDA, the run's on-device stain normalization if any."""
    cuda = device.type == "cuda"
    return StepSettings(device, torch.bfloat16 if cuda else None, cuda, 0.0, 0.0, False, 1,
                        normalizer=device_normalizer(cfg))


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
    spec = synthetic_spec(cfg, hospitals)
    return generate(synthetic_root(cfg, spec), spec, progress=False).parent


def levels(dataset: CachedPairs, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> dict[str, dict[str, Any]]:
    """Labels, probabilities and metadata at patch level and at image level (patch probabilities averaged)."""
    meta = [dataset.meta[i] for i in idx]
    patch = {"y": np.asarray(labels), "probs": probs, "meta": meta}
    image_probs, order = metrics.aggregate_image_probs(probs, [m["image"] for m in meta])
    first = {m["image"]: m for m in reversed(meta)}
    rows = [first[i] for i in order]
    image = {"y": np.asarray([r["label"] for r in rows]), "probs": image_probs, "meta": rows}
    return {"image": image, "patch": patch}


def summaries(dataset: CachedPairs, probs, labels, idx, class_names, n_boot: int = 1000, seed: int = 0,
              counts: bool = False) -> dict[str, Any]:
    """Image-level (patch probabilities averaged) and patch-level metric summaries of predictions.

    With ``counts`` each level also carries :func:`metrics.count_summary`
    figures, from which summaries pooled over hospitals are computed.
    """
    out: dict[str, Any] = {}
    for level, data in levels(dataset, probs, labels, idx).items():
        meta = data["meta"]
        by = lambda key: [m[key] for m in meta]  # noqa: E731
        out[level] = metrics.summarize(data["y"], data["probs"], list(class_names), magnifications=by("magnification"),
                                       hospitals=by("hospital"), patients=by("patient"), n_boot=n_boot, seed=seed)
        if counts:
            out[level]["counts"] = metrics.count_summary(
                data["y"], np.argmax(data["probs"], axis=1), len(class_names), magnifications=by("magnification"),
                patients=by("patient"), n_boot=n_boot, seed=seed)
    out["image"]["n_images"] = out["n_images"] = out["image"]["n"]
    out["patch"]["n_patches"] = out["n_patches"] = out["patch"]["n"]
    return out
