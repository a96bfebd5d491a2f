"""One hospital's local work: epochs of Adam with MixUp and the FedProx term, and evaluation.

The training step is a plain PyTorch loop; the federation adds one fused op
per optimizer step (the proximal gradient on the flat gradient buffer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.augment import jitter_params, mixup, random_dihedral, to_float
from fedsim.flat import FlatModel
from fedsim.prox import add_proximal_grad_, proximal_value


@dataclass(frozen=True)
class StepSettings:
    """What a local epoch needs to know, resolved once per run."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    mu: float
    mixup_alpha: float
    augment: bool
    grad_accum: int
    normalizer: Any = None
    """A fitted stain normalizer applied to uint8 batches on the device, or None (normalized in the cache)."""


@dataclass
class EpochResult:
    """Figures of one local epoch."""

    loss: float
    samples: int
    steps: int
    finite: bool


def round_lr(lr: float, schedule: str, r: int, rounds: int) -> float:
    """The local learning rate of round ``r`` (0-based) of ``rounds``.

    ``constant``: ``lr`` every round. ``cosine``: ``lr * (1 + cos(pi * r / rounds)) / 2``, from ``lr`` in the
    first round down towards 0 (the last round trains at ``lr * (1 - cos(pi / rounds)) / 2``, never at 0).
    """
    if schedule == "constant" or rounds <= 1:
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * r / rounds))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, name: str = "adam") -> torch.optim.Optimizer:
    """Adam (L2 weight decay; the paper's), or plain SGD, with foreach kernels: no per-tensor Python loop."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


def autocast(settings: StepSettings):
    """bf16 autocast on the device when asked, else nothing."""
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def to_device(batch: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """uint8 batch onto the device (non-blocking from pinned memory), channels-last when asked."""
    batch = batch.to(settings.device, non_blocking=True)
    if settings.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def prepare_inputs(
    context: torch.Tensor, detail: torch.Tensor, settings: StepSettings, rng: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pairs -> normalized float pairs on the device; augmented (same transform per pair) when rng is given."""
    context, detail = to_device(context, settings), to_device(detail, settings)
    if settings.normalizer is not None:
        context, detail = settings.normalizer.normalize(context), settings.normalizer.normalize(detail)
    if rng is None or not settings.augment:
        return to_float(context), to_float(detail)
    context, detail = random_dihedral(context, detail, rng)  # on uint8: a quarter of the bytes
    gain, offset = jitter_params(context.shape[0], rng, context.device)
    return to_float(context, gain, offset), to_float(detail, gain, offset)


#: ``loss_fn(model, batch, settings, rng) -> (mean loss of the batch, samples in it)``: one batch's loss.
LossFn = Callable[[nn.Module, Any, StepSettings, torch.Generator], tuple[torch.Tensor, int]]


def train_epoch(
    model: nn.Module,
    flat: FlatModel,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    anchor: torch.Tensor | None,
    settings: StepSettings,
    rng: torch.Generator,
    grad_hook: Callable[[torch.Tensor], None] | None = None,
    desc: str = "",
    show: bool = False,
    loss_fn: LossFn | None = None,
    correction: torch.Tensor | None = None,
    dp: Any = None,
) -> EpochResult:
    """One pass over the loader; returns the mean (mixed) cross-entropy.

    Args:
        anchor: Global weights of the round (aligned with ``flat.global_params``) for the proximal term;
            None = no term.
        grad_hook: Called on the flat gradient before the step (centralized mode averages it across ranks).
        loss_fn: The loss of one batch; default: the dual-stream network's (context, detail, labels, index)
            batches with augmentation and MixUp.
        correction: Added to the global parameters' gradient at every step (SCAFFOLD's ``c - c_k``).
        dp: A :class:`fedsim.privacy.dpsgd.DPSGD` (the loader then yields Poisson batches, one per step, perhaps empty):
            clipped per-sample gradients plus noise instead of the batch gradient.
    """
    model.train()
    loss_fn = loss_fn or (_private_loss(dp) if dp is not None else dual_stream_loss)
    total_loss = torch.zeros((), device=settings.device)
    samples = steps = 0
    batches = tqdm(loader, desc=desc, leave=False, disable=None if show else True, dynamic_ncols=True)
    for micro, batch in enumerate(batches, start=1):
        loss, count = loss_fn(model, batch, settings, rng)
        if dp is None:
            (loss / settings.grad_accum).backward()
        total_loss += loss.detach() * count
        samples += count
        if micro % settings.grad_accum == 0 or micro == len(loader):
            if dp is not None:
                dp.privatize_()
            _optimizer_step(flat, optimizer, anchor, settings, grad_hook, correction)
            steps += 1
    mean_loss = float(total_loss) / max(samples, 1)  # one device sync per epoch, not per step
    return EpochResult(mean_loss, samples, steps, math.isfinite(mean_loss))


def _private_loss(dp) -> LossFn:
    """The dual-stream batch under DP-SGD: the clipped per-sample gradients are added to the flat gradient
    here (no MixUp: it mixes samples); returns the batch's mean loss, detached."""

    def loss_fn(model, batch, settings: StepSettings, rng: torch.Generator) -> tuple[torch.Tensor, int]:
        context, detail, labels, _ = batch
        count = labels.shape[0]
        if count == 0:  # a Poisson batch may be empty: the step is noise alone
            return torch.zeros((), device=settings.device), 0
        inputs = prepare_inputs(context, detail, settings, rng)
        total = dp.backward(inputs, labels.to(settings.device, non_blocking=True))
        return total / count, count

    return loss_fn


def dual_stream_loss(model: nn.Module, batch, settings: StepSettings, rng: torch.Generator) -> tuple[torch.Tensor, int]:
    """The dual-stream network's loss on a (context, detail, labels, index) batch of cached pairs."""
    context, detail, labels, _ = batch
    return _forward_loss(model, context, detail, labels, settings, rng), labels.shape[0]


def _forward_loss(
    model: nn.Module, context, detail, labels, settings: StepSettings, rng: torch.Generator
) -> torch.Tensor:
    context, detail = prepare_inputs(context, detail, settings, rng)
    labels = labels.to(settings.device, non_blocking=True)
    context, detail, y_a, y_b, lam = mixup(context, detail, labels, settings.mixup_alpha, rng)
    with autocast(settings):
        logits = model(context, detail).float()
    if lam == 1.0:
        return F.cross_entropy(logits, y_a)
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


def _optimizer_step(flat: FlatModel, optimizer, anchor, settings: StepSettings, grad_hook, correction=None) -> None:
    if grad_hook is not None:
        grad_hook(flat.param_grads)
    if anchor is not None:
        add_proximal_grad_(flat.global_param_grads, flat.global_params, anchor, settings.mu)
    if correction is not None:
        flat.global_param_grads.add_(correction)
    optimizer.step()
    flat.zero_grad()


def local_proximal(flat: FlatModel, anchor: torch.Tensor | None, mu: float) -> float:
    """The proximal term at the current weights (over the global model's parameters)."""
    return 0.0 if anchor is None else proximal_value(flat.global_params, anchor, mu)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, settings: StepSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities, labels and dataset indices of every patch pair in the loader."""
    model.eval()
    probs, labels, indices = [], [], []
    for context, detail, y, idx in loader:
        with autocast(settings):
            logits = model(*prepare_inputs(context, detail, settings))
        probs.append(logits.float().softmax(dim=1).cpu())
        labels.append(y)
        indices.append(idx)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()
