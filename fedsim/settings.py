"""How a config field is declared once, and what the command lines and hashes derive from it.

A field of the config tree (:mod:`fedsim.config`) carries, next to its type and docstring, how it is
reached from the command line and what it changes::

    mu: float = setting(0.01, flag="--mu", help="FedProx proximal weight; 0 = FedAvg (paper: 0.01)")
    \"\"\"FedProx proximal weight, in [0, 1e4]; 0 = plain FedAvg.\"\"\"

From these declarations come ``train.py``'s named flags (``flag``), ``python -m data.prepare``'s flags
(``prepare``, with the config's own defaults), the allowed values of a ``Literal`` type, the settings that
``RunConfig.digest`` leaves out (``weights=False``), those the study runner ignores when it decides
whether two runs are the same run (``launch=True``), and those added after run folders existed
(``omit_default=True``): at their default they are left out of the digest and of ``config.json``, so
folders written before them still resume and read the same. This module imports only the standard library.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

try:
    from typing import dataclass_transform
except ImportError:  # pragma: no cover - Python 3.10: the decorator only informs type checkers

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda decorated: decorated


#: Metadata key of a declared field.
_META = "fedsim"


@dataclass(frozen=True)
class Setting:
    """One declared config field, by its dotted key."""

    key: str
    """Dotted name, e.g. ``train.mu``."""
    type: Any
    """The annotated type (``int``, ``Literal["a", "b"]``, ``list[float]`` ...)."""
    default: Any
    flag: str | None
    """``train.py``'s named flag; None: reached through ``--config`` and ``--set`` only."""
    prepare: str | None
    """``python -m data.prepare``'s flag; None: data.prepare does not take it."""
    help: str | None
    """The flags' help text."""
    weights: bool
    """True: it changes the trained weights, so it is part of ``RunConfig.digest``."""
    launch: bool
    """True: it only says where or how the run starts (the run folder, ``--resume``): two runs that differ
    in it alone are the same run."""
    metavar: Any = None
    omit_default: bool = False
    """True: added after run folders existed; at its default it is left out of the digest and config.json."""

    @property
    def choices(self) -> tuple | None:
        """The values a ``Literal`` type allows, else None."""
        return choices(self.type)


def setting(
    default: Any,
    *,
    flag: str | None = None,
    prepare: str | None = None,
    help: str | None = None,
    weights: bool = True,
    launch: bool = False,
    metavar: Any = None,
    omit_default: bool = False,
) -> Any:
    """A dataclass field with its declaration (see :class:`Setting`); a list default is copied per instance.

    ``launch=True`` implies ``weights=False``: where a run writes cannot change what it learns.
    """
    meta = {
        _META: {
            "flag": flag,
            "prepare": prepare,
            "help": help,
            "weights": weights and not launch,
            "launch": launch,
            "metavar": metavar,
            "omit_default": omit_default,
        }
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


T = TypeVar("T")


@dataclass_transform(kw_only_default=True, field_specifiers=(dataclasses.field, setting))
def table(cls: type[T]) -> type[T]:
    """A table of settings: a keyword-only dataclass whose fields may be declared with :func:`setting`.

    The decorator tells type checkers and linters that :func:`setting` makes a field, as ``field`` does.
    """
    return dataclass(kw_only=True)(cls)


def choices(hint: Any) -> tuple | None:
    """``Literal["a", "b"]`` -> ("a", "b"); None for any other type."""
    return get_args(hint) if get_origin(hint) is Literal else None


def plain_type(hint: Any) -> Any:
    """The type a value is checked against: the type of a ``Literal``'s values, else the hint itself."""
    allowed = choices(hint)
    return type(allowed[0]) if allowed else hint


def declared(root: type, prefix: str = "") -> tuple[Setting, ...]:
    """Every leaf field under the dataclass ``root``, in declaration order (nested tables walked through).

    A field declared without :func:`setting` changes the weights and has no flag.
    """
    hints = get_type_hints(root)
    found: list[Setting] = []
    for f in dataclasses.fields(root):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found += declared(hint, f"{prefix}{f.name}.")
            continue
        meta = f.metadata.get(_META, {})
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        found.append(
            Setting(
                f"{prefix}{f.name}",
                hint,
                default,
                meta.get("flag"),
                meta.get("prepare"),
                meta.get("help"),
                meta.get("weights", True),
                meta.get("launch", False),
                meta.get("metavar"),
                meta.get("omit_default", False),
            )
        )
    return tuple(found)


def add_flags(parser: argparse.ArgumentParser, settings: Iterable[Setting], which: str = "flag") -> list[Setting]:
    """Add each setting's ``which`` flag ("flag" or "prepare") to ``parser``; returns the settings added.

    Every flag defaults to None (absent), so the config's own default applies: an entry point cannot
    disagree with it. The value goes to the config unchecked but for its plain type; the config checks it
    and names the field. A boolean flag switches the setting on; a list of texts is one comma-separated
    argument, a list of numbers as many arguments as its default has.
    """
    added = []
    for s in settings:
        name = getattr(s, which)
        if name is None:
            continue
        kind = plain_type(s.type)
        options: dict[str, Any] = {"dest": s.key, "default": None, "help": s.help}
        if kind is bool:
            options["action"] = "store_true"
        elif get_origin(kind) is list and get_args(kind) != (str,):
            options.update(type=get_args(kind)[0], nargs=len(s.default))
        else:
            options["type"] = str if get_origin(kind) is list else kind
        if s.metavar is not None:
            options["metavar"] = s.metavar
        parser.add_argument(name, **options)
        added.append(s)
    return added


def given(args: argparse.Namespace, settings: Iterable[Setting]) -> list[tuple[str, Any]]:
    """(key, value) of every flag of ``settings`` given on the command line, for ``config.resolve``."""
    return [(s.key, getattr(args, s.key)) for s in settings if getattr(args, s.key, None) is not None]
