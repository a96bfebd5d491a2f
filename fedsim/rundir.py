"""One owner per run directory: an exclusive lock on ``OUT/.lock`` held by rank 0 for the life of the run.

Two runs on one ``--out`` would interleave their metrics and overwrite each
other's checkpoints, so the second is refused at once, touching nothing.
The lock is a ``flock``: the kernel releases it when the owner dies, so a
restart under ``torchrun --max-restarts`` (or a rerun after a crash) takes
it again. Where the file system has no locks, ``OUT/.lock`` is a lease that
names its owner (host, pid, start time) and is removed at the end of the run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from data.files import _lock, storage_error
from fedsim.config import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
#: A restarted group may find the lock still held for a moment by the dying rank 0 (or a DataLoader worker
#: forked from it): it waits this long for an owner of the same torchrun job before refusing.
RESTART_GRACE_S = 60.0
#: An owner writes its record just after it takes the lock; a run that finds the lock held and no record yet
#: reads it again for this long, so that its refusal can name the owner.
OWNER_RECORD_WAIT_S = 2.0


class RunDirBusy(ConfigError):
    """Another run owns the run directory."""


class RunLock:
    """The exclusive ownership of a run directory (see the module docstring)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None
        self._lease = False

    def acquire(self) -> RunLock:
        """Take the run directory or raise :class:`RunDirBusy` naming its owner.

        Raises:
            RunDirBusy: another live run holds it.
            WriteError: the folder cannot be created or written (read-only, full).
        """
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise storage_error(err, self.path) from None
        deadline = time.monotonic() + RESTART_GRACE_S
        while True:
            try:
                locked = _lock(fd, blocking=False)
                break
            except BlockingIOError:
                owner = _awaited_owner(self.path)
                if not (_same_job(owner) and time.monotonic() < deadline):
                    os.close(fd)
                    raise RunDirBusy(
                        f"run directory {self.out} is in use by another run ({_describe(owner)}); "
                        "wait for it to end or choose another --out"
                    ) from None
                time.sleep(0.5)
        if not locked:  # no locks on this file system: a lease file that names its owner
            owner = _read_owner(self.path)
            if owner and owner.get("pid") and not _is_dead(owner) and not _same_job(owner):
                os.close(fd)
                raise RunDirBusy(
                    f"run directory {self.out} is leased by another run ({_describe(owner)}; this file "
                    f"system has no locks: if that run is gone, delete {self.path})"
                )
            self._lease = True
        try:
            _write_owner(fd)
        except OSError as err:
            os.close(fd)
            raise storage_error(err, self.path) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the directory up (the kernel does it too if the process dies)."""
        if self._fd is None:
            return
        if self._lease:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _owner_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def _write_owner(fd: int) -> None:
    blob = (json.dumps(_owner_record()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, blob, 0)
    os.fsync(fd)


def _awaited_owner(path: Path) -> dict:
    """The record of the lock's owner, read again while it is empty for up to ``OWNER_RECORD_WAIT_S``."""
    deadline = time.monotonic() + OWNER_RECORD_WAIT_S
    owner = _read_owner(path)
    while not owner and time.monotonic() < deadline:
        time.sleep(0.05)
        owner = _read_owner(path)
    return owner


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _same_job(owner: dict) -> bool:
    """The owner is an earlier attempt of this torchrun job (a restart), on this host."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return (
        bool(job)
        and owner.get("job") == job
        and owner.get("host") == socket.gethostname()
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    )


def _is_dead(owner: dict) -> bool:
    """True when the owner ran on this host and its process is gone (unknowable for another host)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError) as err:
        return getattr(err, "errno", None) == errno.ESRCH
    return False


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
