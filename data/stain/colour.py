"""Colour conversions of the stain normalizers: sRGB <-> CIE-LAB and optical density, by lookup table.

Pixels are uint8, so the per-pixel transcendental functions (sRGB decoding and
encoding, the logarithm of optical density) are tabulated once per device and
gathered instead of computed: a gather is several times cheaper than a pow or
a log over every pixel of a batch. Reinhard works in CIE-LAB, Macenko in
optical density.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# sRGB (D65) <-> CIE XYZ, with the constants of skimage.color (rgb2xyz, xyz2lab).
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_RGB_FROM_XYZ = tuple(map(tuple, np.linalg.inv(np.array(_XYZ_FROM_RGB)).tolist()))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_EPS = 0.008856  # CIE (6/29)^3, as rounded by skimage
_LAB_KAPPA = 7.787  # CIE linear-segment slope, as rounded by skimage
_LAB_F_EPS = 0.2068966  # 6/29, the inverse break point

# the tables, by kind and device, built on first use: a batch on a new device gets its own copy once
_LUT_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
_ENCODE_STEPS = 65536  # grid of the sRGB encoding table (see lab_to_rgb)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (D65, 2 degree observer) of uint8 sRGB pixels (B, 3, N), as float32 (B, 3, N)."""
    b, _, n = rgb.shape
    linear = _srgb_to_linear_lut(rgb.device).index_select(0, rgb.reshape(-1).int()).view(b, 3, n)
    xyz = _const(_XYZ_FROM_RGB, rgb.device) @ linear
    t = xyz / _const(_D65_WHITE, rgb.device)[:, None]
    f = torch.where(t > _LAB_EPS, t.clamp(min=0).pow(1.0 / 3.0), _LAB_KAPPA * t + 16.0 / 116.0)
    return torch.stack((116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """uint8 sRGB (B, 3, N) of CIE-LAB (B, 3, N), clipped to the gamut and rounded to the nearest level."""
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = lab[:, 1] / 500.0 + fy
    fz = (fy - lab[:, 2] / 200.0).clamp(min=0)  # as skimage.color.lab2xyz: negative z is set to 0
    f = torch.stack((fx, fy, fz), dim=1)
    t = torch.where(f > _LAB_F_EPS, f**3, (f - 16.0 / 116.0) / _LAB_KAPPA)
    xyz = t * _const(_D65_WHITE, lab.device)[:, None]
    linear = _const(_RGB_FROM_XYZ, lab.device) @ xyz
    # sRGB encoding and rounding by table: indexing by sqrt(linear) keeps the
    # steps fine near black, within 0.01 of a level everywhere
    index = linear.clamp_(0.0, 1.0).sqrt_().mul_(_ENCODE_STEPS - 1).add_(0.5).to(torch.int32)
    table = _srgb_encode_lut(lab.device)
    return table.index_select(0, index.view(-1)).view(lab.shape)


def _optical_density(pixels: torch.Tensor, io: float) -> torch.Tensor:
    """OD = ln(io) - ln(I + 1), float32, of uint8 pixels of any shape, by table (a gather is cheaper than a log)."""
    flat = _od_lut(io, pixels.device).index_select(0, pixels.reshape(-1).int())
    return flat.view(pixels.shape)


def _srgb_to_linear_lut(device: torch.device) -> torch.Tensor:
    """Linear-light value of each of the 256 sRGB levels (skimage's rgb2xyz formula), float32 on ``device``."""
    key = ("srgb", torch.device(device))
    if key not in _LUT_CACHE:
        v = torch.arange(256, dtype=torch.float64) / 255.0
        lin = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
        _LUT_CACHE[key] = lin.float().to(device)
    return _LUT_CACHE[key]


def _srgb_encode_lut(device: torch.device) -> torch.Tensor:
    """uint8 sRGB code of linear light x^2 for x on a grid of ``_ENCODE_STEPS`` in [0, 1], on ``device``."""
    key = ("encode", torch.device(device))
    if key not in _LUT_CACHE:
        lin = (torch.arange(_ENCODE_STEPS, dtype=torch.float64) / (_ENCODE_STEPS - 1)) ** 2
        srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
        _LUT_CACHE[key] = (srgb * 255.0).round().to(torch.uint8).to(device)
    return _LUT_CACHE[key]


def _od_lut(io: float, device: torch.device) -> torch.Tensor:
    """Optical density ln(io) - ln(v + 1) of the 256 uint8 levels v, float32 on ``device``."""
    key = (f"od{io!r}", torch.device(device))
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = (math.log(io) - torch.log1p(torch.arange(256, dtype=torch.float64))).float().to(device)
    return _LUT_CACHE[key]


def _const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device)
