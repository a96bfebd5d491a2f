"""Deterministic synthetic H&E-like stand-in for the CRC-HGD dataset.

The real dataset cannot be downloaded here, so this module renders a small
look-alike with the same folder layout (class folder / magnification folder /
JPEG), plus a ``manifest.csv`` and a ``spec.json``. Nothing is drawn from the
clock: every random draw is seeded from ``(seed, hospital, patient, image)``,
so one spec always gives byte-identical files.

Rendering follows Beer-Lambert optics. Per pixel, haematoxylin and eosin
concentration maps are built (stroma, epithelium, lumens, nuclei) and turned
into light as ``I = Io * exp(-(c_H * v_H + c_E * v_E))``, with the stain
vectors ``v_H``, ``v_E``, their strengths and the glass brightness ``Io`` taken
from the hospital's :class:`StainProfile`. Tissue covers part of each image;
the rest is bright glass, so Otsu tissue masking has something to find.

Grades show at two scales:

* Architecture, seen in a context window (about 320x320 px): Grade I has
  round, separate glands whose lumen is ringed by a single, regular row of
  polarised nuclei; Grade II has elongated, irregular, fused and cribriform
  glands with stratified nuclei; Grade III has solid sheets of cells and only
  the odd abortive lumen.
* Nuclei, seen in a detail window (about 224x224 px): size, pleomorphism
  (spread of size and shape), boundary roughness, chromatin clumping and
  hyperchromasia (haematoxylin density) all rise with grade; Grade III adds
  mitotic figures.

Each cue is informative but imperfect. For every image an *architecture
grade* and a *nuclear grade* are drawn independently; each equals the true
grade (the label) with probability ``CUE_AGREEMENT`` = 0.75 and is otherwise
an adjacent grade (Grade II moves to I or III with equal odds). An ideal
reader of one cue is right 75 % of the time; one who reads both and combines
them with Bayes' rule is right about 82 % of the time, so multi-scale models
have something to gain.

Magnification scales every structure: at 40x a gland fills much of the image
and nuclei are tens of pixels long; at 4x glands are small and many and
nuclei are a pixel or two.

Hospitals differ the way labs do: each has a :class:`StainProfile` (stain
vectors turned several degrees from Ruifrok & Johnston's, dye strengths,
camera white balance, focus, vignetting) fixed by ``(seed, hospital)``; ``H1``
stays close to standard H&E. Each patient's slide varies a little around its
lab's profile.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data.files import exclusive, write_atomic
from data.limits import check_int
from data.records import GRADE_NAMES, MAGNIFICATIONS
from data.sites import STANDARD_EOSIN, STANDARD_HAEMATOXYLIN, rotate_vector, unit_vector

#: Bumped whenever rendering changes, so cached datasets are not reused. 2: datasets rendered under 1 by
#: early revisions differ from what the renderer now gives for the same spec (found comparing bytes).
GENERATOR_VERSION = 2
#: Class folder names of CRC-HGD, in label order.
CLASS_FOLDERS: tuple[str, ...] = (
    "CRC_Grade__1__Well_Diff",
    "CRC_Grade__2__Mod_Diff",
    "CRC_Grade__3__Poorly_Diff",
)
MANIFEST_NAME = "manifest.csv"
SPEC_NAME = "spec.json"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "magnification", "patient", "hospital")
#: Probability that an image's architecture (or nuclear) cue shows its true grade.
CUE_AGREEMENT = 0.75

#: Image size at which the structure sizes below are given.
_REFERENCE_SIZE = 800
#: Length scale of each magnification relative to 40x.
_MAG_SCALE = {"4x": 0.1, "10x": 0.25, "20x": 0.5, "40x": 1.0}
#: Outer radius of an average gland, in pixels at 40x and 800 px.
_GLAND_RADIUS = 250.0
#: Turn between the stain-strength directions of successive hospitals (radians).
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
#: Seed-stream tags, so stain, slide and image draws never share a stream.
_STAIN_STREAM, _SLIDE_STREAM, _IMAGE_STREAM = 11, 12, 13

assert len(CLASS_FOLDERS) == len(GRADE_NAMES)


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render; everything else follows deterministically.

    Attributes:
        num_hospitals: Hospitals (federated clients), named ``H1``, ``H2``, ...
        patients_per_grade: Patients of each grade in every hospital.
        images_per_patient: Images per patient, spread over the magnifications.
        image_size: Side of the square images in pixels.
        magnifications: Magnification folders to use, a subset of ``MAGNIFICATIONS``.
        seed: Root of every random draw.
        jpeg_quality: JPEG quality of the written images.
    """

    num_hospitals: int = 3
    patients_per_grade: int = 4
    images_per_patient: int = 4
    image_size: int = 800
    magnifications: tuple[str, ...] = ("4x", "10x", "20x", "40x")
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Configs arrive as lists from JSON/TOML; a tuple keeps the spec hashable.
        if isinstance(self.magnifications, list):
            object.__setattr__(self, "magnifications", tuple(self.magnifications))
        check_int("SyntheticSpec.num_hospitals", self.num_hospitals, 1, 99)
        check_int("SyntheticSpec.patients_per_grade", self.patients_per_grade, 1, 999 // len(GRADE_NAMES))
        check_int("SyntheticSpec.images_per_patient", self.images_per_patient, 1, 999)
        check_int("SyntheticSpec.image_size", self.image_size, 64, 4096)
        check_int("SyntheticSpec.seed", self.seed, 0, 2**63 - 1)
        check_int("SyntheticSpec.jpeg_quality", self.jpeg_quality, 1, 100)
        mags = self.magnifications
        if (
            not isinstance(mags, tuple)
            or not mags
            or any(m not in MAGNIFICATIONS for m in mags)
            or len(set(mags)) != len(mags)
        ):
            raise ValueError(
                f"SyntheticSpec.magnifications must be a non-empty tuple of distinct "
                f"values from {MAGNIFICATIONS}; got {mags!r}"
            )

    def to_dict(self) -> dict:
        """The spec as plain JSON-ready values."""
        out = asdict(self)
        out["magnifications"] = list(self.magnifications)
        return out


def spec_document(spec: SyntheticSpec) -> dict:
    """What ``spec.json`` holds: the spec and the generator version."""
    return {"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()}


def default_root(spec: SyntheticSpec) -> Path:
    """Default dataset folder: ``$FEDSIM_CACHE`` (else ``~/.cache/fedsim``)/``synthetic-<hash>``.

    The hash covers the spec and ``GENERATOR_VERSION``, so a changed spec or
    renderer never reuses an old dataset.
    """
    base = os.environ.get("FEDSIM_CACHE") or str(Path.home() / ".cache" / "fedsim")
    text = json.dumps(spec_document(spec), sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Path(base).expanduser() / f"synthetic-{digest}"


# ----------------------------------------------------------------- stain profiles


@dataclass(frozen=True)
class StainProfile:
    """How one lab's staining and microscope turn stain amounts into colour.

    Attributes:
        haematoxylin: Unit optical-density vector (R, G, B) of haematoxylin.
        eosin: Unit optical-density vector (R, G, B) of eosin.
        h_strength: Multiplier on haematoxylin amounts (dye batch, staining time).
        e_strength: Multiplier on eosin amounts.
        background: Light through bare glass per channel, 0-255.
        sharpness: Width in pixels of nuclear edges (focus): larger is softer.
        vignette: Fraction of light lost in the image corners.
    """

    haematoxylin: tuple[float, float, float] = unit_vector(STANDARD_HAEMATOXYLIN)
    eosin: tuple[float, float, float] = unit_vector(STANDARD_EOSIN)
    h_strength: float = 1.0
    e_strength: float = 1.0
    background: tuple[float, float, float] = (248.0, 248.0, 248.0)
    sharpness: float = 1.0
    vignette: float = 0.0

    @classmethod
    def for_hospital(cls, seed: int, hospital: int) -> StainProfile:
        """The profile of hospital number ``hospital`` (0 is ``H1``, nearest to standard H&E).

        The other labs differ in dye strengths along directions spread by the
        golden angle, so that no two of the first few labs stain alike.
        """
        rng = np.random.default_rng([seed, _STAIN_STREAM, hospital])
        spread = 0.15 if hospital == 0 else 1.0
        offset = np.random.default_rng([seed, _STAIN_STREAM]).uniform(0.0, 2 * np.pi)
        direction = offset + hospital * _GOLDEN_ANGLE
        strength = rng.uniform(0.25, 0.45) * spread
        # Camera white balance: a per-channel gain on the light.
        balance = 1.0 + np.array([_signed(rng, 0.015, 0.045) for _ in range(3)]) * spread
        light = np.clip(rng.uniform(236.0, 252.0) * balance, 220.0, 255.0)
        return cls(
            haematoxylin=rotate_vector(STANDARD_HAEMATOXYLIN, rng.uniform(6.0, 14.0) * spread, rng),
            eosin=rotate_vector(STANDARD_EOSIN, rng.uniform(6.0, 14.0) * spread, rng),
            h_strength=float(np.exp(strength * math.cos(direction))),
            e_strength=float(np.exp(strength * math.sin(direction))),
            background=tuple(float(v) for v in light),
            sharpness=float(rng.uniform(0.8, 1.0 + 0.8 * spread)),
            vignette=float(rng.uniform(0.0, 0.12 * spread)),
        )

    def jittered(self, rng: np.random.Generator, amount: float = 0.05) -> StainProfile:
        """A slide of this lab: stain strengths varied by about ``amount`` (relative)."""
        return StainProfile(
            self.haematoxylin,
            self.eosin,
            h_strength=self.h_strength * float(np.exp(rng.normal(0.0, amount))),
            e_strength=self.e_strength * float(np.exp(rng.normal(0.0, amount))),
            background=self.background,
            sharpness=self.sharpness,
            vignette=self.vignette,
        )


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    """A magnitude in [low, high) with a random sign."""
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


# ------------------------------------------------------------------ cue tables


@dataclass(frozen=True)
class _Architecture:
    """How glands are built at one architecture grade (Grades I and II)."""

    spacing: float  # distance between gland centres, in gland radii
    jitter: float  # centre jitter, in grid steps
    radius_cv: float  # spread of gland sizes
    aspect: tuple[float, float]  # range of long/short axis ratios
    wobble: float  # boundary irregularity
    wall: float  # epithelial wall thickness, fraction of the radius
    layers: int  # rows of nuclei along the wall (stratification)
    disorder: float  # loss of nuclear polarity: orientation noise in radians
    cribriform: float  # probability that a gland is cribriform
    debris: float  # eosinophilic debris in lumens ("dirty necrosis")


@dataclass(frozen=True)
class _NuclearLook:
    """How tumour nuclei look at one nuclear grade; lengths at 40x and 800 px."""

    radius: float  # mean area-equivalent radius
    radius_cv: float  # pleomorphism of size
    elongation: float  # mean long/short axis ratio
    elongation_cv: float  # pleomorphism of shape
    roughness: float  # boundary irregularity
    density: float  # haematoxylin concentration (hyperchromasia)
    chromatin: float  # amplitude of chromatin clumping
    mitoses: float  # fraction drawn as mitotic figures


_GLANDULAR = (
    _Architecture(2.7, 0.18, 0.18, (1.0, 1.5), 0.04, 0.30, 1, 0.08, 0.0, 0.03),
    _Architecture(1.9, 0.35, 0.30, (1.5, 2.8), 0.13, 0.42, 2, 0.5, 0.3, 0.15),
)
_SHEET_DEBRIS = 0.2
_NUCLEAR = (
    _NuclearLook(10.0, 0.08, 2.0, 0.10, 0.03, 0.80, 0.12, 0.0),
    _NuclearLook(13.0, 0.18, 1.6, 0.25, 0.08, 1.05, 0.25, 0.003),
    _NuclearLook(16.0, 0.28, 1.35, 0.40, 0.11, 1.25, 0.40, 0.025),
)


def draw_cue_grade(grade: int, rng: np.random.Generator) -> int:
    """A cue's grade: ``grade`` with probability ``CUE_AGREEMENT``, else an adjacent grade."""
    if rng.random() < CUE_AGREEMENT:
        return grade
    top = len(GRADE_NAMES) - 1
    if grade == 0 or grade == top:
        return 1 if grade == 0 else top - 1
    return grade - 1 if rng.random() < 0.5 else grade + 1


# ---------------------------------------------------------------- noise fields


def _noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth value noise in about [0, 1]: random grid values upsampled bicubically.

    Args:
        rng: Source of the grid values.
        size: Side of the square field.
        cells: Features across the field (clamped to [2, size]).
    """
    count = int(min(max(cells, 2), size))
    grid = rng.random((count, count), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def _layered_noise(rng: np.random.Generator, size: int, octaves: Sequence[tuple[float, float]]) -> np.ndarray:
    """A weighted sum of smooth noises, as ``sum(weight * _noise(rng, size, cells))``.

    The coarse layers are summed on the finest layer's small grid and the sum
    enlarged once, which saves a full-size resize per layer.

    Args:
        rng: Source of the grid values.
        size: Side of the square field.
        octaves: ``(cells, weight)`` pairs.
    """
    finest = int(min(max(max(cells for cells, _ in octaves), 2), size))
    total = np.zeros((finest, finest), np.float32)
    for cells, weight in octaves:
        total += np.float32(weight) * _noise(rng, finest, min(cells, finest))
    return np.asarray(Image.fromarray(total).resize((size, size), Image.BICUBIC))


def _fibres(rng: np.random.Generator, size: int, unit: float) -> tuple[np.ndarray, float]:
    """Streaky collagen texture in about [0, 1], and the direction of its streaks (radians).

    A small grid of random values, long along the fibres and short across
    them, is mapped onto a half-resolution image turned by a random angle, then
    enlarged: turning is the costly step and the texture is smooth anyway.
    """
    half = max(size // 2, 2)
    span = 1.42 * half  # the image diagonal, so the turned grid covers every corner
    across = int(min(max(span / max(2.0 * unit, 1.0), 2), half))
    along = int(max(span / max(35.0 * unit, 2.0), 2))
    theta = float(rng.uniform(0.0, np.pi))
    c, s = math.cos(theta), math.sin(theta)
    k_along, k_across, mid = along / span, across / span, half / 2.0
    # Output (x, y) -> grid (along, across): a rotation, a scaling and a shift.
    affine = (
        c * k_along,
        s * k_along,
        along / 2.0 - mid * (c + s) * k_along,
        -s * k_across,
        c * k_across,
        across / 2.0 - mid * (c - s) * k_across,
    )
    grid = Image.fromarray(rng.random((across, along), dtype=np.float32))
    turned = grid.transform((half, half), Image.AFFINE, affine, resample=Image.BILINEAR)
    return np.asarray(turned.resize((size, size), Image.BICUBIC)), theta


def _tissue_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft mask of the tissue section (ragged edges and holes, 65-95 % of the image).

    Returns:
        The mask and the smooth field it was cut from, which doubles as the
        section's thickness (thicker away from its edges).
    """
    field = _layered_noise(rng, size, ((4, 0.65), (9, 0.28), (40, 0.07)))
    # A tilt pushes the glass to one side, like the edge of a section.
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(0.0, 0.35)
    field = field + (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
    cut = np.quantile(field[::4, ::4], 1.0 - rng.uniform(0.65, 0.95))
    return np.clip((field - cut) * (size / 3.0) + 0.5, 0.0, 1.0), field


@lru_cache(maxsize=8)
def _radial(size: int) -> np.ndarray:
    """Squared distance from the image centre, 1 at the corners."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return (axis[None, :] ** 2 + axis[:, None] ** 2) / 2.0


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


# ---------------------------------------------------------------------- shapes


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


# --------------------------------------------------------------------- layouts


@dataclass
class _Layout:
    """Where the tissue compartments lie in one image."""

    epithelium: np.ndarray  # float [0, 1]: tumour cells (lumen overrides it)
    lumen: np.ndarray  # float [0, 1]: gland lumens
    solid: np.ndarray  # bool: epithelium packed with nuclei at random
    lining: np.ndarray  # (N, 3): x, y, orientation of nuclei lining gland walls


def _sample_glands(rng: np.random.Generator, size: int, radius: float, arch: _Architecture) -> _Glands:
    """Glands on a jittered grid that covers the image, each with its own shape."""
    step = arch.spacing * radius
    count = int(math.ceil(size / step)) + 2
    grid = (np.arange(count) - 1.0) * step
    gx, gy = (g.ravel() for g in np.meshgrid(grid, grid))
    n = gx.size
    gx = gx + rng.uniform(0, step) + rng.uniform(-arch.jitter, arch.jitter, n) * step
    gy = gy + rng.uniform(0, step) + rng.uniform(-arch.jitter, arch.jitter, n) * step
    r = radius * np.exp(np.clip(rng.normal(0.0, arch.radius_cv, n), -0.7, 0.7))
    aspect = rng.uniform(*arch.aspect, n)
    return _Glands(
        gx,
        gy,
        r * np.sqrt(aspect),
        r / np.sqrt(aspect),
        rng.uniform(0, np.pi, n),
        _wobble(rng, n, arch.wobble, 4),
        np.full(n, arch.wall),
        rng.random(n) < arch.cribriform,
    )


def _gland_points(glands: _Glands, rho: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of points at normalised radius ``rho`` and angle ``t`` of each gland.

    ``rho`` and ``t`` broadcast against (number of glands, points per gland).
    """
    cos_t, sin_t = np.cos(t), np.sin(t)
    h = glands.harmonics[..., None]
    alphas, betas = h[:, 0].transpose(1, 0, 2), h[:, 1].transpose(1, 0, 2)
    scale = rho * _harmonic_edge(cos_t, sin_t, alphas, betas)
    lx, ly = scale * cos_t * glands.a[:, None], scale * sin_t * glands.b[:, None]
    c, s = np.cos(glands.angle)[:, None], np.sin(glands.angle)[:, None]
    return glands.x[:, None] + lx * c - ly * s, glands.y[:, None] + lx * s + ly * c


def _lining(glands: _Glands, depth: np.ndarray, spacing: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Nuclei evenly spaced along one row of each gland wall: (N, 3) of x, y, orientation.

    Args:
        glands: The glands.
        depth: Normalised radius of each gland's row (1 is the outer boundary).
        spacing: Distance between neighbouring nuclei, px.
        jitter: Irregularity of the spacing, as a fraction of it.
        rng: Random source.
    """
    if len(glands) == 0:
        return np.zeros((0, 3))
    x, y = _gland_points(glands, depth[:, None], np.linspace(0.0, 2 * np.pi, 129))
    arc = np.cumsum(np.hypot(np.diff(x, axis=1), np.diff(y, axis=1)), axis=1)
    arc = np.concatenate([np.zeros((len(glands), 1)), arc], axis=1)
    length = arc[:, -1]
    count = np.maximum((length / spacing).astype(int), 3)
    owner = np.repeat(np.arange(len(glands)), count)
    rank = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    spots = rank + rng.random(len(glands))[owner] + rng.uniform(-jitter, jitter, owner.size)
    # One interpolation for all glands: their arcs are laid end to end.
    base = np.concatenate([[0.0], np.cumsum(length + 1.0)[:-1]])
    where = (spots * (length / count)[owner]) % length[owner] + base[owner]
    flat = (arc + base[:, None]).ravel()
    tx, ty = np.gradient(x, axis=1).ravel(), np.gradient(y, axis=1).ravel()
    # Columnar nuclei stand across the wall, so their long axis follows its normal.
    normal = np.arctan2(-np.interp(where, flat, tx), np.interp(where, flat, ty))
    return np.stack([np.interp(where, flat, x.ravel()), np.interp(where, flat, y.ravel()), normal], axis=1)


def _discs(x: np.ndarray, y: np.ndarray, radius: np.ndarray) -> _Glands:
    """Round shapes (used for small lumens)."""
    n = len(x)
    return _Glands(x, y, radius, radius, np.zeros(n), np.zeros((n, 2, 1)), np.zeros(n), np.zeros(n, bool))


def _cribriform_lumens(rng: np.random.Generator, glands: _Glands) -> _Glands:
    """The small punched-out lumens of the cribriform glands."""
    crib = glands.take(glands.cribriform)
    owner = np.repeat(np.arange(len(crib)), rng.integers(3, 9, len(crib)))
    hosts = crib.take(owner)
    # sqrt spreads the lumens evenly over the gland's area.
    rho = np.sqrt(rng.random(len(owner))) * 0.6
    x, y = _gland_points(hosts, rho[:, None], rng.uniform(0, 2 * np.pi, (len(owner), 1)))
    radius = np.minimum(hosts.a, hosts.b) * rng.uniform(0.1, 0.2, len(owner))
    return _discs(x[:, 0], y[:, 0], radius)


def _shade_glands(glands: _Glands, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    """Epithelium, lumen and cribriform (solid) maps of glands, with one-pixel soft edges."""
    px = np.minimum(glands.a, glands.b).astype(np.float32)[:, None, None]
    inside = np.clip((1.0 - rho) * px + 0.5, 0.0, 1.0)
    hollow_edge = (1.0 - glands.wall).astype(np.float32)[:, None, None]
    hollow = np.clip((hollow_edge - rho) * px + 0.5, 0.0, 1.0)
    crib = glands.cribriform[:, None, None]
    return [inside, np.where(crib, 0.0, hollow), inside * crib]


def _shade_discs(discs: _Glands, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    """Soft-edged fill of round shapes."""
    px = discs.a.astype(np.float32)[:, None, None]
    return [np.clip((1.0 - rho) * px + 0.5, 0.0, 1.0)]


def _coarse_glands(glands: _Glands, size: int) -> list[np.ndarray]:
    """Epithelium, lumen and cribriform maps of glands, drawn at reduced resolution.

    Glands are large and smooth, so their soft masks are drawn a few times
    smaller, enlarged, and their edges sharpened back to about a pixel.
    """
    factor = max(1, min(4, size // 128))
    small = size // factor + 1
    # Coarse pixel j stands for full pixel j * factor + (factor - 1) / 2 under PIL resizing.
    shift = (factor - 1) / 2
    shrunk = _Glands(
        (glands.x - shift) / factor,
        (glands.y - shift) / factor,
        glands.a / factor,
        glands.b / factor,
        glands.angle,
        glands.harmonics,
        glands.wall,
        glands.cribriform,
    )
    maps = []
    for layer in _rasterise(shrunk, small, _shade_glands, layers=3):
        if not layer.any():  # most images have no cribriform glands
            maps.append(np.zeros((size, size), np.float32))
            continue
        big = Image.fromarray(np.minimum(layer, 1.0)).resize((small * factor, small * factor), Image.BILINEAR)
        sharp = np.asarray(big)[:size, :size] * np.float32(factor)
        sharp += np.float32(0.5 - 0.5 * factor)
        maps.append(np.clip(sharp, 0.0, 1.0, out=sharp))
    return maps


def _gland_layout(rng: np.random.Generator, size: int, unit: float, arch: _Architecture, look: _NuclearLook) -> _Layout:
    """Glands (Grades I and II) with their lining nuclei."""
    glands = _sample_glands(rng, size, _GLAND_RADIUS * unit, arch)
    epithelium, lumen, crib = _coarse_glands(glands, size)
    (small,) = _rasterise(_cribriform_lumens(rng, glands), size, _shade_discs)
    # Lining nuclei sit side by side, short axes along the wall.
    spacing = 2.3 * look.radius * unit / math.sqrt(look.elongation)
    tubular = glands.take(~glands.cribriform)
    rows = []
    for layer in range(arch.layers):
        depth = 1.0 - tubular.wall * (0.28 + 0.32 * layer)
        row = _lining(tubular, depth, spacing, 0.06 + 0.25 * (arch.layers - 1), rng)
        row[:, 2] += rng.normal(0.0, arch.disorder, len(row))
        rows.append(row)
    return _Layout(np.minimum(epithelium, 1.0), np.minimum(lumen + small, 1.0), crib > 0.5, np.concatenate(rows))


def _sheet_layout(rng: np.random.Generator, size: int, unit: float) -> _Layout:
    """Solid sheets and nests of tumour cells (Grade III), with the odd abortive lumen."""
    radius = _GLAND_RADIUS * unit
    field = _layered_noise(rng, size, ((size / (1.5 * radius) + 2, 0.75), (size / (0.3 * radius) + 3, 0.25)))
    cut = np.quantile(field[::4, ::4], 1.0 - rng.uniform(0.65, 0.9))
    epithelium = np.clip((field - cut) * radius + 0.5, 0.0, 1.0)
    solid = epithelium > 0.5
    count = int(rng.poisson(0.25 * (size / (2.7 * radius)) ** 2))
    x, y = rng.uniform(0, size, count), rng.uniform(0, size, count)
    within = solid[y.astype(int), x.astype(int)]
    holes = _discs(x[within], y[within], radius * rng.uniform(0.06, 0.15, count)[within])
    (lumen,) = _rasterise(holes, size, _shade_discs)
    return _Layout(epithelium, np.minimum(lumen, 1.0), solid, np.zeros((0, 3)))


# ---------------------------------------------------------------------- nuclei


def _make_nuclei(
    rng: np.random.Generator,
    spots: np.ndarray,
    radius: float,
    radius_cv: float,
    elongation: float,
    elongation_cv: float,
    roughness: float,
    density: float,
    chromatin: float,
) -> _Nuclei:
    """Nuclei at ``spots`` ((N, 3): x, y, orientation), sizes and shapes drawn around the means."""
    n = len(spots)
    r = radius * np.exp(np.clip(rng.normal(0.0, radius_cv, n), -0.7, 0.7))
    e = 1.0 + (elongation - 1.0) * np.exp(rng.normal(0.0, elongation_cv, n))
    # Darker nuclei also vary more in darkness: hyperchromasia is patchy.
    dens = density * np.exp(rng.normal(0.0, 0.05 + radius_cv / 3, n))
    return _Nuclei(
        spots[:, 0],
        spots[:, 1],
        r * np.sqrt(e),
        r / np.sqrt(e),
        spots[:, 2],
        _wobble(rng, n, roughness, 1),
        dens,
        np.full(n, chromatin),
    )


def _tumour_nuclei(rng: np.random.Generator, spots: np.ndarray, look: _NuclearLook, unit: float) -> _Nuclei:
    """Tumour nuclei of one nuclear grade; a fraction become mitotic figures."""
    nuclei = _make_nuclei(
        rng,
        spots,
        look.radius * unit,
        look.radius_cv,
        look.elongation,
        look.elongation_cv,
        look.roughness,
        look.density,
        look.chromatin,
    )
    mitotic = rng.random(len(spots)) < look.mitoses
    # A metaphase plate: a small, ragged, very dark bar.
    nuclei.a[mitotic] *= 0.9
    nuclei.b[mitotic] *= 0.35
    nuclei.density[mitotic] *= 2.2
    nuclei.harmonics[mitotic] = _wobble(rng, int(mitotic.sum()), 0.3, 1)
    return nuclei


def _scatter(rng: np.random.Generator, mask: np.ndarray, spacing: float, keep: float = 1.0) -> np.ndarray:
    """Points on a jittered grid inside a boolean mask: (N, 3) of x, y, random orientation."""
    size = mask.shape[0]
    spacing = max(spacing, 0.5)
    axis = np.arange(0.0, size, spacing) + rng.uniform(0, spacing)
    gx, gy = (g.ravel() for g in np.meshgrid(axis, axis))
    gx = gx + rng.uniform(-0.45, 0.45, gx.size) * spacing
    gy = gy + rng.uniform(-0.45, 0.45, gy.size) * spacing
    inside = mask[np.clip(gy, 0, size - 1).astype(int), np.clip(gx, 0, size - 1).astype(int)]
    inside &= rng.random(gx.size) < keep
    angle = rng.uniform(0.0, np.pi, int(inside.sum()))
    return np.stack([gx[inside], gy[inside], angle], axis=1)


def _stromal_nuclei(rng: np.random.Generator, stroma: np.ndarray, unit: float, fibre_angle: float) -> _Nuclei:
    """Fibroblasts (slim, along the fibres) and lymphocytes (small, round, dark) in the stroma."""
    spots = _scatter(rng, stroma, 40.0 * unit, keep=0.55)
    lymph = rng.random(len(spots)) < 0.4
    spots[~lymph, 2] = fibre_angle + rng.normal(0.0, 0.25, int((~lymph).sum()))
    fibro = _make_nuclei(rng, spots[~lymph], 7.0 * unit, 0.15, 4.0, 0.3, 0.05, 0.9, 0.1)
    lymphs = _make_nuclei(rng, spots[lymph], 5.5 * unit, 0.08, 1.1, 0.2, 0.03, 1.45, 0.05)
    return _Nuclei.join([fibro, lymphs])


def _nuclear_haematoxylin(nuclei: _Nuclei, size: int, grain: np.ndarray, sharpness: float) -> np.ndarray:
    """Haematoxylin of the nuclei; overlapping nuclei add up, as optical densities do.

    Args:
        nuclei: The nuclei.
        size: Side of the square image.
        grain: Noise in [0, 1] (size x size) read as chromatin texture.
        sharpness: Width of the nuclear edge in px.
    """
    # Nuclei of a pixel or two show no shape: their dye is spread over a few pixels.
    tiny = nuclei.a * nuclei.b < 4.0
    dots = nuclei.take(tiny)
    hema = np.zeros((size, size), np.float32)
    if len(dots):
        hema += _splat(dots.x, dots.y, dots.density * np.pi * dots.a * dots.b, size)
    nuclei = nuclei.take(~tiny)
    texture = grain.ravel()

    def shade(part: _Nuclei, rho: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
        f32 = np.float32
        edge = (part.b / sharpness).astype(f32)[:, None, None]
        fill = np.clip((1.0 - rho) * edge + f32(0.5), 0.0, 1.0)
        # A slightly darker rim for the nuclear membrane...
        rim = np.minimum(rho, 1.0)
        rim *= rim
        fill *= rim * f32(0.3) + f32(0.8)
        # ...and chromatin clumps: density * (1 + chromatin * (2 * texture - 1)).
        clumps = (2.0 * part.density * part.chromatin).astype(f32)[:, None, None]
        dye = (texture[index] - f32(0.5)) * clumps + part.density.astype(f32)[:, None, None]
        return [fill * dye]

    return hema + _rasterise(nuclei, size, shade)[0]


def _splat(x: np.ndarray, y: np.ndarray, mass: np.ndarray, size: int) -> np.ndarray:
    """Spread point masses over their four nearest pixels, then over a 3x3 neighbourhood."""
    col, row = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - col, y - row
    canvas = np.zeros(size * size)
    for dr, dc, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        r, c = row + dr, col + dc
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        canvas += np.bincount(r[ok] * size + c[ok], (mass * weight)[ok], minlength=size * size)
    spots = canvas.reshape(size, size).astype(np.float32)
    # A [1, 2, 1] / 4 blur along each axis gives each dot a nucleus-sized footprint.
    for axis in (0, 1):
        spots = _blur121(spots, axis)
    return spots


def _blur121(image: np.ndarray, axis: int) -> np.ndarray:
    """Smooth along one axis with weights [1, 2, 1] / 4, repeating the edge pixels."""
    padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(2)], mode="edge")
    lead = [slice(None)] * 2
    parts = []
    for start in (0, 1, 2):
        lead[axis] = slice(start, start + image.shape[axis])
        parts.append(padded[tuple(lead)])
    return 0.25 * parts[0] + 0.5 * parts[1] + 0.25 * parts[2]


# ------------------------------------------------------------------- rendering


def render_image(
    grade: int,
    magnification: str,
    stain: StainProfile,
    rng: np.random.Generator,
    size: int,
    *,
    architecture: int | None = None,
    nuclear: int | None = None,
) -> np.ndarray:
    """Render one H&E-like image of a tumour of the given grade.

    Args:
        grade: True grade, 0-based (index into ``GRADE_NAMES``).
        magnification: One of the keys of the magnification scale (``"4x"`` ... ``"40x"``).
        stain: The lab's staining and optics.
        rng: Source of every random draw.
        size: Side of the square image in pixels.
        architecture: Grade shown by the gland architecture; drawn with
            ``draw_cue_grade`` when omitted.
        nuclear: Grade shown by the nuclei; drawn likewise when omitted.

    Returns:
        An ``size`` x ``size`` x 3 uint8 RGB image.
    """
    if not 0 <= grade < len(GRADE_NAMES):
        raise ValueError(f"grade must be in [0, {len(GRADE_NAMES) - 1}]; got {grade!r}")
    if magnification not in _MAG_SCALE:
        raise ValueError(f"magnification must be one of {tuple(_MAG_SCALE)}; got {magnification!r}")
    for name, cue in (("architecture", architecture), ("nuclear", nuclear)):
        if cue is not None and not 0 <= cue < len(GRADE_NAMES):
            raise ValueError(f"{name} must be None or in [0, {len(GRADE_NAMES) - 1}]; got {cue!r}")
    arch = draw_cue_grade(grade, rng) if architecture is None else architecture
    nuc = draw_cue_grade(grade, rng) if nuclear is None else nuclear
    unit = size / _REFERENCE_SIZE * _MAG_SCALE[magnification]
    look = _NUCLEAR[nuc]
    # The section outline comes first, so it does not depend on the grades.
    tissue, thickness = _tissue_mask(rng, size)
    if arch < len(_GLANDULAR):
        layout = _gland_layout(rng, size, unit, _GLANDULAR[arch], look)
    else:
        layout = _sheet_layout(rng, size, unit)
    hema, eos, grain, stroma, fibre_angle = _background_stains(rng, layout, unit, arch)
    packed = _scatter(rng, layout.solid, 2.25 * look.radius * unit)
    spots = np.concatenate([layout.lining, packed])
    spots = _outside_lumens(spots, layout.lumen)
    nuclei = _Nuclei.join([_tumour_nuclei(rng, spots, look, unit), _stromal_nuclei(rng, stroma, unit, fibre_angle)])
    hema += _nuclear_haematoxylin(nuclei, size, grain, stain.sharpness)
    # Thicker parts of the section hold more of both stains.
    tissue *= 0.85 + 0.3 * np.clip(thickness, 0.0, 1.0)
    return _to_rgb(hema * tissue, eos * tissue, stain, rng)


def _outside_lumens(spots: np.ndarray, lumen: np.ndarray) -> np.ndarray:
    """The spots that do not fall in a lumen (fused glands swallow each other's walls)."""
    size = lumen.shape[0]
    col = np.clip(spots[:, 0], 0, size - 1).astype(int)
    row = np.clip(spots[:, 1], 0, size - 1).astype(int)
    return spots[lumen[row, col] < 0.5]


def _background_stains(
    rng: np.random.Generator, layout: _Layout, unit: float, arch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Stain amounts of stroma, cytoplasm and lumen contents, before nuclei and tissue mask.

    Returns:
        Haematoxylin and eosin maps, the chromatin/cytoplasm grain, the stroma
        mask (bool) and the direction of the collagen fibres.
    """
    size = layout.lumen.shape[0]
    fibres, fibre_angle = _fibres(rng, size, unit)
    grain = _noise(rng, size, size / max(3.0 * unit, 1.0))
    lumen = layout.lumen
    cells = layout.epithelium * (1.0 - lumen)
    stroma = np.clip(1.0 - cells - lumen, 0.0, 1.0)
    # Bundles of collagen with pale gaps, broken up by the finer grain.
    collagen = np.clip((0.75 * fibres + 0.25 * grain) * 2.0 - 0.5, 0.0, 1.0)
    debris = _GLANDULAR[arch].debris if arch < len(_GLANDULAR) else _SHEET_DEBRIS
    eos = stroma * (0.28 + 0.4 * collagen) + cells * (0.2 + 0.12 * grain) + lumen * debris * grain
    hema = stroma * (0.01 + 0.02 * collagen) + cells * (0.1 + 0.04 * grain) + lumen * 0.02
    return hema, eos, grain, stroma > 0.5, fibre_angle


def _to_rgb(hema: np.ndarray, eos: np.ndarray, stain: StainProfile, rng: np.random.Generator) -> np.ndarray:
    """Light through the stained section (Beer-Lambert), with vignetting and sensor noise."""
    size = hema.shape[0]
    grit = (rng.random(hema.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.04)
    hema = np.maximum(hema + grit, 0.0) * np.float32(stain.h_strength)
    eos = np.maximum(eos + grit, 0.0) * np.float32(stain.e_strength)
    light = (1.0 - stain.vignette * _radial(size)).astype(np.float32)
    rgb = np.empty((size, size, 3), np.uint8)
    for channel in range(3):
        od = hema * np.float32(-stain.haematoxylin[channel])
        od -= eos * np.float32(stain.eosin[channel])
        value = np.exp(od, out=od)
        value *= light
        value *= np.float32(stain.background[channel])
        value += np.float32(0.5)
        rgb[..., channel] = np.clip(value, 0.0, 255.0, out=value)
    return rgb


# ------------------------------------------------------------------ generation


@dataclass(frozen=True)
class PlannedImage:
    """One image to write, and its manifest row."""

    grade: int
    magnification: str
    hospital: int  # 0-based; named H1, H2, ...
    patient: int  # 0-based within the hospital
    image: int  # 0-based within the patient

    @property
    def hospital_name(self) -> str:
        """``H1``, ``H2``, ..."""
        return f"H{self.hospital + 1}"

    @property
    def patient_id(self) -> str:
        """Patient identifier, unique across hospitals, e.g. ``H1-P007``."""
        return f"{self.hospital_name}-P{self.patient + 1:03d}"

    @property
    def relpath(self) -> str:
        """Path relative to the dataset root, with forward slashes."""
        stem = self.patient_id.replace("-", "_")
        name = f"{stem}_{self.magnification}_{self.image + 1}.jpg"
        return f"{CLASS_FOLDERS[self.grade]}/{self.magnification}/{name}"

    def row(self) -> dict[str, str]:
        """The manifest row."""
        return {
            "path": self.relpath,
            "label": str(self.grade),
            "magnification": self.magnification,
            "patient": self.patient_id,
            "hospital": self.hospital_name,
        }


def plan(spec: SyntheticSpec) -> list[PlannedImage]:
    """Every image of the dataset, in writing order.

    Each hospital numbers its patients grade by grade; a patient's images
    cycle through the magnifications, starting at a patient-dependent one so
    that magnifications stay balanced when there are fewer images than
    magnifications.
    """
    mags = spec.magnifications
    items = []
    for hospital in range(spec.num_hospitals):
        for grade in range(len(GRADE_NAMES)):
            for k in range(spec.patients_per_grade):
                patient = grade * spec.patients_per_grade + k
                items.extend(
                    PlannedImage(grade, mags[(patient + i) % len(mags)], hospital, patient, i)
                    for i in range(spec.images_per_patient)
                )
    return items


def render_item(spec: SyntheticSpec, item: PlannedImage) -> bytes:
    """The JPEG bytes of one planned image; depends only on the spec and the item."""
    stain = StainProfile.for_hospital(spec.seed, item.hospital)
    # One slide per patient: its staining varies a little around the lab's.
    slide = np.random.default_rng([spec.seed, _SLIDE_STREAM, item.hospital, item.patient])
    stain = stain.jittered(slide)
    rng = np.random.default_rng([spec.seed, _IMAGE_STREAM, item.hospital, item.patient, item.image])
    pixels = render_image(item.grade, item.magnification, stain, rng, spec.image_size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=spec.jpeg_quality)
    return buffer.getvalue()


def generate(root: str | os.PathLike, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Render the dataset under ``root`` (idempotent) and return ``root/manifest.csv``.

    A finished dataset (manifest present, ``spec.json`` equal to this spec) is
    returned at once. An interrupted one with the same spec is resumed: images
    are written whole (temporary file, then rename) and the manifest last, so
    only a complete dataset has a manifest.

    Args:
        root: Dataset folder; created if missing.
        spec: What to render.
        progress: Show a progress bar.

    Raises:
        FileExistsError: If ``root`` holds files but no ``spec.json`` (it is
            not a synthetic dataset), or a finished dataset of another spec.
    """
    root = Path(root)
    manifest = root / MANIFEST_NAME
    document = spec_document(spec)
    if manifest.is_file() and _spec_on_disk(root) == document:
        return manifest  # finished: no lock needed, so a read-only copy serves too
    with exclusive(root):  # ranks or runs sharing the cache: one renders, the others wait
        return _render(root, spec, document, progress)


def _render(root: Path, spec: SyntheticSpec, document: dict, progress: bool) -> Path:
    """``generate`` under the lock: claim the folder, render what is missing, write the manifest last."""
    manifest = root / MANIFEST_NAME
    resume = _claim(root, document)
    if resume and manifest.is_file():
        return manifest
    items = plan(spec)
    for item in _progress(items, progress):
        path = root / item.relpath
        if not (resume and path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, render_item(spec, item))
    _remove_strays(root, {item.relpath for item in items})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(item.row() for item in items)
    write_atomic(manifest, text.getvalue().encode("utf-8"))
    return manifest


def _claim(root: Path, document: dict) -> bool:
    """Make ``root`` ours for this spec; True if it already was (so files can be kept).

    Raises:
        FileExistsError: See ``generate``.
    """
    spec_path = root / SPEC_NAME
    if spec_path.is_file():
        if _spec_on_disk(root) == document:
            return True
        if (root / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{root} holds a synthetic dataset of another spec; delete it or choose another folder"
            )
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and has no {SPEC_NAME}; refusing to write a synthetic dataset into it"
        )
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_atomic(spec_path, text.encode("utf-8"))
    return False


def _spec_on_disk(root: Path) -> dict | None:
    """The spec document saved in ``root``; None when missing or unreadable."""
    try:
        return json.loads((root / SPEC_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_strays(root: Path, keep: set[str]) -> None:
    """Delete images left in our class folders by an interrupted run of another spec."""
    for folder in CLASS_FOLDERS:
        for path in (root / folder).glob("*/*.jpg"):
            if path.relative_to(root).as_posix() not in keep:
                path.unlink()


def _progress(items: list[PlannedImage], enabled: bool) -> Iterator[PlannedImage]:
    """The items, behind a tqdm progress bar when enabled."""
    if not enabled:
        return iter(items)
    from tqdm import tqdm  # only needed for the bar

    return iter(tqdm(items, desc="synthetic CRC-HGD", unit="img"))
