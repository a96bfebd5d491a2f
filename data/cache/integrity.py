"""The digests of a cache entry: taken while it is written, checked when it is opened.

``DONE`` is an entry's manifest: the byte size and CRC-32 of every other file,
per :data:`DIGEST_BLOCK` bytes for the arrays, so that a mismatch says where it
lies. :func:`entry_fault` checks an entry against it once per process (a full
read); afterwards only the files' size, modification time and inode are
compared with what they were, so the several opens of one entry in a run
(its build, its split's dataset, a union of splits) read it once. A changed,
truncated or missing file makes the entry corrupt (:class:`CorruptCache`).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import NamedTuple

from data.cache.spec import ARRAY_FILES, CACHE_VERSION, JSON_FILES
from data.errors import DataError

#: Arrays and JSON files are digested in blocks of this many bytes (a CRC-32 each): a mismatch says where it lies.
DIGEST_BLOCK = 4 * 2**20
#: Entries this process has checked (or built): folder -> the (size, mtime, inode) of their files then.
_VERIFIED: dict[str, tuple | None] = {}


class CorruptCache(DataError):
    """A cache entry whose files do not match the digests of its DONE manifest; one line naming it and why."""

    def __init__(self, folder: str | Path, reason: str, consequence: str = ""):
        self.folder, self.reason = Path(folder), reason
        super().__init__(f"cache entry {folder} is corrupt ({reason}){consequence}")


class BlockDigest:
    """CRC-32 of consecutive ``DIGEST_BLOCK``-byte blocks of a stream of bytes."""

    def __init__(self):
        self.crcs: list[int] = []
        self._crc, self._fill = 0, 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(DIGEST_BLOCK - self._fill, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            view = view[take:]
            if self._fill == DIGEST_BLOCK:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def finish(self) -> list[int]:
        if self._fill:
            self.crcs.append(self._crc)
            self._crc, self._fill = 0, 0
        return self.crcs


def digest_file(path: Path) -> dict:
    """The manifest entry of a small file: its size and block digests."""
    digest = BlockDigest()
    digest.update(path.read_bytes())
    return {"bytes": path.stat().st_size, "crc32": digest.finish()}


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _signature(folder: Path) -> tuple | None:
    """Size, modification time and inode of every file of an entry (None if one is missing)."""
    try:
        return tuple(
            (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
            for st in (os.stat(folder / f) for f in ("DONE", *JSON_FILES, *ARRAY_FILES))
        )
    except OSError:
        return None


def remember_sound(folder: Path) -> None:
    """Record a just-built entry as checked: its digests were taken while writing, so it need not be read back."""
    _VERIFIED[_key(folder)] = _signature(folder)


def entry_fault(folder: Path) -> str | None:
    """What is wrong with the entry in ``folder``: None if sound, "" if never completed (no DONE), else the reason.

    Every file is checked against the sizes and block digests of the DONE
    manifest: all sizes first, then the contents, small files before the
    arrays. Done once per process and entry: afterwards only the files'
    size, modification time and inode are compared with what they were.
    """
    folder = Path(folder)
    try:
        raw = (folder / "DONE").read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as err:
        return f"DONE is unreadable: {err.strerror}"
    signature = _signature(folder)
    if signature is not None and _VERIFIED.get(_key(folder)) == signature:
        return None
    try:
        manifest = json.loads(raw)
        version, block = manifest["version"], int(manifest["block"])
        listed = ((name, manifest["files"][name]) for name in (*JSON_FILES, *ARRAY_FILES))
        entries = [
            _Digest(name, int(e["bytes"]), int(e.get("offset", 0)), e.get("header"), [int(c) for c in e["crc32"]])
            for name, e in listed
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        return "DONE is not a manifest of this cache"
    if version != CACHE_VERSION:
        return f"DONE is of cache version {version}, not {CACHE_VERSION}"
    if block <= 0 or any(len(e.crcs) != -(-(e.size - e.offset) // block) for e in entries):
        return "DONE is not a manifest of this cache"
    for entry in entries:
        try:
            size = os.stat(folder / entry.name).st_size
        except FileNotFoundError:
            return f"{entry.name} is missing"
        except OSError as err:
            return f"{entry.name} is unreadable: {err.strerror}"
        if size != entry.size:
            return f"{entry.name} has {size} bytes, not {entry.size}"
    for entry in entries:
        reason = _check_contents(folder / entry.name, entry, block)
        if reason:
            return reason
    _VERIFIED[_key(folder)] = signature
    return None


class _Digest(NamedTuple):
    """A file's line of the DONE manifest."""

    name: str
    size: int
    offset: int  # where the digested blocks start (after an array's header)
    header: int | None  # CRC-32 of the bytes before ``offset``
    crcs: list[int]  # CRC-32 of each block from ``offset`` on


def _check_contents(path: Path, entry: _Digest, block: int) -> str | None:
    """Why the bytes of ``path`` differ from its manifest entry, or None."""
    try:
        with open(path, "rb", buffering=0) as handle:
            if entry.offset and zlib.crc32(handle.read(entry.offset)) != entry.header:
                return f"{path.name} has another header"
            buf = memoryview(bytearray(block))
            for index, expected in enumerate(entry.crcs):
                got = _read_full(handle, buf)
                if zlib.crc32(buf[:got]) != expected:
                    start = entry.offset + index * block
                    return f"{path.name} differs from its digest in bytes {start}-{start + got}"
    except OSError as err:
        return f"{path.name} is unreadable: {err.strerror}"
    return None


def _read_full(handle, buf: memoryview) -> int:
    """Fill ``buf`` from ``handle`` as far as the file goes; the bytes read."""
    got = 0
    while got < len(buf):
        n = handle.readinto(buf[got:])
        if not n:
            break
        got += n
    return got
