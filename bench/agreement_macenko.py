"""Agreement of fedsim's Macenko with torchstain's numpy backend on real H&E, same constants.

Usage:
    pip install torchstain   # only for this check; fedsim does not depend on it
    python bench/agreement_macenko.py [--crops 80] [--size 224] [--seed 0]

Draws random crops of the real H&E sample (see ``common.he_sample``), normalizes each
with torchstain's ``MacenkoNormalizer(backend="numpy")`` (Io 240, alpha 1,
beta 0.15, its default HERef and maxCRef, the same as fedsim's) and with
fedsim's ``Macenko`` (default and ``stride=1``), and prints the mean absolute
difference in grey levels, per tissue-fraction group. Crops on which
torchstain raises are counted, not compared.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import he_sample, load_rgb_image  # noqa: E402
from data.stain import Macenko  # noqa: E402
from data.tissue import tissue_mask  # noqa: E402

SAMPLE = he_sample()
GROUPS = (0.1, 0.5)  # report crops with at least this tissue fraction


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=80)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import torchstain
    except ImportError:
        print("agreement_macenko: error: torchstain is not installed (pip install torchstain)", file=sys.stderr)
        return 2
    if not SAMPLE.is_file():
        print(f"agreement_macenko: error: real H&E sample not found at {SAMPLE}", file=sys.stderr)
        return 2
    image = load_rgb_image(SAMPLE)
    rng = np.random.default_rng(args.seed)
    reference = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ours = {"default": Macenko(), "stride=1": Macenko(stride=1)}
    rows, failed = [], 0
    for _ in range(args.crops):
        top, left = (int(rng.integers(0, n - args.size)) for n in image.shape[:2])
        crop = np.ascontiguousarray(image[top : top + args.size, left : left + args.size])
        try:
            with warnings.catch_warnings():  # torchstain's numpy warns on the crops it then fails on
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = reference.normalize(I=crop, Io=240, alpha=1, beta=0.15, stains=False)[0].astype(np.int16)
        except Exception:  # torchstain's own failure modes: empty percentiles, eigen-solver errors
            failed += 1
            continue
        diffs = {
            name: np.abs(norm.normalize_image(crop).astype(np.int16) - expected).mean() for name, norm in ours.items()
        }
        rows.append((float(tissue_mask(crop).mean()), diffs))
    print(f"{len(rows)} crops of {args.size} px compared, torchstain failed on {failed}")
    for low in GROUPS:
        group = [d for frac, d in rows if frac >= low]
        if not group:
            continue
        cells = ", ".join(
            f"{name}: mean {np.mean([d[name] for d in group]):.3f}, worst {np.max([d[name] for d in group]):.3f}"
            for name in ours
        )
        print(f">= {low:.0%} tissue ({len(group)} crops): {cells}  (grey levels)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
