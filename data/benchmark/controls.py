"""Controls with known answers: what colour alone, and what a perfect reader, can get.

* :func:`colour_features` -- 55 numbers per patch with no spatial information:
  mean and spread of optical density per channel, the tissue fraction, and
  16-bin RGB histograms over tissue. :func:`fit_logistic` fits a multinomial
  logistic regression with an L2 penalty by L-BFGS (``scipy.optimize``). Fed
  grades it is the colour control (must stay near chance, <= 0.40); fed
  hospital names it shows that site identity stays decodable from colour.
* :func:`oracle_grades` -- the grade rule applied to component levels: on the
  shown levels it is a perfect reader of the images and reaches the ceiling
  set by the rendering noise (:func:`data.benchmark.design.ceiling`).
* :func:`single_component_oracle` -- the best reader of one component alone,
  at most 5/9 on balanced data.
* :func:`chance_upper` and friends -- the binomial bounds the tests use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy.stats import norm

from data.benchmark.design import BenchmarkSpec, centre_box, grade_of
from data.images import load_rgb
from data.patches import PatchSpec, extract_pairs

#: Optical density above which a pixel counts as tissue (Macenko's beta, on the mean over channels).
TISSUE_OD = 0.15
BINS = 16


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``-ln((I + 1) / 256)`` per channel, float32 (H, W, 3)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """55 colour statistics of one uint8 RGB patch: no spatial information.

    Mean OD (3) and OD standard deviation (3) over tissue, tissue fraction (1),
    and per channel a 16-bin histogram of the 0-255 values over tissue (48),
    normalised to sum to one.
    """
    od = optical_density(rgb).reshape(-1, 3)
    pixels = rgb.reshape(-1, 3)
    tissue = od.mean(axis=1) > TISSUE_OD
    if not tissue.any():
        tissue = np.ones(len(od), bool)
    od, pixels = od[tissue], pixels[tissue]
    hists = [np.bincount(pixels[:, c] // (256 // BINS), minlength=BINS) / len(pixels) for c in range(3)]
    return np.concatenate([od.mean(axis=0), od.std(axis=0), [tissue.mean()], *hists]).astype(np.float64)


def patch_spec(spec: BenchmarkSpec) -> PatchSpec:
    """``data.patches``' spec for this benchmark's geometry."""
    return PatchSpec(context_size=spec.context, detail_size=spec.detail, context_fov=spec.context_fov, min_tissue=0.0)


def centres_in_box(spec: BenchmarkSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (row, col) patch centres drawn uniformly where the context window stays inside the tile."""
    low, high = centre_box(spec)
    return rng.integers(low, high + 1, size=(count, 2))


def tile_centre(spec: BenchmarkSpec) -> np.ndarray:
    """The tile's centre as one (row, col) centre: the patch pair the controls read."""
    return np.array([[spec.tile_size // 2, spec.tile_size // 2]])


def pair_features(rgb: np.ndarray, spec: BenchmarkSpec, centres: np.ndarray | None = None) -> np.ndarray:
    """Colour features of the context and detail patches cut at the tile centre (110 numbers)."""
    contexts, details = extract_pairs(rgb, tile_centre(spec) if centres is None else centres, patch_spec(spec))
    return np.concatenate([colour_features(contexts[0]), colour_features(details[0])])


@dataclass
class ControlData:
    """Features and truths of the tiles of a rendered dataset (one row per manifest row)."""

    features: np.ndarray  # (n, 110)
    grade: np.ndarray
    arch: np.ndarray
    nuclear: np.ndarray
    arch_shown: np.ndarray
    nuclear_shown: np.ndarray
    hospital: np.ndarray  # names
    split: np.ndarray

    def take(self, keep: np.ndarray) -> ControlData:
        return ControlData(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


def control_data(root: str | os.PathLike, spec: BenchmarkSpec) -> ControlData:
    """Read every tile of a rendered dataset and compute its colour features."""
    from data.benchmark.dataset import read_manifest_rows

    rows = read_manifest_rows(root)
    feats = np.stack([pair_features(load_rgb(Path(root) / r["path"]), spec) for r in rows])
    ints = {
        c: np.array([int(r[c]) for r in rows])
        for c in ("label", "arch_level", "nuclear_level", "arch_shown", "nuclear_shown")
    }
    return ControlData(
        feats,
        ints["label"],
        ints["arch_level"],
        ints["nuclear_level"],
        ints["arch_shown"],
        ints["nuclear_shown"],
        np.array([r["hospital"] for r in rows]),
        np.array([r["split"] for r in rows]),
    )


@dataclass
class LogisticModel:
    """A fitted multinomial logistic regression on standardised features."""

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (features + 1, classes), last row the bias

    def scores(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, float) - self.mean) / self.scale
        return z @ self.weights[:-1] + self.weights[-1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.scores(x), axis=1)]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 500) -> LogisticModel:
    """Multinomial logistic regression: mean cross-entropy + ``l2 / n * ||W||^2`` (bias free), by L-BFGS.

    Features are standardised first (constant ones are left at zero), so one
    penalty fits all of them.
    """
    x = np.asarray(x, float)
    classes, target = np.unique(np.asarray(y), return_inverse=True)
    n, d = x.shape
    k = len(classes)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((n, 1))])
    onehot = np.eye(k)[target]
    penalty = np.ones((d + 1, 1))
    penalty[-1] = 0.0

    def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(d + 1, k)
        logits = z @ w
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        value = -(onehot * log_p).sum() / n + l2 / n * float((penalty * w * w).sum())
        grad = z.T @ (np.exp(log_p) - onehot) / n + 2 * l2 / n * penalty * w
        return value, grad.ravel()

    result = optimize.minimize(loss, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return LogisticModel(classes, mean, scale, result.x.reshape(d + 1, k))


def colour_control(
    data: ControlData, target: str = "grade", train: str = "train", l2: float = 1.0
) -> tuple[LogisticModel, np.ndarray]:
    """Fit colour features -> ``target`` (``grade`` or ``hospital``) on one split; predictions for every row."""
    fit_rows = data.split == train
    model = fit_logistic(data.features[fit_rows], getattr(data, target)[fit_rows], l2)
    return model, model.predict(data.features)


def oracle_grades(arch, nuclear) -> np.ndarray:
    """The grade rule on component levels (read the shown ones for the ceiling, the true ones for 100 %)."""
    return np.asarray(grade_of(np.asarray(arch), np.asarray(nuclear)))


def single_component_oracle(levels) -> np.ndarray:
    """Best grade guess from one component alone when the other is uniform: 0 -> I, 1 -> II, 2 -> III.

    Level 0 leaves Grades I, I, II (guess I), level 2 leaves II, III, III
    (guess III) and level 1 leaves one of each, so the guess is right 5/9 of
    the time on balanced data; no reader of one component does better.
    """
    return np.asarray(levels).copy()


def accuracy(predicted, truth) -> float:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    return float((predicted == truth).mean()) if len(truth) else float("nan")


def binomial_halfwidth(p: float, n: int, z: float) -> float:
    """``z`` standard errors of an accuracy ``p`` measured on ``n`` independent tiles."""
    return z * math.sqrt(p * (1 - p) / max(n, 1))


def chance_upper(n: int, classes: int = 3, level: float = 0.01) -> float:
    """Accuracy that a classifier at chance exceeds on ``n`` tiles with probability ``level`` (normal approximation)."""
    p = 1.0 / classes
    return p + binomial_halfwidth(p, n, float(norm.ppf(1 - level)))
