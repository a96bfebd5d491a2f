"""Fixed-point encoding of secure aggregation: the quantization grid, its error bound and the host encoder.

A contribution in ``[-clip, clip]`` is rounded to one of ``levels + 1`` grid points (an integer in
``[0, levels]``) so that it can be masked and summed in Z_{2^32}; :func:`check_parameters` makes sure the
sum of W such integers stays below 2^32, and :func:`max_abs_error` bounds what the rounding costs.
See :mod:`fedsim.privacy.secagg` for the protocol around it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

DEFAULT_CLIP = 8.0
DEFAULT_LEVELS = 2**22
MODULUS = 2**32

_F32_MAX_EXP = 127  # largest binary exponent of a finite float32
_F32_MIN_NORMAL_EXP = -126


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class Grid:
    """Quantization grid and arithmetic for one (world size, clip, levels); validated on construction.

    Two paths, chosen from the parameters (the same on every rank):

    - exact: when the step ``2·clip/levels`` is a power of two (clip is) and
      ``levels <= 2^23``, one float32 addition ``x + (base + clip)`` rounds to the grid
      (``base = step·2^23``: float32 spacing in ``[base, 2·base)`` is the step), and the
      bit pattern of the result is ``bits(base) + q``. When also ``W·levels/2 <= 2^24``,
      the dequantized sum ``Σq'·step`` is exact in float32. No rounding but the
      quantization's own.
    - float64 otherwise: the same grid computed in float64, then rounded to float32;
      :func:`max_abs_error` accounts for each rounding.
    """

    def __init__(self, world: int, clip: float, levels: int):
        check_parameters(world, clip, levels)
        self.world = int(world)
        self.clip = float(clip)
        self.levels = levels = int(levels)
        self.step = 2.0 * self.clip / levels  # exact: levels is a power of two
        self.scale = levels / (2.0 * self.clip)  # float64; exact when clip is a power of two
        self.zero = levels // 2  # the integer that stands for 0.0
        pow2 = _is_power_of_two(self.step)
        self.exact_quantize = pow2 and levels <= 2**23
        self.exact_dequantize = pow2 and world * levels // 2 <= 2**24
        if self.exact_quantize:
            base = self.step * 2.0**23
            self.base32 = np.float32(base)
            self.bias32 = np.float32(base + self.clip)  # x + bias rounds x + clip to the grid
            self.low32 = np.float32(base)
            self.high32 = np.float32(base + 2.0 * self.clip)
            offset = int(self.base32.view(np.uint32))  # bits(base + k·step) = bits(base) + k
        else:
            offset = 0
        # What each rank's sent value holds besides q - zero and the masks; the decode removes W of them.
        self.center = (offset + self.zero) % MODULUS
        self.total_center = self.world * self.center % MODULUS


def check_parameters(world_size: int, clip: float, levels: int) -> None:
    """Raise ``ValueError`` unless (world size, clip, levels) make a sum that cannot wrap modulo 2^32.

    clip must be finite and > 0 (and fit float32 for W ranks), levels a power of two >= 2 with
    ``world_size · levels < 2^32``: the sum of W quantized values, each in ``[0, levels]``, stays below
    the modulus, so removing the masks modulo 2^32 gives the exact integer sum.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    world_size = int(world_size)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise ValueError(f"clip must be a number > 0, got {clip!r}")
    clip = float(clip)
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"levels must be an int power of two >= 2, got {levels!r}")
    levels = int(levels)
    if levels < 2 or levels & (levels - 1):
        raise ValueError(f"levels must be a power of two >= 2, got {levels}")
    if world_size * levels >= MODULUS:
        largest = 1 << (((MODULUS - 1) // world_size).bit_length() - 1)
        raise ValueError(
            f"levels={levels} with {world_size} ranks: the sum of quantized values reaches "
            f"world_size*levels = {world_size * levels}, which must stay below 2**32 = {MODULUS} or it wraps; "
            f"use levels <= {largest} (2**{largest.bit_length() - 1}) for {world_size} ranks"
        )
    if math.frexp(world_size * clip)[1] > _F32_MAX_EXP:
        raise ValueError(f"clip={clip} with {world_size} ranks: the sum could exceed float32's range")
    if math.frexp(2.0 * clip / levels)[1] - 1 < _F32_MIN_NORMAL_EXP:
        raise ValueError(f"clip={clip} with levels={levels}: the quantization step is below float32's normal range")


def max_abs_error(world_size: int, clip: float = DEFAULT_CLIP, levels: int = DEFAULT_LEVELS) -> float:
    """The worst-case absolute error, per element, of :meth:`SecureAggregation.secure_sum_` for inputs in range.

    Each rank rounds ``x`` (with ``|x| <= clip``) to the nearest point of a grid of step
    ``step = 2·clip/levels``: an error of at most half a step. The modular sum of the quantized
    values is exact (``W·levels < 2^32``), so the W errors add up to at most ``W·step/2 =
    W·clip/levels``: the bound, attained when every rank sits on a half step on the same side
    (the tests do this). For the defaults (8, 2^22) and 3 ranks: 3·2^-19 ≈ 5.72e-6.

    When the exact float32 path does not apply (clip not a power of two, ``levels > 2^23``, or
    ``W·levels/2 > 2^24``, see :class:`Grid`), float64 arithmetic adds at most
    ``levels·2^-52`` steps per rank to the rounding (the products and the sum that form
    ``x·levels/(2·clip) + levels/2``), and the dequantization ``Σq'·step`` in float64 then
    float32 adds at most ``W·clip·(2^-52 + 2^-24)`` (2^-52 only when the step is not a power of
    two); this branch is padded by a factor 1 + 2^-40 for the rounding of the bound itself.
    Elements outside ``[-clip, clip]`` are off by their clipping too (counted, not bounded).
    """
    plan = Grid(world_size, clip, levels)
    if plan.exact_quantize and plan.exact_dequantize:
        return world_size * plan.step / 2  # exact: powers of two times a small integer
    per_rank = 0.5 if plan.exact_quantize else 0.5 + levels * 2.0**-52
    bound = world_size * per_rank * plan.step
    if not plan.exact_dequantize:
        product = 0.0 if _is_power_of_two(plan.step) else 2.0**-52
        bound += world_size * plan.clip * (product + 2.0**-24)
    return bound * (1 + 2.0**-40)


class HostScratch:
    """Per-call cache-sized buffers of the host engine."""

    def __init__(self, chunk: int, plan: Grid):
        self.f32 = np.empty(chunk, np.float32)
        self.f64 = None if plan.exact_quantize and plan.exact_dequantize else np.empty(chunk, np.float64)
        self.u32 = np.empty(chunk, np.uint32)
        self.keystream = np.empty(chunk, np.uint32)
        self._step32 = np.float32(plan.step)
        self._total_center = np.uint32(plan.total_center)

    def quantize(self, x: np.ndarray, plan: Grid) -> tuple[np.ndarray, int, int]:
        """(q + offset as uint32, clipped count, NaN count) of a chunk; see :class:`Grid`."""
        n = x.size
        in_range = -plan.clip <= float(x.min()) and float(x.max()) <= plan.clip  # NaN: False
        clipped = nans = 0
        if not in_range:
            nan = np.isnan(x)
            nans = int(np.count_nonzero(nan))
            limit = np.float64(plan.clip)  # compared in float64: clip need not be a float32
            clipped = int(np.count_nonzero(x > limit)) + int(np.count_nonzero(x < -limit))
        if plan.exact_quantize:
            u = self.f32[:n]
            np.add(x, plan.bias32, out=u)  # one correctly rounded float32 add: the grid point, ties to even
            if not in_range:
                np.clip(u, plan.low32, plan.high32, out=u)
                if nans:
                    u[nan] = plan.bias32
            return u.view(np.uint32), clipped, nans
        u = self.f64[:n]
        np.multiply(x, np.float64(plan.scale), out=u)
        np.add(u, np.float64(plan.zero), out=u)
        if not in_range:
            np.clip(u, 0.0, float(plan.levels), out=u)
            if nans:
                u[nan] = plan.zero
        np.rint(u, out=u)
        acc = self.u32[:n]
        np.copyto(acc, u, casting="unsafe")  # integers in [0, levels]: exact
        return acc, clipped, nans

    def dequantize(self, total: np.ndarray, out: np.ndarray, plan: Grid) -> None:
        """``out = Σ(q - zero)·step`` from a chunk of the all-reduced sums (int64, or uint32 bits of the int32 wire)."""
        n = total.size
        acc = self.u32[:n]
        if total.dtype != np.uint32:
            np.copyto(acc, total, casting="unsafe")  # int64 to unsigned: modulo 2^32 by definition
            total = acc
        np.subtract(total, self._total_center, out=acc)  # Σ(q - zero) modulo 2^32
        signed = acc.view(np.int32)  # the same bits as int32: the signed sum, |Σ| < 2^31
        if plan.exact_dequantize:  # exact: |Σ| <= 2^24, power-of-two step
            wide = self.f32[:n]
            np.copyto(wide, signed, casting="unsafe")
            np.multiply(wide, self._step32, out=out)
        else:
            wide = self.f64[:n]
            np.multiply(signed, np.float64(plan.step), out=wide)
            np.copyto(out, wide, casting="same_kind")
