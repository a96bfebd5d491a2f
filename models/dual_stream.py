"""The dual-stream grading network: context and detail patches around one point.

Two timm backbones with separate weights, each globally pooled; their feature
vectors are concatenated and a Dense-ReLU-Dropout-Dense head maps them to the
grades. The head returns logits: the paper's final Softmax is applied by the
cross-entropy loss in training and by :meth:`DualStreamNet.predict_proba`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

STREAMS = {"dual": ("context", "detail"), "context": ("context",), "detail": ("detail",)}


def check_backbone(name: str) -> None:
    """Raise ValueError with a one-line message if timm does not know the model."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0][:6]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"model.backbone = {name!r} is not a timm model{hint}")


def make_backbone(name: str) -> nn.Module:
    """A timm backbone without classifier, average-pooled; never downloads weights."""
    check_backbone(name)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg")


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
    """

    def __init__(self, backbone: str = "resnetrs50", scales: str = "dual", num_classes: int = 3,
                 hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        if scales not in STREAMS:
            raise ValueError(f"scales must be one of {', '.join(STREAMS)}; got {scales!r}")
        self.scales = scales
        self.streams = STREAMS[scales]
        self.context = make_backbone(backbone) if "context" in self.streams else None
        self.detail = make_backbone(backbone) if "detail" in self.streams else None
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


def build_model(backbone: str = "resnetrs50", scales: str = "dual", num_classes: int = 3,
                hidden: int = 512, dropout: float = 0.5, pretrained: str = "") -> DualStreamNet:
    """Build the network, optionally loading local pretrained weights."""
    model = DualStreamNet(backbone, scales, num_classes, hidden, dropout)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return state


def load_pretrained(model: DualStreamNet, path: str | Path) -> None:
    """Load a whole DualStreamNet state dict, or one backbone's weights into every stream."""
    state = read_weights(path)
    # Stream prefixes mark a whole model; "head." alone does not (timm ConvNeXt / ViT classifiers are named head).
    if any(k.startswith(("context.", "detail.")) for k in state):
        model.load_state_dict(state)
        log.info("loaded dual-stream weights from %s", path)
        return
    for name in model.streams:
        stream = getattr(model, name)
        wanted = stream.state_dict()
        usable = {k: v for k, v in state.items() if k in wanted and wanted[k].shape == v.shape}
        if not usable:
            raise ValueError(f"{path}: no tensor matches the {name} backbone's parameters")
        stream.load_state_dict(usable, strict=False)
        log.info("%s stream: %d/%d tensors loaded from %s", name, len(usable), len(wanted), path)
