"""Hospitals that differ the way sites do, and which tiles each one holds.

Every knob is drawn independently: each (knob, hospital) pair has its own
random stream. Across the training hospitals each knob is spread by a Latin
hypercube (hospital ``h`` draws from its own stratum of the range, strata
shuffled per knob), so that with three hospitals one is near each end of every
range: one site really is blurred enough to degrade the nuclear cue.

The knobs, per training hospital:

* stain vectors: haematoxylin and eosin each turned 0-15 degrees from
  Ruifrok & Johnston's, towards a random direction;
* dye gains: haematoxylin and eosin amounts times 0.7-1.4 (log-uniform);
* glass: brightness 232-252 and a tint of up to 4 % per channel;
* scanner blur: Gaussian, sigma 0-1.5 px;
* JPEG quality 85-97 (4:4:4, no chroma subsampling);
* grade mix of the training and validation tiles: ``Dirichlet(alpha)``
  (``alpha = 0``: balanced); with ``confound`` the darkest-staining site
  (largest haematoxylin gain) has its mix pulled towards Grade III;
* size: its share of the training and validation tiles (``spec.sizes``).

``HOLDOUT`` stains as no training site does (both vectors turned 20-25 degrees,
haematoxylin x1.45-1.55, eosin x0.62-0.68) and only has test tiles.

All of it comes from ``spec.test_seed``, not the data seed: the test images
must stay the same while the training tiles are redrawn, and a test image is
its hospital's staining of its tissue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from data.benchmark.design import (
    HELDOUT,
    LEVELS,
    SHARE_STREAM,
    SITE_STREAM,
    BenchmarkSpec,
    Tile,
    balanced_levels,
    hospital_code,
    make_tiles,
    skewed_levels,
)
from data.sites import STANDARD_EOSIN, STANDARD_HAEMATOXYLIN, rotate_vector, unit_vector
from data.splits import apportion

MAX_TURN, GAIN_RANGE, BLUR_MAX, JPEG_RANGE = 15.0, (0.7, 1.4), 1.5, (85, 97)
BRIGHTNESS_RANGE, MAX_TINT = (232.0, 252.0), 0.04
#: Grade mix the confounded site is pulled halfway towards.
CONFOUND_MIX = (0.1, 0.2, 0.7)
_KNOBS = ("turn_h", "turn_e", "gain_h", "gain_e", "brightness", "tint", "blur", "jpeg")


@dataclass(frozen=True)
class HospitalProfile:
    """How one site stains, scans and compresses, and what it holds.

    Attributes:
        name: ``H1`` ... or ``HOLDOUT``.
        haematoxylin, eosin: Unit optical-density vectors (R, G, B).
        h_gain, e_gain: Multipliers on the dye amounts.
        glass: Light through bare glass per channel, 0-255.
        blur_sigma: Scanner blur, px.
        jpeg_quality: JPEG quality of the written tiles.
        grade_mix: Shares of Grades I-III among its training and validation tiles.
        size: Share of all training and validation tiles (0 for ``HOLDOUT``).
    """

    name: str
    haematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    h_gain: float
    e_gain: float
    glass: tuple[float, float, float]
    blur_sigma: float
    jpeg_quality: int
    grade_mix: tuple[float, float, float]
    size: float

    def describe(self) -> str:
        """One line for logs."""
        mix = "/".join(f"{s:.2f}" for s in self.grade_mix)
        return (
            f"{self.name}: H x{self.h_gain:.2f}, E x{self.e_gain:.2f}, glass "
            f"{'/'.join(f'{v:.0f}' for v in self.glass)}, blur {self.blur_sigma:.2f} px, "
            f"JPEG q{self.jpeg_quality}, grade mix {mix}, size {self.size:.2f}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _strata(spec: BenchmarkSpec) -> dict[str, np.ndarray]:
    """Per knob, a value in [0, 1) for every training hospital, one per stratum of the range."""
    n = spec.hospitals
    out = {}
    for k, knob in enumerate(_KNOBS):
        order = np.random.default_rng([spec.test_seed, SITE_STREAM, k]).permutation(n)
        within = [np.random.default_rng([spec.test_seed, SITE_STREAM, k, h]).random() for h in range(n)]
        out[knob] = (order + np.asarray(within)) / n
    return out


def _log_between(low: float, high: float, u: float) -> float:
    return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))


def _glass(brightness: float, tint: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Glass light: a grey level times a tint of relative size ``tint`` in a random off-grey direction."""
    direction = rng.standard_normal(3)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction) or 1.0
    light = np.clip(brightness * (1.0 + tint * direction * math.sqrt(1.5)), 200.0, 255.0)
    return tuple(float(v) for v in light)


def _mix(spec: BenchmarkSpec, h: int) -> tuple[float, ...]:
    """A training hospital's grade mix: ``Dirichlet(alpha)`` from its own stream, or balanced."""
    if spec.alpha == 0:
        return (1 / 3, 1 / 3, 1 / 3)
    shares = np.random.default_rng([spec.test_seed, SHARE_STREAM, h]).dirichlet([spec.alpha] * len(LEVELS))
    return tuple(float(s) for s in shares)


