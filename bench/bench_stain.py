"""Throughput of batched stain normalization against the same code run one image at a time.

Usage:
    python bench/bench_stain.py [--quick] [--device cpu|cuda] [--json PATH]

Patches come from the real H&E sample (``common.he_sample``: random tissue-rich
crops), or, if it is absent, from synthetic noise-free tissue-like images. For
Macenko and Reinhard at 224 and 320 px it times ``normalize`` on a whole batch
and on batches of one (the baseline), in the same run, and prints patches/s
and their ratio. The two are timed in turn, round after round, and figures
are medians over the rounds: on a shared machine absolute figures are noisy,
their ratio less so. When torchstain is installed (it is not a dependency), its torch
Macenko backend, one image at a time, is timed as an outside reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import alternating_times, he_sample, load_rgb_image  # noqa: E402
from data.stain import Macenko, Reinhard  # noqa: E402
from data.tissue import tissue_mask, window_tissue_fraction  # noqa: E402

SAMPLE = he_sample()
LABELS = {"macenko": "macenko", "exact": "macenko stride=1 (exact)", "reinhard": "reinhard"}


def load_crops(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``count`` uint8 crops (count, size, size, 3) and a word on where they came from."""
    rng = np.random.default_rng(seed)
    if not SAMPLE.is_file():
        return synthetic_crops(count, size, rng), "synthetic"
    image = load_rgb_image(SAMPLE)
    step = 8  # centres are chosen on a thumbnail: mostly-tissue windows only
    frac = window_tissue_fraction(tissue_mask(image[::step, ::step]), size // step)
    half = size // (2 * step)
    frac[:half], frac[-half:], frac[:, :half], frac[:, -half:] = 0, 0, 0, 0
    rows, cols = np.nonzero(frac >= 0.6)
    pick = rng.integers(0, rows.size, count)
    tops = (rows[pick] * step - size // 2).clip(0, image.shape[0] - size)
    lefts = (cols[pick] * step - size // 2).clip(0, image.shape[1] - size)
    return np.stack([image[t : t + size, left : left + size] for t, left in zip(tops, lefts)]), "real H&E crops"


def synthetic_crops(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noise-free tissue-like images: smooth haematoxylin and eosin fields mixed by Beer-Lambert."""
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # Ruifrok & Johnston 2001 H and E vectors
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        fields = []
        for _ in range(2):
            waves = [rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.random() for _ in range(4)]
            f = sum(np.sin(2 * np.pi * wave) for wave in waves)
            fields.append(np.clip(f / 4 + rng.uniform(0.1, 0.5), 0, None) * rng.uniform(0.8, 2.0))
        od = np.stack(fields, -1) @ stains
        out[i] = np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)
    return out


def bench_one(name: str, make, batch: torch.Tensor, singles: int, repeats: int) -> dict:
    """Batched and one-by-one patches/s of one normalizer on one batch."""
    norm = make()
    loop_batch = batch[:singles]
    times = alternating_times(
        {
            "batched": lambda: norm.normalize(batch),
            "single": lambda: [norm.normalize(loop_batch[i : i + 1]) for i in range(singles)],
        },
        repeats,
        torch.cuda.synchronize if batch.is_cuda else None,
    )
    batched, single = times["batched"], times["single"]
    batched_pps = batch.shape[0] / statistics.median(batched)
    single_pps = singles / statistics.median(single)
    return {
        "method": name,
        "size": int(batch.shape[-1]),
        "batch": int(batch.shape[0]),
        "batched_patches_per_s": round(batched_pps, 1),
        "single_patches_per_s": round(single_pps, 1),
        "speedup": round(batched_pps / single_pps, 2),
        "batched_seconds": batched,
        "single_seconds": single,
    }


def bench_torchstain(batch: torch.Tensor, repeats: int) -> dict | None:
    """torchstain's torch Macenko backend (same constants), one image at a time; None if not installed."""
    try:
        import torchstain
    except ImportError:
        return None
    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    images = [img for img in batch.cpu()]  # (3, H, W) uint8 each, as torchstain's torch backend takes them

    def loop() -> None:
        for img in images:
            with contextlib.suppress(Exception):  # its failure modes on near-background crops; timed all the same
                norm.normalize(I=img, Io=240, alpha=1, beta=0.15, stains=False)

    times = alternating_times({"torchstain": loop}, repeats)["torchstain"]
    from importlib.metadata import version

    return {
        "method": f"torchstain {version('torchstain')} torch",
        "size": int(batch.shape[-1]),
        "single_patches_per_s": round(len(images) / statistics.median(times), 1),
        "single_seconds": times,
    }


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches and few repeats (< 1 minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320], help="patch sides in pixels")
    parser.add_argument("--stride", type=int, default=None, help="Macenko stride (default: the class default)")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk size (default: the class default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(LABELS),
        choices=list(LABELS),
        help="what to time (exact: Macenko with stride 1; skipped by --quick)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Time every asked-for method at every size; prints one line each."""
    device = torch.device(args.device)
    options = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    macenko_options = dict(options, **({"stride": args.stride} if args.stride else {}))
    batch_size, singles, repeats = (64, 16, 3) if args.quick else (256, 64, 5)
    results, source = [], ""
    print(f"{'method':26s} {'size':>5s} {'batch':>6s} {'batched/s':>10s} {'1-by-1/s':>10s} {'ratio':>6s}")
    for size in args.sizes:
        crops, source = load_crops(batch_size, size)
        batch = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().to(device)
        makers = {
            "macenko": lambda: Macenko(**macenko_options),
            "exact": lambda: Macenko(**dict(options, stride=1)),
            "reinhard": lambda crops=crops: Reinhard(**options).fit(crops[0]),
        }
        for key in args.methods:
            if args.quick and key == "exact":
                continue
            res = bench_one(LABELS[key], makers[key], batch, singles, repeats)
            results.append(res)
            print(
                f"{res['method']:26s} {size:5d} {batch_size:6d} {res['batched_patches_per_s']:10.0f} "
                f"{res['single_patches_per_s']:10.0f} {res['speedup']:6.1f}"
            )
        external = bench_torchstain(batch[:singles], repeats)
        if external:
            results.append(external)
            print(f"{external['method']:26s} {size:5d} {'-':>6s} {'-':>10s} {external['single_patches_per_s']:10.0f}")
    print(f"patches: {source}; figures are medians of {repeats} timed calls")
    return results, source


def main() -> None:
    args = parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    results, source = run(args)
    if args.json:
        meta = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "patches": source,
            "quick": args.quick,
            "stride": args.stride,
            "chunk_size": args.chunk_size,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
