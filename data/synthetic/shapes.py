"""Wobbly ellipses (glands and nuclei) as tables of arrays, and their rasterisation into maps.

Shapes are drawn in batches of similar size: each shape gets a box around it,
the normalised radius is computed over every box at once, and the boxes'
values are summed into full-size maps with one ``bincount``. That keeps the
thousands of nuclei of an image vectorised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np


def _harmonic_edge(cos_t, sin_t, alphas, betas):
    """``1 + sum_k alpha_k cos(k t) + beta_k sin(k t)`` for k = 2, 3, ...

    The multiples of ``t`` come from the angle-addition recurrence, which is
    much cheaper than trigonometric calls on large arrays.
    """
    ck, sk = cos_t, sin_t
    edge = 1.0
    for alpha, beta in zip(alphas, betas):
        ck, sk = ck * cos_t - sk * sin_t, sk * cos_t + ck * sin_t
        edge = edge + alpha * ck + beta * sk
    return edge


def _trefoil_edge(cos_t, sin_t, alpha, beta):
    """``1 + alpha cos(3 t) + beta sin(3 t)``, by the triple-angle formulas."""
    four_c2 = 4.0 * cos_t * cos_t
    return 1.0 + alpha * cos_t * (four_c2 - 3.0) + beta * sin_t * (four_c2 - 1.0)


class _Table:
    """Mixin for dataclasses that hold one array entry per item in every field."""

    def __len__(self) -> int:
        return len(self.x)

    def take(self, keep: np.ndarray):
        """The items selected by an index or boolean array."""
        return type(self)(*(getattr(self, f.name)[keep] for f in fields(self)))

    @classmethod
    def join(cls, parts: Sequence):
        """All items of several tables."""
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class _Glands(_Table):
    """Glands as wobbly ellipses (lengths in px)."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray  # semi-axis along ``angle``
    b: np.ndarray  # the other semi-axis
    angle: np.ndarray
    harmonics: np.ndarray  # (N, 2, K): cosine and sine weights of boundary harmonics 2..K+1
    wall: np.ndarray  # epithelial wall thickness, fraction of the radius
    cribriform: np.ndarray  # bool: solid epithelium punched by small lumens


@dataclass
class _Nuclei(_Table):
    """Nuclei as wobbly ellipses (lengths in px)."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    harmonics: np.ndarray  # (N, 2, 1): cosine and sine weights of the third harmonic
    density: np.ndarray  # haematoxylin concentration
    chromatin: np.ndarray  # clumping amplitude


def _wobble(rng: np.random.Generator, count: int, amplitude: np.ndarray | float, orders: int) -> np.ndarray:
    """Random boundary harmonics (count, 2, orders), weaker for higher orders."""
    amps = np.asarray(amplitude, float).reshape(-1, 1) * rng.uniform(0.4, 1.2, (count, orders))
    amps /= np.sqrt(np.arange(1, orders + 1))
    phases = rng.uniform(0.0, 2 * np.pi, (count, orders))
    return np.stack([amps * np.cos(phases), amps * np.sin(phases)], axis=1)


def _reach(shapes) -> np.ndarray:
    """Half-side (px, integer) of a box that holds each shape."""
    spread = np.hypot(shapes.harmonics[:, 0], shapes.harmonics[:, 1]).sum(axis=1)
    return np.ceil(np.maximum(shapes.a, shapes.b) * (1.0 + spread)).astype(int) + 1


def _batches(reach: np.ndarray, budget: int = 600_000) -> Iterator[tuple[np.ndarray, int]]:
    """Groups of shapes of similar size, with the box half-side that fits each group.

    Similar sizes keep boxes tight; the budget bounds the pixels of one group.
    """
    order = np.argsort(reach, kind="stable")
    ranked = reach[order]
    start = 0
    while start < len(order):
        stop = int(np.searchsorted(ranked, ranked[start] * 1.3 + 1, side="right"))
        cap = max(1, budget // (2 * int(ranked[stop - 1]) + 1) ** 2)
        stop = min(stop, start + cap)
        yield order[start:stop], int(ranked[stop - 1])
        start = stop


def _box_rho(shapes, reach: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (1 on the boundary) over each shape's box.

    Boxes are shifted (never shrunk) to lie inside the image, which keeps every
    evaluated pixel useful while still covering the shape's part in the image.

    Returns:
        ``rho`` (N, B, B) float32 and the flat image index of every box pixel.
    """
    f32 = np.float32
    side = min(2 * reach + 1, size)
    span = np.arange(side)
    rows = np.clip(np.floor(shapes.y).astype(int) - reach, 0, size - side)[:, None] + span
    cols = np.clip(np.floor(shapes.x).astype(int) - reach, 0, size - side)[:, None] + span
    dy = (rows - shapes.y[:, None]).astype(f32)[:, :, None]
    dx = (cols - shapes.x[:, None]).astype(f32)[:, None, :]
    # Rotation and axis scaling folded into four per-shape coefficients.
    cos_a, sin_a = np.cos(shapes.angle)[:, None, None], np.sin(shapes.angle)[:, None, None]
    inv_a, inv_b = 1.0 / shapes.a[:, None, None], 1.0 / shapes.b[:, None, None]
    u = dx * (cos_a * inv_a).astype(f32) + dy * (sin_a * inv_a).astype(f32)
    v = dy * (cos_a * inv_b).astype(f32) - dx * (sin_a * inv_b).astype(f32)
    r = np.sqrt(u * u + v * v) + f32(1e-6)
    h = shapes.harmonics.astype(f32)[..., None, None]
    if isinstance(shapes, _Nuclei):
        # Ellipses already vary in elongation; a third harmonic adds lobes and dents.
        edge = _trefoil_edge(u / r, v / r, h[:, 0, 0], h[:, 1, 0])
    else:
        edge = _harmonic_edge(u / r, v / r, h[:, 0].transpose(1, 0, 2, 3), h[:, 1].transpose(1, 0, 2, 3))
    return r / edge, rows[:, :, None] * size + cols[:, None, :]


def _rasterise(shapes, size: int, shade: Callable, layers: int = 1) -> list[np.ndarray]:
    """Draw shapes: the sum, over shapes, of the maps ``shade`` paints in their boxes.

    Args:
        shapes: A ``_Glands`` or ``_Nuclei`` table.
        size: Side of the square image.
        shade: ``shade(batch, rho, index)`` returns ``layers`` arrays shaped
            like ``rho``: the values each output map receives from the boxes.
        layers: Number of output maps.

    Returns:
        ``layers`` float32 (size x size) maps.
    """
    reach = _reach(shapes)
    keep = (shapes.x > -reach) & (shapes.x < size + reach) & (shapes.y > -reach) & (shapes.y < size + reach)
    shapes, reach = shapes.take(keep), reach[keep]
    indices, values = [], [[] for _ in range(layers)]
    for batch, box in _batches(reach):
        part = shapes.take(batch)
        rho, index = _box_rho(part, box, size)
        indices.append(index.ravel())
        for store, layer in zip(values, shade(part, rho, index)):
            store.append(layer.ravel())
    if not indices:
        return [np.zeros((size, size), np.float32) for _ in range(layers)]
    flat = np.concatenate(indices)
    return [
        np.bincount(flat, np.concatenate(store), minlength=size * size).reshape(size, size).astype(np.float32)
        for store in values
    ]
