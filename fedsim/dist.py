"""Process-group lifecycle: one place decides the backend, the device and the teardown.

Each rank is one hospital. Under ``torchrun`` the environment names the rank;
a plain ``python train.py`` runs as a group of one, so the same code path
(collectives included) serves both.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
_CONTROL: dist.ProcessGroup | None = None  # gloo group for small objects and barriers (NCCL runs)


class HungRanks(RuntimeError):
    """Some ranks did not reach a synchronisation point: hung past the timeout, or ``crashed`` before it."""

    def __init__(self, ranks: list[int], message: str, crashed: bool = False):
        super().__init__(message)
        self.ranks = ranks
        self.crashed = crashed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the federation."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    host: str
    reason: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes shared files (metrics, TensorBoard, checkpoints)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def choose_backend(device: str, local_world_size: int) -> tuple[str, torch.device, str]:
    """Pick (backend, device, reason) from the requested device and the GPUs present.

    NCCL needs one GPU per rank; with more ranks than GPUs the ranks share the
    GPUs and gloo carries the collectives (NCCL refuses two ranks on one GPU).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "cpu" or (device == "auto" and num_gpus == 0):
        return "gloo", torch.device("cpu"), "CPU run: gloo collectives"
    if num_gpus == 0:
        raise RuntimeError("device = 'cuda' was asked for but no CUDA GPU is visible")
    gpu = torch.device("cuda", local_rank % num_gpus)
    if local_world_size > num_gpus:
        return "gloo", gpu, f"{local_world_size} ranks share {num_gpus} GPU(s) on this node: gloo collectives"
    return "nccl", gpu, "one GPU per rank: NCCL collectives"


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group; idempotent.

    Args:
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        timeout_s: Collective timeout: a hung rank ends the run instead of hanging it.
    """
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    backend, dev, reason = choose_backend(device, local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = _dt.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            # A fresh key space per torchrun restart: the store outlives the workers, and addresses
            # left by the previous attempt's dead ranks would be dialled otherwise ("connection refused").
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"fedsim/attempt{attempt}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            # A group of one without torchrun: same collectives, no network.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    global _CONTROL
    if dist.get_backend() == "nccl" and _CONTROL is None:
        # Figures and barriers travel on CPU: no device syncs, and monitored_barrier needs gloo.
        _CONTROL = dist.new_group(backend="gloo", timeout=timeout)
    info = DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=local_world,
        backend=dist.get_backend(),
        device=dev,
        host=socket.gethostname(),
        reason=reason,
    )
    log.debug("process group ready: %s (%s)", info, reason)
    return info


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    global _CONTROL
    _CONTROL = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all(timeout_s: float, what: str) -> None:
    """A barrier that names the ranks which did not arrive, instead of hanging.

    Raises:
        HungRanks: on rank 0 with the missing ranks, on the others when rank 0 gave up.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    started = time.monotonic()
    try:
        dist.monitored_barrier(group=_CONTROL, timeout=_dt.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        found = re.search(r"[Rr]anks?\s+([\d,\s]+?)\s+failed", str(err))
        ranks = [int(r) for r in re.findall(r"\d+", found.group(1))] if found else []
        waited = time.monotonic() - started
        if waited < 0.9 * timeout_s:  # the group broke before the timeout: a rank died, it did not hang
            raise HungRanks(
                ranks,
                f"{what}: rank(s) {ranks or '?'} left the group after {waited:.0f}s (crashed? see their log lines)",
                crashed=True,
            ) from None
        raise HungRanks(ranks, f"{what}: rank(s) {ranks or '?'} did not arrive within {timeout_s:.0f}s") from None


def barrier() -> None:
    """Wait for every rank (no-op outside a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_figures(figures: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Collect one dict of per-client scalar figures from every rank on rank 0.

    Only scalars, strings and small lists of them may cross ranks: never
    images, labels or per-sample values (the hospital's privacy boundary).
    Returns the list on rank 0 and None elsewhere.
    """
    _check_scalars(figures)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [figures]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(figures, out, dst=0, group=_CONTROL)
    return out


def share_figures(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's dict of scalar figures, on every rank (e.g. the hospitals' sample counts, which decide
    the aggregation weights); the same rules as :func:`gather_figures`."""
    _check_scalars(figures)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [figures]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, figures, group=_CONTROL)
    return out


def broadcast_weights(flat: torch.Tensor, src: int = 0) -> None:
    """Give every rank rank ``src``'s weights (the initial global model): one collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(flat, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a small object (a decision, a config) from ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL)
    return box[0]


def _check_scalars(value: Any, depth: int = 0) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _check_scalars(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > 4096:
            raise ValueError("refusing to send a long list across ranks: only summary figures may leave a hospital")
        for item in value:
            _check_scalars(item, depth + 1)
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise TypeError(f"only scalar figures may cross ranks, got {type(value).__name__}")
