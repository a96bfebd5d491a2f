"""The checks every table of settings runs when it is built, the bounds they use, and their error.

:class:`ConfigError` is the one error a bad setting raises: one line naming the field and what is
allowed. The helpers here (:func:`_within`, :func:`_at_least`, :func:`_check_choices`) write those lines
the same way for every table, so a message reads alike whichever table refused the value. The ``MAX_*``
bounds stop values the code cannot use (overflow, absurd allocations), far above real use.

These names are private to :mod:`fedsim.config` (its tables and its loading); other code imports
:class:`ConfigError` and the bounds from the package.
"""

from __future__ import annotations

import functools
import math
from dataclasses import fields
from typing import Any, get_type_hints

from fedsim.errors import UserError
from fedsim.settings import choices


class ConfigError(UserError):
    """An invalid setting; the message names the field and what is allowed."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a table (evaluating them is slow; every config build needs them)."""
    return get_type_hints(cls)


def _check_choices(table: Any) -> None:
    """Each field of ``table`` whose type is a ``Literal`` holds one of its values; the message lists them."""
    hints = _hints(type(table))
    for f in fields(table):
        allowed, value = choices(hints[f.name]), getattr(table, f.name)
        if allowed and value not in allowed:
            raise ConfigError(
                f"{table.PREFIX}{f.name} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
            )


def _show(value: Any) -> str:
    """``repr`` of a value in an error, cut short when it is a huge number or a long text."""
    text = repr(value)
    if len(text) <= 40:
        return text
    if isinstance(value, int):
        return f"{text[:6]}...({len(str(abs(value)))} digits)"
    return text[:37] + "..."


def _at_least(name: str, value: float, low: float, inclusive: bool = True) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float is still finite
        finite = True
    ok = finite and (value >= low if inclusive else value > low)
    if not ok:
        raise ConfigError(f"{name} = {_show(value)} must be a finite number {'>=' if inclusive else '>'} {low}")


def _num(value: float) -> str:
    """A bound as people write it: 65536, 1e+04 -> 10000, 4294967295."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _within(name: str, value: float, low: float, high: float, inclusive: bool = True) -> None:
    """``low <= value <= high`` (``low < value`` unless inclusive), finite; one line naming the field and the range."""
    _at_least(name, value, low, inclusive)
    if value > high:
        raise ConfigError(
            f"{name} = {_show(value)} is too large: it must lie in "
            f"{'[' if inclusive else '('}{_num(low)}, {_num(high)}]"
        )


#: Upper bounds. They stop values the code cannot use (overflow, absurd allocations), far above real use.
MAX_SIDE = 8192  # patch sides and fields of view, pixels
MAX_PATCHES = 4096  # patch pairs per image
MAX_COUNT = 100_000  # rounds
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_HIDDEN = 65_536
MAX_HOSPITALS = 4096
MAX_WORKERS = 256
MAX_CHECKPOINTS = 10_000
MAX_XAI = 1000
MAX_SYNTHETIC = 1000  # synthetic patients per grade, images per patient
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
MAX_MU = 1e4
MAX_MIXUP = 1000.0
MAX_DIRICHLET = 1e6
MAX_SEED = 2**32 - 1  # numpy's legacy seeding range; torch.manual_seed and SeedSequence take it too
