"""Robust decoding of histology images into RGB arrays.

Every failure is reported as :class:`BadImage` with a short reason, so callers can
count skipped files without knowing anything about Pillow's exception types.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: File suffixes treated as images, compared case-insensitively.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

# Modes that carry an alpha channel (or a palette that may be transparent); they
# are composited on white because the glass background of an H&E slide is white.
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})


class BadImage(Exception):
    """An image file that cannot be used.

    Attributes:
        reason: Short, stable description such as ``"unreadable"``, ``"truncated"``,
            ``"empty file"``, ``"too small"`` or ``"unsupported mode"``; suitable as a
            key when counting skipped files.
        path: The offending file.
        detail: The underlying error message, if any.
    """

    def __init__(self, reason: str, path: str | os.PathLike = "", detail: str = "") -> None:
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        text = f"{self.path}: {reason}" if self.path else reason
        super().__init__(f"{text} ({detail})" if detail else text)

    def __reduce__(self) -> tuple:
        # Keep the reason when the error crosses a process boundary (loader workers).
        return type(self), (self.reason, self.path, self.detail)


def is_image_name(name: str | os.PathLike) -> bool:
    """Whether a file name has one of :data:`IMAGE_SUFFIXES` (any case)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _check_file(path: Path) -> None:
    """Reject missing and zero-byte files before Pillow sees them."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing file", path) from None
    except OSError as exc:
        raise BadImage("unreadable", path, str(exc)) from exc
    if not path.is_file():
        raise BadImage("unreadable", path, "not a regular file")
    if size == 0:
        raise BadImage("empty file", path)


def _open(path: Path) -> Image.Image:
    """Open (header only) and translate Pillow's errors into BadImage."""
    _check_file(path)
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise BadImage("too large", path, str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises many types for garbage input
        reason = "truncated" if _looks_truncated(exc) else "unreadable"
        raise BadImage(reason, path, str(exc)) from exc


def _check_size(img: Image.Image, path: Path, min_size: int) -> None:
    """Raise ``too small`` when the shorter side is below ``min_size`` (> 0)."""
    if min_size > 0 and min(img.size) < min_size:
        raise BadImage("too small", path, f"{img.size[0]}x{img.size[1]} < {min_size}")


def probe(path: str | os.PathLike, min_size: int = 0) -> tuple[int, int]:
    """Check an image cheaply by reading only its header.

    Catches missing, empty, non-image and too-small files without decoding pixels;
    truncation only shows up in :func:`load_rgb`.

    Args:
        path: Image file.
        min_size: Minimum length of the shorter side; ``0`` disables the check.

    Returns:
        ``(width, height)``.

    Raises:
        BadImage: If the file cannot be used.
    """
    path = Path(path)
    with _open(path) as img:
        _check_size(img, path, min_size)
        return img.size


def _sixteen_to_eight(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer grayscale image to 8 bits, as HxWx3.

    Mode ``I`` is treated as 16-bit data (older Pillow opens 16-bit PNGs that way),
    so the scaling does not depend on the image's own value range.
    """
    arr = np.asarray(img).astype(np.int64)
    arr = np.clip(arr, 0, 65535)
    gray = ((arr * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _on_white(img: Image.Image) -> np.ndarray:
    """Composite an image with transparency on a white background."""
    rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
    rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:4]
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded image of any supported mode to an HxWx3 uint8 array."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_to_eight(img)
    if mode in _ALPHA_MODES or (mode in ("P", "L") and "transparency" in img.info):
        return _on_white(img)
    if mode == "F":
        # Float images have no agreed intensity scale; guessing one would be silent.
        raise BadImage("unsupported mode", path, mode)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise BadImage("unsupported mode", path, mode) from exc


def load_rgb(path: str | os.PathLike, min_size: int = 0) -> np.ndarray:
    """Decode an image file into an RGB array.

    Handles modes L, LA, RGBA (composited on white), P, CMYK, I;16 and I (scaled
    from 16 to 8 bits) and 1. Truncated files are reported rather than padded, so
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay off. EXIF orientation is ignored:
    histology tiles have no "up".

    Args:
        path: Image file.
        min_size: Minimum length of the shorter side; ``0`` (default) accepts any
            size so that callers may pad small images instead.

    Returns:
        Array of shape ``(H, W, 3)`` and dtype ``uint8``.

    Raises:
        BadImage: With reason ``missing file``, ``empty file``, ``unreadable``,
            ``too large``, ``truncated``, ``corrupt data``, ``too small`` or
            ``unsupported mode``.
    """
    path = Path(path)
    with _open(path) as img:
        _check_size(img, path, min_size)
        try:
            img.load()
        except MemoryError:
            raise
        except Exception as exc:  # decoder errors come in many types
            reason = "truncated" if _looks_truncated(exc) else "corrupt data"
            raise BadImage(reason, path, str(exc)) from exc
        arr = _to_rgb_array(img, path)
    return np.ascontiguousarray(arr)


def _looks_truncated(exc: BaseException) -> bool:
    """Whether a decoder error means the file ended early."""
    return isinstance(exc, EOFError) or "truncat" in str(exc).lower()
