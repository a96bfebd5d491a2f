"""Writing a uint8 ``.npy`` array row by row, with its digests taken on the way.

The cache streams each image's patch pairs to disk with ordinary writes (a
full disk is then an error, not the SIGBUS of a memory map) after a header
reserved for the largest possible row count, and fixes the header up to the
real count at the end, so the file is a plain ``.npy`` that ``np.load(...,
mmap_mode="r")`` reads. The CRC-32 block digests of ``DONE`` are taken from the
bytes as they go out, so a new entry is never read back to digest it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from data.cache.integrity import BlockDigest


def npy_header(shape: Sequence[int], length: int | None = None) -> bytes:
    """The .npy 1.0 header of a C-order uint8 array of ``shape``, byte for byte as ``np.save`` writes it.

    With ``length``, padded with spaces to that many bytes (a header reserved for
    more rows than were written then keeps its place).
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": tuple(int(n) for n in shape),
        },
    )
    head = buf.getvalue()
    if length is not None and len(head) != length:
        if len(head) > length or length - 10 > 0xFFFF:
            raise ValueError(f".npy header of {len(head)} bytes does not fit in {length}")
        head = head[:8] + struct.pack("<H", length - 10) + head[10:-1] + b" " * (length - len(head)) + b"\n"
    return head


class ArrayWriter:
    """Rows of a uint8 array written to an open .npy file whose header is fixed up to the final count at the end."""

    def __init__(self, handle, row_shape: tuple[int, ...], capacity: int):
        self.handle, self.row_shape, self.rows = handle, tuple(row_shape), 0
        placeholder = npy_header((capacity, *self.row_shape))  # as long as any header for fewer rows
        self.offset = len(placeholder)
        handle.write(placeholder)
        self.digest = BlockDigest()

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"patches of shape {array.shape[1:]} in a cache of {self.row_shape}")
        view = memoryview(array).cast("B")
        self.handle.write(view)
        self.digest.update(view)
        self.rows += len(array)

    def finish(self) -> dict:
        """Write the real header; the file's manifest entry (size, header and block digests)."""
        header = npy_header((self.rows, *self.row_shape), self.offset)
        self.handle.seek(0)
        self.handle.write(header)
        self.handle.seek(0, os.SEEK_END)
        size = self.offset + self.rows * int(np.prod(self.row_shape))
        return {
            "bytes": size,
            "offset": self.offset,
            "header": zlib.crc32(header),
            "shape": [self.rows, *self.row_shape],
            "crc32": self.digest.finish(),
        }
