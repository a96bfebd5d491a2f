"""Batched, on-device augmentation of patch pairs, and MixUp.

Histology has no orientation, so flips and 90-degree rotations are free
augmentations; the same transform is applied to the context and detail patch
of a pair, which share their centre. Everything runs on whole batches on the
training device: no per-sample Python in the data workers.
"""
from __future__ import annotations

import numpy as np
import torch

#: ImageNet statistics, the convention of timm backbones (and of any pretrained weights a user loads).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


_SCALE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1/std and -mean/std per channel, made once per device.

    Building them per batch would copy from pageable host memory every step,
    which blocks the host until the GPU drains its queue.
    """
    if device not in _SCALE:
        std = torch.tensor(STD) * 255
        mean = torch.tensor(MEAN) * 255
        _SCALE[device] = ((1 / std).view(1, 3, 1, 1).to(device), (-mean / std).view(1, 3, 1, 1).to(device))
    return _SCALE[device]


def to_float(batch: torch.Tensor, gain: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalized float32 in one fused multiply-add, keeping the memory format.

    ``gain`` and ``offset`` (B,1,1,1) apply a per-sample brightness/contrast
    jitter in the same pass: ``(x * gain - mean) / std + offset``.
    """
    inv_std, shift = _scale(batch.device)
    if gain is None:
        return torch.addcmul(shift, batch.float(), inv_std)
    return torch.addcmul(shift + offset, batch.float(), inv_std * gain)


def random_dihedral(context: torch.Tensor, detail: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/rotations per pair, the same for both patches of a pair.

    Cheapest on the uint8 batches, before conversion to float.
    """
    codes = torch.randint(0, 8, (context.shape[0],), generator=generator)
    out_c, out_d = torch.empty_like(context), torch.empty_like(detail)
    for code in codes.unique().tolist():
        rows = (codes == code).nonzero().flatten().to(context.device)
        out_c[rows] = _dihedral(context[rows], code)
        out_d[rows] = _dihedral(detail[rows], code)
    return out_c, out_d


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    x = torch.rot90(x, code % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if code >= 4 else x


def jitter_params(n: int, generator: torch.Generator, device: torch.device,
                  strength: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (gain, offset) for a light brightness/contrast jitter, to pass to :func:`to_float`."""
    draws = 2 * torch.rand(2, n, 1, 1, 1, generator=generator) - 1
    gain, offset = 1 + strength * draws[0], strength * draws[1] / STD[1]
    return gain.to(device, non_blocking=True), offset.to(device, non_blocking=True)


def mixup(context: torch.Tensor, detail: torch.Tensor, labels: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al. 2018): one lambda ~ Beta(alpha, alpha) and one permutation for both streams.

    Returns mixed context, mixed detail, labels, permuted labels and lambda;
    the loss is ``lam * CE(y) + (1 - lam) * CE(y[perm])``. alpha = 0 returns
    the inputs with lambda 1.
    """
    if alpha <= 0:
        return context, detail, labels, labels, 1.0
    lam = _beta_sample(alpha, generator)
    perm = torch.randperm(context.shape[0], generator=generator).to(context.device)
    mixed_c = context.mul(lam).add_(context[perm], alpha=1 - lam)
    mixed_d = detail.mul(lam).add_(detail[perm], alpha=1 - lam)
    return mixed_c, mixed_d, labels, labels[perm], lam


def _beta_sample(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) drawn reproducibly from the seeded torch generator."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
