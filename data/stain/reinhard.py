"""Reinhard colour transfer on batches: its default target and ``Reinhard``.

Per image, the CIE-LAB channels are shifted and scaled to the target's mean
and standard deviation over tissue; the conversions are in ``colour``, the
batching in ``batching``.
"""

from __future__ import annotations

import torch

from data.errors import DataError
from data.stain.batching import StainNormalizer, _blocks
from data.stain.colour import lab_to_rgb, rgb_to_lab

# Reinhard's default target, CIE-LAB mean and std over tissue (L* < 88): those of the public-domain
# H&E region "CMU-1-Small-Region" (OpenSlide test data, CC0) after Macenko normalization to Macenko's
# default reference (MACENKO_HE_REF, MACENKO_MAX_C_REF; stride 1), so that both methods aim at the same
# colours unless fitted.
REINHARD_MEAN_REF = (56.7218, 22.1164, -9.5896)
REINHARD_STD_REF = (18.7588, 6.3484, 5.2087)


class Reinhard(StainNormalizer):
    """Reinhard colour transfer in CIE-LAB, batched (Reinhard et al. 2001, "Color
    transfer between images", IEEE CG&A).

    Each image's L*, a*, b* channels are shifted and scaled so that their mean
    and standard deviation over the image's tissue match the reference's; the
    same affine map is applied to every pixel. Until ``fit`` replaces it the
    reference is ``REINHARD_MEAN_REF`` / ``REINHARD_STD_REF`` (a real H&E
    region after Macenko normalization). Tissue is every pixel with
    L* < ``max_lightness`` (default 88: glass background in brightfield H&E
    sits at L* of about 94-98). Lab is CIE-LAB under D65 with skimage's
    constants (``skimage.color.rgb2lab``); the output is rounded to uint8.

    Args:
        max_lightness: L* below which a pixel counts as tissue.
        chunk_size: Images processed at once; None picks 128 on CPU and 256 on GPU.
        min_pixels: Fewest tissue pixels for an image to be normalized.
        workers: Chunks normalized at once on CPU threads; 1 runs them one after another
            (see ``Macenko``).
    """

    def __init__(
        self, max_lightness: float = 88.0, chunk_size: int | None = None, min_pixels: int = 64, workers: int = 2
    ) -> None:
        super().__init__(chunk_size, min_pixels, workers)
        self.max_lightness = float(max_lightness)
        self.target_mean = torch.tensor(REINHARD_MEAN_REF, dtype=torch.float32)
        self.target_std = torch.tensor(REINHARD_STD_REF, dtype=torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference: ``target_mean`` and ``target_std`` (3,) in Lab."""
        return {"target_mean": self.target_mean.clone(), "target_std": self.target_std.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a reference saved by ``state_dict``."""
        mean = torch.as_tensor(state["target_mean"], dtype=torch.float32).cpu()
        std = torch.as_tensor(state["target_std"], dtype=torch.float32).cpu()
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(f"bad Reinhard state shapes {tuple(mean.shape)}, {tuple(std.shape)}")
        self.target_mean, self.target_std = mean.clone(), std.clone()

    def tissue_stats(self, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image mean and std (B, 3) of Lab (B, 3, N) over tissue, and validity (B,)."""
        tissue = lab[:, 0] < self.max_lightness
        count = tissue.sum(dim=1, keepdim=True)
        weight = tissue.unsqueeze(1).to(lab.dtype)
        mean = (lab * weight).sum(-1) / count.clamp(min=1)
        var = (((lab - mean.unsqueeze(-1)) * weight) ** 2).sum(-1) / count.clamp(min=1)
        std = var.sqrt()
        valid = (count[:, 0] >= self.min_pixels) & (std > 1e-3).all(dim=1)
        return mean, std, valid

    def _fit_pixels(self, pixels: torch.Tensor) -> None:
        mean, std, valid = self.tissue_stats(rgb_to_lab(pixels.unsqueeze(0)))
        if not bool(valid[0]):
            raise DataError("Reinhard is undefined on the reference: too little tissue or no colour spread")
        self.target_mean, self.target_std = mean[0].cpu(), std[0].cpu()

    def _normalize_chunk(self, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, c, h, w = chunk.shape
        target_mean, target_std = self.target_mean.to(chunk.device), self.target_std.to(chunk.device)
        valid = torch.empty(b, dtype=torch.bool, device=chunk.device)
        for part in _blocks(b, c * h * w, chunk.device):  # images are independent: blocks stay in cache
            lab = rgb_to_lab(chunk[part].reshape(-1, c, h * w))
            mean, std, valid[part] = self.tissue_stats(lab)
            gain = (target_std / std.clamp(min=1e-3)).unsqueeze(-1)
            lab = (lab - mean.unsqueeze(-1)).mul_(gain).add_(target_mean[None, :, None])
            out[part].copy_(lab_to_rgb(lab).view(-1, c, h, w))
        return valid
