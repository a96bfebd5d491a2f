"""Grad-CAM (Selvaraju et al. 2017) for the streams of a DualStreamNet, with plain torch hooks.

For each stream the map is computed on the backbone's last spatial feature map
``A`` (C, h, w): the channel weights are the spatially averaged gradients of the
target logit with respect to ``A``, the map is ``ReLU(sum_k w_k A_k)``, upsampled
bilinearly to the stream's input size and divided by its maximum, per image.

Target layer
    timm backbones built with ``num_classes=0, global_pool="avg"`` pool through a
    ``global_pool`` module (``head.global_pool`` on ConvNeXt-like models). A
    forward *pre*-hook on that module receives exactly what ``forward_features``
    returned, whatever the last block is called (``layer4`` in ResNets,
    ``bn2`` in EfficientNets, ...) and including any final norm or activation
    that ``feature_info`` would miss. A backbone without such a module falls
    back to one probing forward pass that records every submodule's output and
    hooks the last one that is 4-D (NCHW) with more than one spatial position
    (which skips the pooling itself). Token models (ViT), whose last spatial
    output is a (B, N, C) sequence, raise ValueError.

Gradients are taken with ``torch.autograd.grad`` on the captured activations,
never ``.backward()``, so no parameter's ``.grad`` is touched (a stray gradient
would leak into the next optimizer step of a training client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

STREAM_NAMES = ("context", "detail")
_EPS = 1e-12


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _pool_module(backbone: nn.Module) -> nn.Module | None:
    """The backbone's global pooling module, if it has one where timm puts it."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, nn.Module):
            return pool
    return None


def _reads_nhwc(pool: nn.Module) -> bool:
    """True for timm's fast pools built with ``input_fmt="NHWC"`` (they reduce dims 1 and 2)."""
    return any(tuple(getattr(m, "dim", ()) or ()) == (1, 2) for m in pool.modules())


def _last_spatial_module(backbone: nn.Module, run: Callable[[], object]) -> nn.Module:
    """Fallback target: the last submodule to output a 4-D map with h * w > 1, found by one pass.

    Token sequences (B, N, C) count as spatial outputs too, so that a ViT, whose
    only 4-D map is its patch embedding, is refused instead of explained by it.
    """
    seen: list[tuple[nn.Module, bool]] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
            return
        if output.dim() == 3 or output.shape[-2] * output.shape[-1] > 1:  # 1x1: already pooled
            seen.append((module, output.dim() == 4))

    handles = [m.register_forward_hook(record) for m in backbone.modules() if m is not backbone]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    if not seen or not seen[-1][1]:
        raise ValueError(f"{type(backbone).__name__} ends in no 4-D feature map: Grad-CAM needs a CNN backbone")
    return seen[-1][0]


class _Tap:
    """Holds the hook on one backbone and the feature map it captured in the last forward pass."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.value: torch.Tensor | None = None
        self.nhwc = False
        self.handle = None
        pool = _pool_module(backbone)
        if pool is not None:
            self.nhwc = _reads_nhwc(pool)
            self.handle = pool.register_forward_pre_hook(self._on_input)

    def _on_input(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = output

    def ensure_hooked(self, run: Callable[[], object]) -> None:
        """Hook the fallback target (probing once) if there was no pooling module to hook."""
        if self.handle is None:
            self.handle = _last_spatial_module(self.backbone, run).register_forward_hook(self._on_output)

    def take(self) -> torch.Tensor:
        """The captured map, released so that the tap does not keep the graph alive."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"the Grad-CAM hook on {type(self.backbone).__name__} did not fire")
        return value

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.value = None


def _graph_input(x: torch.Tensor | None) -> torch.Tensor | None:
    """A copy that records a graph even under inference mode or with a frozen backbone."""
    if x is None:
        return None
    # requires_grad on the input guarantees the activations have a grad_fn even if no
    # parameter requires grad; its own gradient is never computed.
    return x.detach().clone().requires_grad_(True)


