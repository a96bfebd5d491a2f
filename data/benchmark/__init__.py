"""An embedded histology benchmark whose answers are known by construction.

Every tile is tumour. Its grade is a composite of two independent components
(:mod:`data.benchmark.design`): an architecture level drawn at the scale of
gland units larger than the detail field (:mod:`~data.benchmark.morphology`)
and a nuclear level drawn at the 1-3 px scale with the dye and area of every
nucleus held to one distribution (:mod:`~data.benchmark.nuclei`). Colour
fractions and nuclear density are the same at every level, so colour
statistics cannot read the grade (:mod:`~data.benchmark.controls`), while
hospitals differ the way sites do (:mod:`~data.benchmark.hospitals`) and a
held-out hospital, ``HOLDOUT``, stains as none of them and only has test tiles.

Geometry: one patch pair per tile. The detail patch is ``detail`` native
pixels; the context patch covers ``4 * detail`` native pixels resized to
``context``; a tile is the context field plus ``jitter`` on each side, so any
centre in :func:`~data.benchmark.design.centre_box` keeps both windows inside
the tile: the box ``data.patches.sample_centres`` draws from with
``centres = "inside"`` (training's ``data.patch_centres``).

Render a dataset with ``python -m data.benchmark --preset {demo,study,paper}
--seed S --out DIR`` (:mod:`~data.benchmark.dataset`); training renders its own
(``data.source = benchmark``, ``fedsim.sources``).
"""

from data.benchmark.design import (
    BENCHMARK_VERSION,
    HELDOUT,
    PRESETS,
    BenchmarkSpec,
    ceiling,
    centre_box,
    geometry,
    grade_of,
    preset,
)

__all__ = [
    "BENCHMARK_VERSION",
    "HELDOUT",
    "PRESETS",
    "BenchmarkSpec",
    "ceiling",
    "centre_box",
    "geometry",
    "grade_of",
    "preset",
]
