"""What the benchmark is made of: the grade rule, the rendering noise, the presets and their geometry.

The grade is a composite of two independent components, as Nottingham-style
grading sums component scores:

* ``A``, the architecture level (0, 1, 2): how much of each pale space is a
  gland lumen ringed by polarised epithelium (> 95 % / 50-95 % / < 50 % of its
  border, the WHO gland-formation cut-offs applied to every gland unit). It is
  drawn at the scale of gland units about 2.6 detail fields apart, so a detail
  window sees part of one unit and a context window sees whole units.
* ``N``, the nuclear level (0, 1, 2): chromatin texture, nucleoli and membrane
  irregularity at the 1-3 px scale, with the haematoxylin of every nucleus and
  its area drawn from one distribution for all levels, so the cue averages out
  when the context field is shrunk 4x.

``grade = I if A + N <= 1, II if A + N == 2, III if A + N >= 3``. With A and N
independent and uniform the grades are balanced, either component alone
predicts the grade at most 5/9 of the time, and both together always.

Rendering noise: each component is *shown* at a neighbouring level with
probability :data:`RENDER_NOISE` (0 -> 1, 2 -> 1, 1 -> 0 or 2), independently.
The manifest keeps the true levels (``arch_level``, ``nuclear_level``, from
which the label follows) and the shown ones (``arch_shown``, ``nuclear_shown``).
A perfect reader of the images is then right :func:`ceiling` of the time
(0.923 at 6 % noise).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from data.limits import check_int

#: Bumped whenever rendering changes, so nothing compares datasets of two renderers.
BENCHMARK_VERSION = 2
LEVELS = (0, 1, 2)
#: Probability that a component is rendered at a neighbouring level.
RENDER_NOISE = 0.06
#: The context field spans this many detail fields.
CONTEXT_FIELDS = 4
HELDOUT = "HOLDOUT"
MAGNIFICATION = "20x"
#: Seed-stream tags, so no two kinds of draw share a stream (data.synthetic uses 11-13, data.sites 21).
NOISE_STREAM, TILE_STREAM, SITE_STREAM, SHARE_STREAM = 42, 43, 44, 45
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def grade_of(arch, nuclear):
    """Grade index (0 = I, 1 = II, 2 = III) of component levels; works on ints and arrays."""
    total = np.asarray(arch) + np.asarray(nuclear)
    grade = np.where(total <= 1, 0, np.where(total == 2, 1, 2))
    return int(grade) if grade.ndim == 0 else grade


def neighbour_moves(level: int, noise: float) -> dict[int, float]:
    """Probabilities of the level a component is shown at, given its true ``level``."""
    if level == 1:
        return {1: 1.0 - noise, 0: noise / 2, 2: noise / 2}
    return {level: 1.0 - noise, 1: noise}


def shown_level(level: int, noise: float, rng: np.random.Generator) -> int:
    """The level a tile shows: ``level``, or with probability ``noise`` a neighbouring one."""
    if rng.random() >= noise:
        return level
    if level != 1:
        return 1
    return 0 if rng.random() < 0.5 else 2


def ceiling(noise: float = RENDER_NOISE) -> float:
    """Accuracy of a perfect reader of the shown levels on balanced data (the benchmark's ceiling).

    The reader predicts ``grade_of(shown A, shown N)``; at these noise levels that
    is also the Bayes-optimal rule, so no reader of the images can do better.
    """
    right = 0.0
    for a, n in itertools.product(LEVELS, LEVELS):
        for a2, pa in neighbour_moves(a, noise).items():
            for n2, pn in neighbour_moves(n, noise).items():
                right += pa * pn * (grade_of(a2, n2) == grade_of(a, n))
    return right / len(LEVELS) ** 2


#: Best accuracy of a reader of one component alone on balanced data.
SINGLE_COMPONENT_BOUND = 5 / 9


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to render; everything else follows deterministically.

    Attributes:
        preset: Name of the preset this spec came from (recorded, not used).
        hospitals: Training hospitals, named ``H1`` ... (``HOLDOUT`` comes on top).
        sizes: Share of the training and validation tiles each hospital holds.
        train, val: Tiles per training hospital on average (split by ``sizes``).
        test: Test tiles of every training hospital (balanced, fixed by ``test_seed``).
        heldout: Test tiles of the held-out hospital.
        detail: Side of the detail patch, native pixels.
        context: Side of the context patch after resizing its field of ``4 * detail``.
        jitter: How far a patch centre may move from the tile centre (each axis, px).
        nucleus_radius: Mean area-equivalent radius of tumour nuclei, px.
        alpha: Dirichlet concentration of the training/validation grade mix
            per hospital; 0 = no skew (every hospital balanced).
        confound: The darkest-staining hospital gets more Grade III (off by default).
        noise: Rendering noise per component (see :func:`shown_level`).
        seed: Data seed: the training and validation tiles (redrawn per study seed).
        test_seed: Seed of the hospitals' profiles and of every test tile (kept fixed).
    """

    preset: str = "custom"
    hospitals: int = 3
    sizes: tuple[float, ...] = (0.5, 0.3, 0.2)
    train: int = 48
    val: int = 12
    test: int = 27
    heldout: int = 27
    detail: int = 32
    context: int = 32
    jitter: int = 8
    nucleus_radius: float = 3.5
    alpha: float = 2.0
    confound: bool = False
    noise: float = RENDER_NOISE
    seed: int = 0
    test_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sizes, list):
            object.__setattr__(self, "sizes", tuple(self.sizes))
        check_int("hospitals", self.hospitals, 1, 26)
        if len(self.sizes) != self.hospitals or not all(math.isfinite(s) and s > 0 for s in self.sizes):
            raise ValueError(f"sizes must hold {self.hospitals} positive shares (one per hospital); got {self.sizes!r}")
        for name, low in (("train", 1), ("val", 0), ("test", 0), ("heldout", 0)):
            check_int(name, getattr(self, name), low, 100_000)
        check_int("detail", self.detail, 8, 1024)
        check_int("context", self.context, 8, 4096)
        check_int("jitter", self.jitter, 0, 1024)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("test_seed", self.test_seed, 0, 2**63 - 1)
        if not 2.0 <= self.nucleus_radius <= 32.0:
            raise ValueError(f"nucleus_radius must lie in [2, 32] px; got {self.nucleus_radius!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be >= 0 (0 = no label skew); got {self.alpha!r}")
        if not 0 <= self.noise <= 0.5:
            raise ValueError(f"noise must lie in [0, 0.5]; got {self.noise!r}")

    @property
    def context_fov(self) -> int:
        """Native pixels covered by the context patch: :data:`CONTEXT_FIELDS` detail fields."""
        return CONTEXT_FIELDS * self.detail

    @property
    def tile_size(self) -> int:
        """Side of a tile: the context field plus the centre's jitter on both sides."""
        return self.context_fov + 2 * self.jitter

    @property
    def hospital_names(self) -> tuple[str, ...]:
        """Training hospitals, ``H1`` ..."""
        return tuple(f"H{i + 1}" for i in range(self.hospitals))

    def with_(self, **changes) -> BenchmarkSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready values."""
        out = asdict(self)
        out["sizes"] = list(self.sizes)
        return out


PRESETS: dict[str, BenchmarkSpec] = {
    # Seconds on one core: for trying the renderer and the Quick start.
    "demo": BenchmarkSpec(preset="demo"),
    # CPU study: one 48 px patch pair per 216 px tile, power from many tiles.
    "study": BenchmarkSpec(
        preset="study", train=600, val=100, test=400, heldout=400, detail=48, context=48, jitter=12, nucleus_radius=4.0
    ),
    # The paper's patch sizes: 224 px detail, 896 px context field resized to 320 (GPU).
    "paper": BenchmarkSpec(
        preset="paper",
        train=600,
        val=100,
        test=400,
        heldout=400,
        detail=224,
        context=320,
        jitter=56,
        nucleus_radius=7.0,
    ),
}


def preset(name: str, **changes) -> BenchmarkSpec:
    """The named preset, with any fields changed.

    Raises:
        ValueError: For an unknown name or a bad field value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].with_(**changes) if changes else PRESETS[name]