def _check_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Class per sample as a long tensor on the logits' device; default the predicted class."""
    if target is None:
        return logits.detach().argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries for a batch of {logits.shape[0]}")
    if target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(f"target classes must lie in [0, {logits.shape[1]})")
    return target


def _cam(act: torch.Tensor, grad: torch.Tensor | None, size: torch.Size, nhwc: bool) -> torch.Tensor:
    """ReLU of the gradient-weighted channel sum, upsampled to ``size``, scaled to [0, 1] per image."""
    act = act.detach().float()
    grad = torch.zeros_like(act) if grad is None else grad.float()
    if nhwc:
        act, grad = act.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    # An image with no positive evidence keeps an all-zero map instead of 0 / 0.
    return torch.where(peak > _EPS, cam / peak.clamp_min(_EPS), torch.zeros_like(cam)).clamp_(0, 1)


class GradCAM:
    """Grad-CAM maps for the streams of a two-input model such as ``DualStreamNet``.

    Hooks are registered on construction and removed by :meth:`close` (or on
    leaving a ``with`` block). Ordinary forward passes while it is open only
    keep a reference to the latest feature map.

    Args:
        model: A module with ``context`` / ``detail`` backbones (either may be
            None) called as ``model(context, detail)`` and returning logits.
        stream: ``"context"`` or ``"detail"`` for one stream; None for every
            stream the model has.
    """

    def __init__(self, model: nn.Module, stream: str | None = None):
        present = tuple(s for s in STREAM_NAMES if getattr(model, s, None) is not None)
        if stream is not None and stream not in present:
            raise ValueError(f"stream must be one of {', '.join(present)}; got {stream!r}")
        self.model = model
        self.streams = (stream,) if stream is not None else present
        self._taps = {s: _Tap(getattr(model, s)) for s in self.streams}
        self._closed = False

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this object registered."""
        for tap in self._taps.values():
            tap.remove()
        self._closed = True

    def cams(
        self, context: torch.Tensor | None, detail: torch.Tensor | None, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Grad-CAM per stream: ``{stream: (B, H, W)}`` in [0, 1] at that stream's input size.

        Args:
            context: Normalized float context batch (B,3,Hc,Wc), as fed in training; None if unused.
            detail: Normalized float detail batch (B,3,Hd,Wd); None if unused.
            target: Class per sample (B,); default the model's predicted class.
        """
        if self._closed:
            raise RuntimeError("GradCAM is closed")
        inputs = {"context": context, "detail": detail}
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            c, d = _graph_input(context), _graph_input(detail)
            for tap in self._taps.values():
                tap.ensure_hooked(lambda: self.model(c, d))
            logits = self.model(c, d)
            target = _check_target(logits, target)
            acts = [self._taps[s].take() for s in self.streams]
            score = logits.float().gather(1, target[:, None]).sum()
            grads = torch.autograd.grad(score, acts, allow_unused=True)
        return {s: _cam(a, g, inputs[s].shape[-2:], self._taps[s].nhwc) for s, a, g in zip(self.streams, acts, grads)}


def jet_lut() -> np.ndarray:
    """A 256-entry jet-like colormap (dark blue -> cyan -> yellow -> dark red), uint8 (256, 3)."""
    x = np.linspace(0.0, 1.0, 256)
    # Each channel is a clipped tent centred at 3/4 (red), 1/2 (green) and 1/4 (blue).
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=1)
    return np.round(rgb * 255).astype(np.uint8)


def overlay(rgb_uint8_hwc: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet heat map of ``cam`` (values in [0, 1]) over an RGB image; uint8 HxWx3.

    A map of another size is resized bilinearly to the image first.
    """
    image = np.asarray(rgb_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image; got {image.dtype} {image.shape}")
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32))
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D map; got shape {cam.shape}")
    if cam.shape != image.shape[:2]:
        cam = np.asarray(Image.fromarray(cam).resize(image.shape[1::-1], Image.BILINEAR))
    heat = jet_lut()[np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8)]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
