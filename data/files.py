"""Writing files so that a crash never leaves half of one behind, and concurrent writers take turns.

Every writer of the project goes through :func:`atomic_writer` (or its
shorthands): the content goes to a temporary file in the target's folder,
is flushed and fsync'd, then renamed over the target. On any failure the
temporary file is removed, and a full disk or a read-only folder becomes a
:class:`WriteError` with one line that names the file.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks
    fcntl = None

log = logging.getLogger(__name__)
_WARNED = False
_MIB = 2**20
#: Errors of the storage rather than of the program: they become one line naming the file.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class WriteError(OSError):
    """A file could not be written for a reason of the storage (full, read-only, no permission); one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def storage_error(err: OSError, path: str | Path, needed: int | None = None) -> OSError:
    """``err`` as a one-line :class:`WriteError` when the storage caused it, else ``err`` unchanged."""
    if isinstance(err, WriteError) or err.errno not in _STORAGE_ERRNOS:
        return err
    text = f"{_STORAGE_ERRNOS[err.errno]} while writing {path}"
    if needed and err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f": {math.ceil(needed / _MIB)} MiB needed"
    out = WriteError(err.errno, text)
    out.strerror = text
    return out


class _CountingFile:
    """A binary file that counts what was written to it (for the 'N MiB needed' of a full disk)."""

    def __init__(self, handle: IO[bytes]):
        self._handle, self.written = handle, 0
        self.failure: OSError | None = None
        """The first write error: a saver may turn it into an error of its own (torch.save: a RuntimeError)."""

    def write(self, data) -> int:
        try:
            count = self._handle.write(data)
        except OSError as err:
            self.failure = self.failure or err
            raise
        self.written += len(memoryview(data)) if count is None else count
        return count

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


@contextmanager
def atomic_writer(path: str | Path, size_hint: int | None = None) -> Iterator[IO[bytes]]:
    """Open a binary handle whose content replaces ``path`` whole when the block ends without error.

    Args:
        path: The file to write; its folder is created if missing.
        size_hint: Bytes about to be written, when known: a full disk is then
            reported before writing (``N MiB needed``) instead of midway.

    Raises:
        WriteError: the disk is full, the folder read-only or not writable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size_hint is not None:
            ensure_free_space(path.parent, size_hint, path)
        with open(tmp, "wb") as raw:
            handle = _CountingFile(raw)
            yield handle  # type: ignore[misc]
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        cause = handle.failure if handle is not None and handle.failure is not None else err
        if isinstance(cause, OSError):
            raise storage_error(cause, path, max(size_hint or 0, handle.written if handle else 0)) from None
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new, never part of it."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_writer(path, size_hint=len(blob)) as handle:
        handle.write(blob)


def write_with(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> None:
    """``writer(handle)`` fills ``path`` atomically (for savers that take a file: PIL, torch, csv)."""
    with atomic_writer(path) as handle:
        writer(handle)


def clean_json(obj: Any) -> Any:
    """Replace NaN/Inf floats by None, recursively, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Atomic, strict JSON (NaN and Inf become null)."""
    write_atomic(path, json.dumps(clean_json(obj), indent=indent, allow_nan=False) + "\n")


def ensure_free_space(folder: str | Path, needed: int, what: str | Path | None = None) -> None:
    """Refuse to start writing ``needed`` bytes under ``folder`` when the file system has less free.

    Raises:
        WriteError: with ``no space left on device while writing WHAT: N MiB needed``.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: the write itself will say
    if needed > free:
        raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), what or folder, needed)


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)


@contextmanager
def exclusive(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (which need not exist) across processes and nodes.

    The lock is a ``flock`` on a hidden file beside ``target``; it is what lets
    several ranks or several runs fill one shared cache: the first builds, the
    others wait and then find the result. On a file system without locks (some
    parallel file systems mount without them) a warning is logged once and the
    block runs unlocked, as it would have with one writer.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a+b") as handle:
        locked = _lock(handle.fileno())
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock(fd: int, blocking: bool = True) -> bool:
    """Lock ``fd`` (waiting unless ``blocking`` is False); False where the platform or file system has no locks.

    Raises:
        BlockingIOError: with ``blocking=False``, when another process holds the lock.
    """
    global _WARNED
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        raise
    except OSError as err:  # ENOLCK / EOPNOTSUPP / ENOSYS: no locking on this mount
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BlockingIOError(err.errno, err.strerror) from None
        if not _WARNED:
            log.warning("cannot lock files here (%s); concurrent writers to one cache may collide", err.strerror)
            _WARNED = True
        return False