def centre_box(spec: BenchmarkSpec) -> tuple[int, int]:
    """Inclusive range of rows (and columns) where a patch centre may lie, under ``data.patches`` windows.

    ``data.patches`` cuts a window of side ``s`` around centre ``c`` from
    ``c - s // 2`` to ``c - s // 2 + s - 1``; the context window (the larger)
    then lies inside the tile for exactly these centres.
    """
    fov, size = spec.context_fov, spec.tile_size
    return fov // 2, size - (fov - fov // 2)


def geometry(spec: BenchmarkSpec) -> dict:
    """The data settings the spec implies, by ``fedsim`` config name where one exists.

    ``centre_box`` is what ``data.patch_centres = "inside"`` gives; ``tile_size`` and
    ``context_downsample`` are informative (training checks the others).
    """
    low, high = centre_box(spec)
    return {
        "detail_size": spec.detail,
        "context_fov": spec.context_fov,
        "context_size": spec.context,
        "patches_per_image": 1,
        "eval_patches_per_image": 1,
        "tile_size": spec.tile_size,
        "centre_box": [low, high],
        "context_downsample": spec.context_fov / spec.context,
        "partition": "natural",
        "num_hospitals": spec.hospitals,
        "heldout_hospitals": [HELDOUT],
        "magnification": MAGNIFICATION,
    }