def training_profiles(spec: BenchmarkSpec) -> list[HospitalProfile]:
    """Profiles of ``H1`` ... ``Hn`` (see the module docstring)."""
    u = _strata(spec)
    total = float(sum(spec.sizes))
    profiles = []
    for h in range(spec.hospitals):
        turn = np.random.default_rng([spec.test_seed, SITE_STREAM, 100, h])
        profiles.append(
            HospitalProfile(
                name=f"H{h + 1}",
                haematoxylin=rotate_vector(STANDARD_HAEMATOXYLIN, MAX_TURN * u["turn_h"][h], turn),
                eosin=rotate_vector(STANDARD_EOSIN, MAX_TURN * u["turn_e"][h], turn),
                h_gain=_log_between(*GAIN_RANGE, u["gain_h"][h]),
                e_gain=_log_between(*GAIN_RANGE, u["gain_e"][h]),
                glass=_glass(
                    BRIGHTNESS_RANGE[0] + u["brightness"][h] * (BRIGHTNESS_RANGE[1] - BRIGHTNESS_RANGE[0]),
                    MAX_TINT * u["tint"][h],
                    turn,
                ),
                blur_sigma=float(BLUR_MAX * u["blur"][h]),
                jpeg_quality=int(round(JPEG_RANGE[1] - u["jpeg"][h] * (JPEG_RANGE[1] - JPEG_RANGE[0]))),
                grade_mix=_mix(spec, h),
                size=spec.sizes[h] / total,
            )
        )
    if spec.confound:
        dark = max(range(len(profiles)), key=lambda i: (profiles[i].h_gain, -i))
        mix = [0.5 * s + 0.5 * c for s, c in zip(profiles[dark].grade_mix, CONFOUND_MIX)]
        profiles[dark] = _replace_mix(profiles[dark], mix)
    return profiles


def _replace_mix(profile: HospitalProfile, mix) -> HospitalProfile:
    values = profile.to_dict()
    values["grade_mix"] = tuple(float(m) / float(sum(mix)) for m in mix)
    return HospitalProfile(**values)


def heldout_profile(spec: BenchmarkSpec) -> HospitalProfile:
    """The held-out site: a stain outside every training range (see the module docstring)."""
    rng = np.random.default_rng([spec.test_seed, SITE_STREAM, 200])
    return HospitalProfile(
        name=HELDOUT,
        haematoxylin=rotate_vector(STANDARD_HAEMATOXYLIN, rng.uniform(20.0, 25.0), rng),
        eosin=rotate_vector(STANDARD_EOSIN, rng.uniform(20.0, 25.0), rng),
        h_gain=float(rng.uniform(1.45, 1.55)),
        e_gain=float(rng.uniform(0.62, 0.68)),
        glass=_glass(float(rng.uniform(236.0, 246.0)), MAX_TINT, rng),
        blur_sigma=float(rng.uniform(0.5, 1.0)),
        jpeg_quality=int(rng.integers(85, 96)),
        grade_mix=(1 / 3, 1 / 3, 1 / 3),
        size=0.0,
    )


def profiles(spec: BenchmarkSpec) -> dict[str, HospitalProfile]:
    """Every hospital's profile by name, ``HOLDOUT`` last."""
    out = {p.name: p for p in training_profiles(spec)}
    out[HELDOUT] = heldout_profile(spec)
    return out


def standard_profile() -> HospitalProfile:
    """Ruifrok & Johnston's stains, no blur, no tint: for looking at the tissue itself."""
    return HospitalProfile(
        "standard",
        unit_vector(STANDARD_HAEMATOXYLIN),
        unit_vector(STANDARD_EOSIN),
        1.0,
        1.0,
        (245.0, 245.0, 245.0),
        0.0,
        95,
        (1 / 3, 1 / 3, 1 / 3),
        0.0,
    )


def plan(spec: BenchmarkSpec) -> list[Tile]:
    """Every tile of the dataset, in writing order (hospital, then split).

    Test tiles (training hospitals and ``HOLDOUT``) cover the nine (A, N)
    combinations equally and are drawn from ``test_seed``. Training and
    validation tiles follow each hospital's size and grade mix, with (A, N)
    drawn uniformly within each grade from the data seed.
    """
    sites = profiles(spec)
    train_counts = apportion(spec.train * spec.hospitals, spec.sizes)
    val_counts = apportion(spec.val * spec.hospitals, spec.sizes)
    tiles: list[Tile] = []
    for h, name in enumerate(spec.hospital_names):
        for split, count in (("train", train_counts[h]), ("val", val_counts[h])):
            rng = np.random.default_rng([spec.seed, SHARE_STREAM, hospital_code(name), 1 + (split == "val")])
            tiles += make_tiles(spec, name, split, skewed_levels(apportion(count, sites[name].grade_mix), rng))
        tiles += _test_tiles(spec, name, spec.test)
    return tiles + _test_tiles(spec, HELDOUT, spec.heldout)


def _test_tiles(spec: BenchmarkSpec, name: str, count: int) -> list[Tile]:
    rng = np.random.default_rng([spec.test_seed, SHARE_STREAM, hospital_code(name), 3])
    return make_tiles(spec, name, "test", balanced_levels(count, rng))
