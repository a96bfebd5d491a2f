"""Rendering the embedded benchmark in a pool of processes against one process, in the same run.

    python bench/bench_render.py [--train 150] [--test 60] [--workers 2] [--repeats 3] [--json PATH]

Renders a reduced study preset (``--train``/``--test`` tiles per hospital and
as many held-out tiles; 720 tiles at the defaults) with
``data.benchmark.dataset.render_dataset`` into a fresh folder per call, with
one process and with ``--workers``, taking turns (one warm-up each, medians
over ``--repeats``). Both write the same bytes (``tests/test_benchmark.py``),
so the ratio is the speed-up alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternating_times, machine, write_json
from data.benchmark.dataset import render_dataset
from data.benchmark.design import preset
from data.benchmark.hospitals import plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=150, help="training tiles per hospital (default 150)")
    p.add_argument("--test", type=int, default=60, help="test tiles per hospital and held out (default 60)")
    p.add_argument("--workers", type=int, default=2, help="processes of the pool (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed renders of each (default 3)")
    p.add_argument("--json", default="bench/results/cpu-render.json")
    args = p.parse_args(argv)
    spec = preset("study", train=args.train, val=10, test=args.test, heldout=args.test)
    tiles = len(plan(spec))
    scratch = Path(tempfile.mkdtemp(prefix="bench-render-"))
    calls = iter(range(10**6))

    def render(workers: int):
        def once() -> None:
            out = scratch / f"r{next(calls)}"
            render_dataset(spec, out, workers=workers)
            shutil.rmtree(out)

        return once

    try:
        times = alternating_times({"one": render(1), "pool": render(args.workers)}, args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    one, pool = statistics.median(times["one"]), statistics.median(times["pool"])
    print(f"{tiles} tiles: one process {one:.1f} s, {args.workers} processes {pool:.1f} s, speed-up {one / pool:.2f}x")
    write_json(
        args.json,
        {
            "machine": machine(),
            "tiles": tiles,
            "workers": args.workers,
            "seconds": times,
            "median_one": one,
            "median_pool": pool,
            "speedup": one / pool,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
