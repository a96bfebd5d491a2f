"""Deterministic synthetic H&E-like stand-in for the CRC-HGD dataset.

The real dataset cannot be downloaded here, so this package renders a small
look-alike with the same folder layout (class folder / magnification folder /
JPEG), plus a ``manifest.csv`` and a ``spec.json``. Nothing is drawn from the
clock: every random draw is seeded from ``(seed, hospital, patient, image)``,
so one spec always gives byte-identical files.

Rendering follows Beer-Lambert optics. Per pixel, haematoxylin and eosin
concentration maps are built (stroma, epithelium, lumens, nuclei) and turned
into light as ``I = Io * exp(-(c_H * v_H + c_E * v_E))``, with the stain
vectors ``v_H``, ``v_E``, their gains and the glass brightness ``Io`` taken
from the hospital's :class:`StainProfile`. Tissue covers part of each image;
the rest is bright glass, so Otsu tissue masking has something to find.

Grades show in the gland architecture (seen in a context window) and in the
nuclei (seen in a detail window); see :mod:`data.synthetic.grades`. Each cue
is informative but imperfect. For every image an *architecture grade* and a
*nuclear grade* are drawn independently; each equals the true grade (the
label) with probability ``CUE_AGREEMENT`` = 0.75 and is otherwise an adjacent
grade (Grade II moves to I or III with equal odds). An ideal reader of one cue
is right 75 % of the time; one who reads both and combines them with Bayes'
rule is right about 82 % of the time, so multi-scale models have something to
gain.

Hospitals differ the way labs do: each has a :class:`StainProfile` (a
:class:`data.labs.LabStain` with stain vectors turned several degrees from
Ruifrok & Johnston's and its own dye gains, plus camera white balance, focus
and vignetting) fixed by ``(seed, hospital)``; ``H1`` stays close to standard
H&E. Each patient's slide varies a little around its lab's profile.

Modules, in the order an image is made:

* :mod:`~data.synthetic.spec`: the spec, folder layout, seed streams and plan of images.
* :mod:`~data.synthetic.grades`: the cue tables of each grade and the length scales.
* :mod:`~data.synthetic.noise`: smooth random fields (textures, fibres, section outline).
* :mod:`~data.synthetic.shapes`: glands and nuclei as wobbly ellipses, and their rasterisation.
* :mod:`~data.synthetic.layouts`: glands with their lining, or solid sheets.
* :mod:`~data.synthetic.nuclei`: tumour and stromal nuclei and their haematoxylin.
* :mod:`~data.synthetic.optics`: the hospital's stain and microscope, and Beer-Lambert light.
* :mod:`~data.synthetic.render`: one image, from all of the above.
* :mod:`~data.synthetic.writer`: the dataset on disk (lock, resume, manifest).
"""

from data.synthetic.grades import CUE_AGREEMENT, draw_cue_grade
from data.synthetic.optics import StainProfile
from data.synthetic.render import render_image
from data.synthetic.spec import (
    CLASS_FOLDERS,
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPEC_NAME,
    PlannedImage,
    SyntheticSpec,
    default_root,
    plan,
    spec_document,
)
from data.synthetic.writer import generate, render_item

# data.benchmark draws its textures and shapes with these primitives; they stay importable from here.
from data.synthetic.noise import _fibres as _fibres, _noise as _noise  # isort: skip
from data.synthetic.nuclei import _scatter as _scatter  # isort: skip
from data.synthetic.shapes import _harmonic_edge as _harmonic_edge  # isort: skip

__all__ = [
    "CLASS_FOLDERS",
    "CUE_AGREEMENT",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "SPEC_NAME",
    "PlannedImage",
    "StainProfile",
    "SyntheticSpec",
    "default_root",
    "draw_cue_grade",
    "generate",
    "plan",
    "render_image",
    "render_item",
    "spec_document",
]
