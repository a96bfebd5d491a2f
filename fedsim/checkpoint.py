"""Atomic checkpoints of the global model, keeping the last k, loadable with ``weights_only=True``."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from data.files import atomic_writer, storage_error
from fedsim.errors import UserError

log = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, another config): bad input, one line."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, flush, fsync, rename: a crash never leaves half a file.

    Raises:
        WriteError: the disk is full or the folder cannot be written (the temporary file is removed).
    """
    with atomic_writer(path, size_hint=state_bytes(obj)) as handle:
        torch.save(obj, handle)
        _simulated_crash(path)


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: what its file needs at least."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


#: Fault simulation (train.simulate_crash at "checkpoint"): the path whose write dies before its rename.
CRASH_DURING: set[str] = set()


def _simulated_crash(path: Path) -> None:
    if str(path) in CRASH_DURING:
        log.warning("simulated crash: killing this process (SIGKILL) while writing %s", path)
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Delete the temporary files of writes that died (``.NAME.tmpPID``) in a run directory's checkpoint folders.

    Called by the owner of the run directory only (it holds the lock, so no live writer owns them).
    """
    out = Path(out)
    folders = [out, out / "checkpoints", *sorted((out / "clients").glob("*"))] if out.is_dir() else []
    stale = [p for folder in folders if folder.is_dir() for p in folder.glob(".*.tmp*") if _TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_round(state: dict[str, Any], out: str | Path, round_index: int, keep: int) -> Path:
    """Write ``checkpoints/round-NNNN.pt``, point ``checkpoint.pt`` at it, keep the last ``keep``."""
    out = Path(out)
    path = save_keeping_last(state, out / "checkpoints", round_index, keep)
    _link_latest(path, out / "checkpoint.pt")
    return path


def save_keeping_last(state: dict[str, Any], folder: str | Path, round_index: int, keep: int) -> Path:
    """Write ``folder/round-NNNN.pt`` atomically and delete all but the last ``keep`` round files there."""
    path = round_path(folder, round_index)
    save_atomic(state, path)
    for old in rounds_in(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def round_path(folder: str | Path, round_index: int) -> Path:
    """``folder/round-NNNN.pt`` of a 0-based round (files count rounds from 1)."""
    return Path(folder) / f"round-{round_index + 1:04d}.pt"


def _link_latest(source: Path, latest: Path) -> None:
    """Make ``latest`` the same file as ``source`` (a hard link; a copy where links fail)."""
    tmp = latest.with_name(f".{latest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here: a copy, written atomically itself
        save_atomic(torch.load(source, map_location="cpu", weights_only=True), latest)
        return
    try:
        os.replace(tmp, latest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(err, latest) from None


def list_rounds(out: str | Path) -> list[Path]:
    """A run directory's round checkpoints in round order."""
    return rounds_in(Path(out) / "checkpoints")


def rounds_in(folder: str | Path) -> list[Path]:
    """The ``round-NNNN.pt`` files of a folder in round order."""
    folder = Path(folder)
    files = [p for p in folder.glob("round-*.pt") if _ROUND_FILE.search(p.name)] if folder.is_dir() else []
    return sorted(files, key=lambda p: int(_ROUND_FILE.search(p.name).group(1)))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "round" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a fedsim model state")
    return state


def load_latest_usable(out: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest round checkpoint that loads, falling back past corrupt ones; None if there is none."""
    candidates = list(reversed(list_rounds(out)))
    if not candidates and (Path(out) / "checkpoint.pt").is_file():
        candidates = [Path(out) / "checkpoint.pt"]
    for path in candidates:
        try:
            return load(path, map_location), path
        except CheckpointError as err:
            log.warning("%s; trying an older checkpoint", err)
    return None


def client_folder(out: str | Path, hospital: str) -> Path:
    """``OUT/clients/<hospital>``: the state a hospital keeps between rounds, one file per round it trained."""
    return Path(out) / "clients" / hospital


def save_client_state(out: str | Path, hospital: str, round_index: int, state: dict[str, Any], keep: int) -> Path:
    """Write a hospital's state of a round (FedBN tensors, optimizer state, control variate), keeping ``keep``."""
    return save_keeping_last(
        {"round": round_index, "model": {}, "state": state}, client_folder(out, hospital), round_index, keep
    )


def load_client_state(out: str | Path, hospital: str, round_index: int) -> dict[str, Any]:
    """A hospital's state as it was after round ``round_index``: its newest file of that round or before
    (it did not train in the rounds between); empty if it never kept any.

    Raises:
        CheckpointError: a hospital that kept state has no usable file of that round or before.
    """
    files = [
        p
        for p in rounds_in(client_folder(out, hospital))
        if int(_ROUND_FILE.search(p.name).group(1)) - 1 <= round_index
    ]
    if not files:
        return {}
    return load(files[-1])["state"]


class BackgroundWriter:
    """Runs one write at a time in a thread, so a checkpoint is written while the next round trains.

    ``submit`` first waits for the write before it (checkpoints stay in order); ``wait`` returns the seconds it
    waited and raises, in the caller's thread, an error the write met. The thread is not a daemon: the process
    does not exit before the write it holds is on disk.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="fedsim-checkpoint")
        self._thread.start()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as err:
            self._error = err

    def wait(self) -> float:
        began = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return time.perf_counter() - began


class HostCopy:
    """The model's state dict copied once into a host buffer kept for the run (views of it), so a round's
    checkpoint costs one copy and no allocation; the previous checkpoint's write must have finished. On CPU the
    engine's snapshot of the round already is such a copy of the global parameters: no pass at all."""

    def __init__(self) -> None:
        self._saved: torch.Tensor | None = None

    def __call__(self, model: torch.nn.Module, flat, engine=None) -> dict[str, torch.Tensor]:
        """Views of the copy, keyed like ``model.state_dict()``; ``flat`` is the model's FlatModel and
        ``engine`` the federation engine whose snapshot may serve instead (or None)."""
        views = engine.state_views() if engine is not None else None
        if views is not None:
            return views
        data = flat.data
        if self._saved is None:
            self._saved = torch.empty(data.shape, dtype=data.dtype, device="cpu")
        self._saved.copy_(data)
        base, size = data.data_ptr(), data.element_size()
        out = {}
        for key, value in model.state_dict().items():
            offset = (value.data_ptr() - base) // size
            inside = value.device == data.device and value.dtype == data.dtype and 0 <= offset < data.numel()
            out[key] = (
                self._saved.as_strided(value.shape, value.stride(), offset)
                if inside
                else value.detach().to("cpu", copy=True)
            )
        return out
