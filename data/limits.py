"""Bounds of data settings, shared by the config (which refuses values beyond them) and the data layer.

Kept in a module that imports nothing, so that reading the settings does not load numpy or Pillow.
"""

from __future__ import annotations

#: Largest simulated lab difference (``data.site_shift``): at 4 stains turn by up to 32 degrees and JPEG
#: quality bottoms out.
MAX_SITE_SHIFT = 4.0


def check_int(name: str, value: object, low: int, high: int) -> None:
    """Raise ValueError naming the field unless ``value`` is an int (not a bool) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")
