"""Helpers shared by the benchmarks: machine description, timing, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def he_sample() -> Path:
    """The real H&E sample: under ``$FEDSIM_SHARED_DATA``, else ``shared/data`` beside the repository, else inside it.

    The same rule as the tests'; the path may not exist (callers fall back or stop).
    """
    env = os.environ.get("FEDSIM_SHARED_DATA")
    folders = ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    return folder / "he_cmu_small_region.jpg"


def load_rgb_image(path: Path) -> np.ndarray:
    """An image file as uint8 HxWx3."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def machine() -> dict:
    """What ran the benchmark."""
    info = {
        "host": socket.gethostname(),
        "cpu": cpu_model_name(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_times(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Wall times of each of ``fns`` over ``repeats`` rounds, calling them in turn in every round.

    One warm-up call each first. Taking turns makes a change in machine load
    hit every function alike, so ratios of their medians stay meaningful on a
    shared machine.
    """
    sync = sync or (lambda: None)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def spawn_ranks(target, world: int, args, results: int = 1, timeout: float = 3600) -> list:
    """Run ``target(rank, world, port, args, queue)`` in ``world`` spawned processes on a free loopback port;
    return the first ``results`` objects they put on the queue."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=timeout) for _ in range(results)]
    for p in procs:
        p.join()
    return out


def make_cache(folder: Path, count: int, context: int, detail: int) -> Path:
    """Random uint8 patch pairs in the cache format (the pipeline's cost does not depend on content)."""
    rng = np.random.default_rng(0)
    np.save(folder / "context.npy", rng.integers(0, 256, (count, context, context, 3), dtype=np.uint8))
    np.save(folder / "detail.npy", rng.integers(0, 256, (count, detail, detail, 3), dtype=np.uint8))
    meta = [
        {
            "image": i // 4,
            "path": f"img{i // 4}",
            "label": int(i % 3),
            "magnification": "20x",
            "patient": f"p{i // 8}",
            "hospital": "H1",
        }
        for i in range(count)
    ]
    (folder / "patches.json").write_text(json.dumps({"count": count, "patches": meta}))
    return folder


def cpu_model_name() -> str:
    """``lscpu``'s model name, else what Python knows."""
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()