@dataclass(frozen=True)
class Tile:
    """One tile to render and its manifest row."""

    hospital: str
    split: str
    index: int  # 0-based within (hospital, split)
    arch: int  # true levels; the label follows from them
    nuclear: int
    arch_shown: int  # levels the image shows
    nuclear_shown: int

    @property
    def grade(self) -> int:
        return grade_of(self.arch, self.nuclear)

    @property
    def patient(self) -> str:
        """One patient per tile, unique across hospitals and splits, e.g. ``H1-test-0007``."""
        return f"{self.hospital}-{self.split}-{self.index:05d}"

    def stream(self, spec: BenchmarkSpec) -> list[int]:
        """Seed of the tile's random stream: the test seed for test tiles, the data seed otherwise."""
        root = spec.test_seed if self.split == "test" else spec.seed
        return [root, TILE_STREAM, hospital_code(self.hospital), _SPLIT_CODE[self.split], self.index]


def hospital_code(name: str) -> int:
    """A stable number for a hospital name (``H1`` -> 0, ``HOLDOUT`` -> 999)."""
    return 999 if name == HELDOUT else int(name[1:]) - 1


def balanced_levels(count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` (A, N) pairs covering the 9 combinations equally (to within one), shuffled."""
    combos = list(itertools.product(LEVELS, LEVELS))
    order = rng.permutation(len(combos))  # which combinations get the remainder
    pairs = [combos[order[i % len(combos)]] for i in range(count)]
    return [pairs[i] for i in rng.permutation(count)]


def skewed_levels(grade_counts: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """(A, N) pairs with the given number of tiles per grade, each drawn uniformly among its grade's combinations.

    With equal counts the pairs are independent and uniform, so this is also the
    unskewed draw.
    """
    by_grade = {g: [c for c in itertools.product(LEVELS, LEVELS) if grade_of(*c) == g] for g in LEVELS}
    pairs = [by_grade[g][rng.integers(len(by_grade[g]))] for g in LEVELS for _ in range(grade_counts[g])]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def make_tiles(spec: BenchmarkSpec, hospital: str, split: str, pairs: list[tuple[int, int]]) -> list[Tile]:
    """Tiles of one (hospital, split) with their shown levels drawn from the split's seed."""
    root = spec.test_seed if split == "test" else spec.seed
    rng = np.random.default_rng([root, NOISE_STREAM, hospital_code(hospital), _SPLIT_CODE[split]])
    tiles = []
    for index, (a, n) in enumerate(pairs):
        tiles.append(
            Tile(hospital, split, index, a, n, shown_level(a, spec.noise, rng), shown_level(n, spec.noise, rng))
        )
    return tiles
