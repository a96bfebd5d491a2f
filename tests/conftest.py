"""Shared test helpers: real gloo process groups on loopback, paths to shared data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import warm

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The shared test data: ``$FEDSIM_SHARED_DATA``, else ``shared/data`` beside the repository, else inside it."""
    candidates = [Path(os.environ["FEDSIM_SHARED_DATA"])] if os.environ.get("FEDSIM_SHARED_DATA") else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    return next((folder for folder in candidates if folder.is_dir()), candidates[0])


SHARED_DATA = _shared_data()
#: A real H&E slide region (public domain); tests that need it skip when it is absent.
HE_SAMPLE = SHARED_DATA / "he_cmu_small_region.jpg"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: A tiny run: small synthetic images and patches, test_resnet, one local epoch (CPU, seconds per round).
SMALL = [
    "--set",
    "data.synthetic.image_size=256",
    "--set",
    "data.synthetic.patients_per_grade=3",
    "--set",
    "data.synthetic.images_per_patient=2",
    "--set",
    "data.context_size=64",
    "--set",
    "data.detail_size=48",
    "--set",
    "data.context_fov=96",
    "--set",
    "data.patches_per_image=2",
    "--set",
    "data.eval_patches_per_image=2",
    "--set",
    "model.hidden=16",
    "--batch-size",
    "8",
    "--backbone",
    "test_resnet",
    "--local-epochs",
    "1",
    "--device",
    "cpu",
]


def torchrun(
    args: list[str],
    cache,
    nproc: int = 3,
    timeout: float = 600,
    extra: list[str] | None = None,
    nnodes: int = 1,
    endpoint: str | None = None,
) -> subprocess.CompletedProcess:
    """The real ``torchrun ... train.py ARGS`` on loopback, with the data cache in ``cache``: for the tests of what
    torchrun adds (restarts, several launches in one group, its error summary, the Quick start's command)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint or f'127.0.0.1:{free_port()}'}",
        *(extra or []),
        str(REPO / "train.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=timeout)


def ranks(args: list[str], cache, nproc: int = 3, timeout: float = 600) -> subprocess.CompletedProcess:
    """``train.py ARGS`` as the ``nproc`` ranks of one group on loopback, as torchrun starts them, forked from a
    process that has the imports done (``warm``); exit code 0, or 1 when a rank failed."""
    env = {**_env(cache), "MASTER_PORT": str(free_port())}
    return warm.launch(str(REPO / "train.py"), args, env, world=nproc, cwd=str(REPO), timeout=timeout)


def train_single(args: list[str], cache, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` without torchrun (a group of one)."""
    return _script("train.py", args, cache, timeout)


def evaluate(run, out, cache, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python eval.py --checkpoint RUN/checkpoint.pt --out OUT ARGS`` with the data cache in ``cache``."""
    return _script("eval.py", ["--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), *args], cache, timeout)


def _script(name: str, args: list[str], cache, timeout: float) -> subprocess.CompletedProcess:
    return warm.launch(str(REPO / name), args, _env(cache), cwd=str(REPO), timeout=timeout)


def _env(cache) -> dict:
    return {**os.environ, "FEDSIM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def together(*launches, at_once: int = 2):
    """Run independent launches (zero-argument callables, e.g. ``lambda: train_single(...)``), ``at_once`` at a
    time; their results in order. A one-process run keeps one core busy, so two of them use a second core."""
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return [future.result() for future in [pool.submit(launch) for launch in launches]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),  # as torchrun sets them on one node
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    except BaseException as err:
        queue.put((rank, err))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` real gloo processes; return their results by rank."""
    ctx = warm.context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value = queue.get(timeout=timeout)
            if isinstance(value, BaseException):
                raise value
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A data cache (synthetic dataset, patch pairs) shared by the tests of one module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def he_pixels() -> np.ndarray:
    """The real H&E sample, uint8 HxWx3 (read-only); the test skips when it is absent."""
    if not HE_SAMPLE.is_file():
        pytest.skip(f"real H&E sample not found at {HE_SAMPLE}")
    from PIL import Image

    with Image.open(HE_SAMPLE) as img:
        return np.asarray(img.convert("RGB"))
