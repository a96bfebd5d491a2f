"""A small CNN for CPU studies on the embedded benchmark: full resolution until its first pooling.

timm's small ResNets (``resnet10t``, ``test_resnet``) stride by 4 in their stem,
before any layer has looked at single pixels; the benchmark's nuclear level
lives at the 1-3 px scale, so a network that studies it on a CPU should not
throw those pixels away first. :class:`SmallCNN` keeps two 3x3 convolutions at
full resolution, then halves the map three times (4 convolutions more), and
average-pools. At width 16 it has about 0.2 M parameters and costs about
17 MFLOPs per 48 px patch, a few times less than ``resnet10t`` at that size.

Backbones here are built by name like timm's (:data:`BACKBONES`); they take
the same ``norm_layer`` argument, so ``model.norm = group`` (DP-SGD) works.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _conv(cin: int, cout: int, norm_layer: Callable[[int], nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-conv at full resolution, pool, conv-conv, pool, conv, pool, conv, average pool; widths w, 2w, 4w.

    Attributes:
        num_features: Width of the pooled feature vector (``4 * width``).
        global_pool: The average pool (where :mod:`models.gradcam` looks for it).
    """

    def __init__(self, width: int = 16, norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        w = width
        self.features = nn.Sequential(
            *_conv(3, w, norm),
            *_conv(w, w, norm),
            nn.MaxPool2d(2),
            *_conv(w, 2 * w, norm),
            *_conv(2 * w, 2 * w, norm),
            nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w, norm),
            nn.MaxPool2d(2),
            *_conv(4 * w, 4 * w, norm),
        )
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.num_features = 4 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.global_pool(self.features(x))


#: fedsim's own backbones, by ``model.backbone`` name: a factory taking timm's ``norm_layer``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda norm_layer=None: SmallCNN(16, norm_layer),
    "small_cnn_w32": lambda norm_layer=None: SmallCNN(32, norm_layer),
}
