"""Grad-CAM panels of a hospital's own patch pairs, for a look at what the model attends to.

Everything runs on the local dataset and is written to local files (and the
local TensorBoard writer, if given): no image or map leaves the process, which
keeps the federation's privacy boundary intact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.augment import to_float
from fedsim.plots import compose_panel, save_png
from models.gradcam import GradCAM, eval_mode, overlay

#: Patch pairs explained per forward/backward pass: bounds memory with large backbones.
_BATCH = 8


@dataclass(frozen=True)
class Example:
    """One patch pair chosen for a panel."""

    index: int
    label: int
    name: str


def slug(text: str) -> str:
    """``"Grade II"`` -> ``"grade-ii"``: a file-name-safe lowercase form."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pick_examples(dataset, class_names: Sequence[str], per_grade: int) -> list[Example]:
    """The first ``per_grade`` pairs of each true grade in dataset order, named ``<grade-slug>_<n>``.

    Returned grouped by grade, then in dataset order.
    """
    taken = {k: 0 for k in range(len(class_names))}
    chosen = []
    for index, meta in enumerate(dataset.meta):
        label = int(meta["label"])
        if taken.get(label, per_grade) >= per_grade:
            continue
        taken[label] += 1
        stem = slug(class_names[label]) or f"class{label}"
        chosen.append(Example(index, label, f"{stem}_{taken[label]}"))
        if min(taken.values(), default=per_grade) >= per_grade:
            break  # every grade is full: no need to scan a large split to the end
    return sorted(chosen, key=lambda e: (e.label, e.index))


def _explain(model: nn.Module, dataset, indices: list[int], device: torch.device | str, normalizer=None):
    """uint8 HWC context/detail images (as the model saw them), class probabilities and per-stream CAMs of a batch."""
    context, detail, _, _ = dataset.__getitems__(indices)
    context, detail = context.to(device), detail.to(device)
    if normalizer is not None:  # the cache holds raw pixels (data.stain_on_device)
        context, detail = normalizer.normalize(context), normalizer.normalize(detail)
    streams = [s for s in ("context", "detail") if getattr(model, s, None) is not None]
    c = to_float(context) if "context" in streams else None
    d = to_float(detail) if "detail" in streams else None
    with eval_mode(model), torch.no_grad():
        probs = model(c, d).float().softmax(dim=1)
    with GradCAM(model) as gradcam:
        # The CAM explains the class shown in the caption, computed above.
        cams = gradcam.cams(c, d, target=probs.argmax(dim=1))
    images = {"context": context.cpu(), "detail": detail.cpu()}
    hwc = {s: images[s].permute(0, 2, 3, 1).contiguous().numpy() for s in streams}
    return hwc, probs.cpu().numpy(), {s: m.cpu().numpy() for s, m in cams.items()}


def _caption(class_names: Sequence[str], label: int, probs: np.ndarray) -> str:
    pred = int(probs.argmax())
    return f"true: {class_names[label]}  pred: {class_names[pred]}  p={probs[pred]:.2f}"


def write_overlays(
    model: nn.Module,
    dataset,
    out_dir: Path,
    class_names: Sequence[str],
    device: torch.device | str,
    per_grade: int = 2,
    writer=None,
    step: int = 0,
    normalizer=None,
) -> list[Path]:
    """Save Grad-CAM panels (context overlay | detail overlay, caption) for a few pairs per grade.

    Args:
        model: The network, already on ``device``; its train/eval state is restored afterwards.
        dataset: A ``CachedPairs`` of this hospital's patches.
        out_dir: Folder for ``<grade-slug>_<n>.png`` (n from 1, first pairs in dataset order).
        class_names: Grade names, indexed by label.
        device: Where the forward and backward passes run.
        per_grade: Pairs per true grade (fewer if the dataset has fewer).
        writer: Optional TensorBoard ``SummaryWriter``; panels go to ``xai/<hospital>/<name>``.
        step: TensorBoard global step.
        normalizer: Stain normalizer applied to the uint8 pairs on ``device`` first, as in training
            with ``data.stain_on_device``; None when the cache is already normalized.

    Returns:
        The written PNG paths, in grade order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = pick_examples(dataset, class_names, per_grade)
    written = []
    for start in range(0, len(examples), _BATCH):
        chunk = examples[start : start + _BATCH]
        images, probs, cams = _explain(model, dataset, [e.index for e in chunk], device, normalizer)
        for row, example in enumerate(chunk):
            tiles = [(s, overlay(images[s][row], cams[s][row])) for s in cams]
            panel = compose_panel(tiles, _caption(class_names, example.label, probs[row]))
            path = out_dir / f"{example.name}.png"
            save_png(panel, path)
            written.append(path)
            if writer is not None:
                hospital = dataset.meta[example.index].get("hospital", "local")
                writer.add_image(f"xai/{hospital}/{example.name}", panel.transpose(2, 0, 1), step)
    return written


def write_hospital_overlays(model: nn.Module, dataset, out: Path, hospital: str, class_names, device, **options):
    """:func:`write_overlays` for one hospital of a run in ``out``: PNGs under ``xai/<hospital>`` and the panels
    in the hospital's own events file ``tb/xai-<hospital>`` (images stay where they were made). ``options``
    go to :func:`write_overlays` (``per_grade``, ``step``, ``normalizer``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(Path(out) / "tb" / f"xai-{hospital}")) as writer:
        return write_overlays(
            model, dataset, Path(out) / "xai" / hospital, class_names, device, writer=writer, **options
        )
