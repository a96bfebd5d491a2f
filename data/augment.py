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


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalized float32, keeping the memory format."""
    mean = torch.tensor(MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=batch.device).view(1, 3, 1, 1) * 255
    return (batch.float() - mean) / std


def random_dihedral(context: torch.Tensor, detail: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/rotations per pair, the same for both patches of a pair."""
    n = context.shape[0]
    codes = torch.randint(0, 8, (n,), generator=generator).tolist()
    out_c, out_d = context.clone(), detail.clone()
    for code in set(codes):
        rows = torch.tensor([i for i, c in enumerate(codes) if c == code], device=context.device)
        out_c[rows] = _dihedral(context[rows], code)
        out_d[rows] = _dihedral(detail[rows], code)
    return out_c, out_d


def _dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    x = torch.rot90(x, code % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if code >= 4 else x


def colour_jitter(context: torch.Tensor, detail: torch.Tensor, generator: torch.Generator,
                  strength: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Light per-pair brightness and contrast jitter on normalized float batches."""
    n = context.shape[0]
    gain = 1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    shift = strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1) / STD[1]
    gain, shift = gain.to(context.device), shift.to(context.device)
    return context * gain + shift, detail * gain + shift


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
