"""The dual-stream grading network: context and detail patches around one point.

Two timm backbones with separate weights, each globally pooled; their feature
vectors are concatenated and a Dense-ReLU-Dropout-Dense head maps them to the
grades. The head returns logits: the paper's final Softmax is applied by the
cross-entropy loss in training and by :meth:`DualStreamNet.predict_proba`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from data.errors import UserError, WeightsError
from models.small_cnn import BACKBONES

log = logging.getLogger(__name__)

STREAMS = {"dual": ("context", "detail"), "context": ("context",), "detail": ("detail",)}
#: Normalization layers a backbone can be built with.
NORMS = ("batch", "group")


def check_backbone(name: str) -> None:
    """Raise UserError (a ValueError) with a one-line message if neither fedsim nor timm knows the model."""
    if name not in BACKBONES and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0][:6]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"model.backbone = {name!r} is not a timm model{hint}")


def group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    """A GroupNorm for ``num_channels`` with gcd(num_channels, 32) groups (Wu & He's 32 where it divides).

    A norm-layer factory for timm (``norm_layer=group_norm``): timm calls it
    with the channel count first, and its ``get_norm_layer`` keeps a plain
    function as it is, whereas ``partial(nn.GroupNorm, 8)`` loses its
    positional argument there. Plain ``nn.GroupNorm`` is what Opacus's grad
    sampler is registered for (timm's own ``GroupNorm`` subclass is not).
    """
    return nn.GroupNorm(math.gcd(int(num_channels), 32), num_channels, **kwargs)


def make_backbone(name: str, norm: str = "batch") -> nn.Module:
    """A backbone without classifier, average-pooled; never downloads weights.

    ``name`` is one of fedsim's own (:data:`models.small_cnn.BACKBONES`) or a timm model.

    ``norm="group"`` swaps BatchNorm for :func:`group_norm`: per-sample gradients (DP-SGD) need layers
    that do not mix the samples of a batch.
    """
    check_backbone(name)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    extra = {"norm_layer": group_norm} if norm == "group" else {}
    if name in BACKBONES:
        return BACKBONES[name](**extra)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg", **extra)


def feature_width(backbone: nn.Module) -> int:
    """Width of the pooled feature vector (some timm models add a pre-logits layer past num_features)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class DualStreamNet(nn.Module):
    """Context + detail streams, concatenated features, MLP head.

    Args:
        backbone: timm model name for both streams.
        scales: ``dual``, ``context`` or ``detail`` (single-stream ablation, same head).
        num_classes: Number of grades.
        hidden: Width of the Dense layer.
        dropout: Dropout probability before the last layer.
        norm: The backbones' normalization layers, ``batch`` or ``group`` (see :func:`make_backbone`).
    """

    def __init__(
        self,
        backbone: str = "resnetrs50",
        scales: str = "dual",
        num_classes: int = 3,
        hidden: int = 512,
        dropout: float = 0.5,
        norm: str = "batch",
    ):
        super().__init__()
        if scales not in STREAMS:
            raise ValueError(f"scales must be one of {', '.join(STREAMS)}; got {scales!r}")
        self.scales = scales
        self.backbone_name = backbone
        self.norm = norm
        self.streams = STREAMS[scales]
        self.context = make_backbone(backbone, norm) if "context" in self.streams else None
        self.detail = make_backbone(backbone, norm) if "detail" in self.streams else None
        features = sum(feature_width(getattr(self, s)) for s in self.streams)
        self.head = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, context: torch.Tensor | None, detail: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, num_classes) from the context (B,3,Hc,Wc) and detail (B,3,Hd,Wd) patches."""
        parts = []
        if self.context is not None:
            parts.append(self.context(context))
        if self.detail is not None:
            parts.append(self.detail(detail))
        return self.head(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    @torch.no_grad()
    def predict_proba(self, context: torch.Tensor | None, detail: torch.Tensor | None) -> torch.Tensor:
        """Class probabilities (the Softmax of the head)."""
        return self.forward(context, detail).float().softmax(dim=1)


def build_model(
    backbone: str = "resnetrs50",
    scales: str = "dual",
    num_classes: int = 3,
    hidden: int = 512,
    dropout: float = 0.5,
    pretrained: str = "",
    norm: str = "batch",
) -> DualStreamNet:
    """Build the network, optionally loading local pretrained weights."""
    model = DualStreamNet(backbone, scales, num_classes, hidden, dropout, norm)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only``).

    Raises:
        FileNotFoundError: the file does not exist.
        WeightsError: it cannot be read as weights, or holds no state dict of tensors (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsError(f"{path} cannot be read as weights ({type(err).__name__}: {first})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return state


#: Names listed per kind of difference in :func:`state_mismatch`.
_SHOWN = 3


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def state_mismatch(
    wanted: dict[str, torch.Tensor],
    saved: dict[str, Any],
    ignore_unexpected: tuple[str, ...] = (),
    ignore_missing: tuple[str, ...] = (),
) -> str:
    """How ``saved`` fails to fit a module whose state dict is ``wanted``; "" when it fits exactly.

    One line: ``N missing keys (a, b, ...), M unexpected (c, ...), K shape mismatches (name: saved (..)
    vs model (..), ...)``, the first few names of each, and only the kinds that occur.

    Args:
        wanted: The module's ``state_dict()`` (tensors, or anything with a ``shape``).
        saved: The state dict that would be loaded.
        ignore_unexpected: Key prefixes of ``saved`` that may be left unused (a classifier the module lacks).
        ignore_missing: Key suffixes that may be absent from ``saved`` (BatchNorm's ``num_batches_tracked``).
    """
    missing = [k for k in wanted if k not in saved and not (ignore_missing and k.endswith(ignore_missing))]
    unexpected = [k for k in saved if k not in wanted and not (ignore_unexpected and k.startswith(ignore_unexpected))]
    shapes = [
        (k, tuple(getattr(saved[k], "shape", ())), tuple(wanted[k].shape))
        for k in wanted
        if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(wanted[k].shape)
    ]

    def names(keys: list[str]) -> str:
        more = ", ..." if len(keys) > _SHOWN else ""
        return f" ({', '.join(keys[:_SHOWN])}{more})"

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)}{names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected{names(unexpected)}")
    if shapes:
        shown = ", ".join(f"{k}: saved {_shape(a)} vs model {_shape(b)}" for k, a, b in shapes[:_SHOWN])
        more = ", ..." if len(shapes) > _SHOWN else ""
        parts.append(f"{len(shapes)} shape mismatch{'es' * (len(shapes) != 1)} ({shown}{more})")
    return ", ".join(parts)


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier that ``num_classes=0`` removed (``fc.``, ``head.fc.``): a backbone file
    saved with its classifier still fits."""
    names = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _is_dual_state(state: dict[str, Any]) -> bool:
    # Stream prefixes mark a whole model; "head." alone does not (timm ConvNeXt / ViT classifiers are named head).
    return any(k.startswith(("context.", "detail.")) for k in state)


def pretrained_mismatch(model: DualStreamNet, state: dict[str, Any]) -> str:
    """ "" when ``state`` (a whole DualStreamNet, or one backbone for every stream) fits ``model``, else why not."""
    if _is_dual_state(state):
        problem = state_mismatch(model.state_dict(), state, ignore_missing=("num_batches_tracked",))
        return problem and f"does not fit a {model.scales}-stream {model.backbone_name} model: {problem}"
    stream = getattr(model, model.streams[0])
    problem = state_mismatch(
        stream.state_dict(),
        state,
        ignore_unexpected=_classifier_prefixes(stream),
        ignore_missing=("num_batches_tracked",),
    )
    return problem and f"does not fit the {model.backbone_name} backbone: {problem}"


def load_pretrained(model: DualStreamNet, path: str | Path) -> None:
    """Load a whole DualStreamNet state dict, or one backbone's weights into every stream.

    The tensors must fit: every parameter and buffer present with its shape (a backbone's
    classifier, which the streams lack, and BatchNorm batch counters excepted).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: unreadable weights, or weights of another model: one line with the first
            missing and unexpected keys and shape mismatches, and their counts.
    """
    state = read_weights(path)
    problem = pretrained_mismatch(model, state)
    if problem:
        raise WeightsError(f"pretrained weights {path} {problem}")
    if _is_dual_state(state):
        model.load_state_dict(state, strict=False)  # checked above: only batch counters may be absent
        log.info("loaded dual-stream weights from %s", path)
        return
    for name in model.streams:
        stream = getattr(model, name)
        wanted = stream.state_dict()
        stream.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
        log.info("%s stream: %d/%d tensors loaded from %s", name, sum(k in state for k in wanted), len(wanted), path)


def check_pretrained(
    backbone: str, scales: str, path: str | Path, num_classes: int = 3, hidden: int = 512, norm: str = "batch"
) -> None:
    """Check, before any work, that the weights in ``path`` fit the network (built on the meta device: cheap).

    Raises:
        FileNotFoundError, WeightsError: as :func:`load_pretrained`; UserError: an unknown backbone.
    """
    check_backbone(backbone)
    state = read_weights(path)
    with torch.device("meta"):
        model = DualStreamNet(backbone, scales, num_classes=num_classes, hidden=hidden, norm=norm)
    problem = pretrained_mismatch(model, state)
    if problem:
        raise WeightsError(f"pretrained weights {path} {problem}")
