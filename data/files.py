"""Writing files so that a crash never leaves half of one behind, and concurrent writers take turns."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks
    fcntl = None

log = logging.getLogger(__name__)
_WARNED = False


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new, never part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _lock(fd: int) -> bool:
    """Block until ``fd`` is locked; False where the platform or file system has no locks."""
    global _WARNED
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError as err:  # ENOLCK / EOPNOTSUPP / ENOSYS: no locking on this mount
        if not _WARNED:
            log.warning("cannot lock files here (%s); concurrent writers to one cache may collide", err.strerror)
            _WARNED = True
        return False
