"""Building the config tree from nested dicts, TOML presets and ``--set key=value``; checking and saving it.

Precedence: dataclass defaults < ``--config`` TOML preset < ``--set key=value`` < the named flags
(``--rounds`` ...), applied by :func:`resolve` in that order. Values are checked strictly against their
annotated types as the tree is built (:func:`from_dict`): no boolean for a count, no list for a path, each
problem one :class:`~fedsim.config.checks.ConfigError` line naming the field. :func:`check_inputs` then
checks the files the config names, before any work; :func:`save` writes the resolved tree as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from data.files import write_atomic
from fedsim.config.checks import ConfigError, _hints, _show
from fedsim.config.tree import RunConfig
from fedsim.errors import UserError
from fedsim.settings import plain_type


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown keys by name."""
    return _build(RunConfig, tree, "")


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(tree) - known)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} ({where} has: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in tree.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a table of settings")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    """How a wrong value is shown in an error: its TOML kind, and the value when short."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        return f"the list {text}" if len(text) <= 60 else f"a list of {len(value)} values"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotated type, strictly, with a one-line error.

    A string field takes strings only, a count integers only (no booleans: ``true``
    is not 1), a float field numbers (integers included), a boolean ``true``/``false``
    (or yes/no/on/off/1/0 written as a string); a numeric field also takes a string
    that spells a number. Lists take lists, or a comma-separated string.
    """
    hint = plain_type(hint)  # a Literal is checked as its values' type here, its choices by the table
    origin = get_origin(hint)
    if origin is list:
        (inner,) = get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {_describe(value)}")
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    wrong = ConfigError(f"{name} must be {_KINDS.get(hint, hint.__name__)}, got {_describe(value)}")
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if hint is bool:
        try:
            return _to_bool(value)
        except ValueError:
            raise wrong from None
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10) if hint is int else float(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise wrong from None
        if hint is int and isinstance(value, float):
            if not value.is_integer():
                raise wrong
            value = int(value)
        try:
            return hint(value)
        except OverflowError:
            raise ConfigError(f"{name} = {_show(value)} is too large for a number") from None
    raise ConfigError(f"{name}: unsupported setting type {hint!r}")  # pragma: no cover - a config field of a new type


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset; a missing, unreadable, non-UTF-8 or malformed file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = blob.decode("utf-8-sig")  # a byte-order mark, as some editors write, is no error
    except UnicodeDecodeError as err:
        decoded = bytes(err.object)  # the bytes after a byte-order mark, which err.start counts in
        line = decoded[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 (line {line}: byte 0x{decoded[err.start]:02x}); save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(t, "train.mu", 0.1)`` sets ``t["train"]["mu"]``, creating tables."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a table of settings")
    node[parts[-1]] = value


def field_type(key: str) -> Any:
    """The annotated type of a dotted config key (``"data.path"`` -> str), or None if there is no such field."""
    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = _hints(cls).get(part)
        if hint is None:
            return None
        if i == len(parts) - 1:
            return hint
        cls = hint
    return None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.mu=0.1"`` -> ("train.mu", 0.1): the value is read as TOML, else kept as a string.

    For a text field (``data.path=/x``, ``data.only_hospital=2``) and a list of texts an unquoted
    value stays the text as written; a quoted one is read as TOML (``train.simulate_crash='"H2:3"'``).
    A boolean field also takes 1/0, yes/no, on/off.
    """
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw
    hint = plain_type(field_type(key))
    textual = hint is str or (get_origin(hint) is list and get_args(hint) == (str,))
    if textual and not isinstance(value, (str, list)):
        return key, raw  # a number, boolean or date written where text is expected: the text itself
    if hint is bool and not isinstance(value, bool):
        return key, raw  # --set train.compile=1 / yes: the word decides
    return key, value


def resolve(preset: str | None, assignments: list[tuple[str, Any]]) -> RunConfig:
    """Defaults, then the preset, then each assignment in order."""
    tree = load_toml(preset) if preset else {}
    for key, value in assignments:
        set_dotted(tree, key, value)
    return from_dict(tree)


def check_inputs(cfg: RunConfig) -> None:
    """Refuse, before any work, files named in the config that are missing or unreadable.

    Checks ``data.path`` (exists), ``data.stain_reference`` (a readable file) and
    ``model.pretrained`` (a readable file whose tensors fit ``model.backbone``).

    Raises:
        ConfigError: one line naming the field and the file.
        UserError: ``model.backbone`` is not a timm model (checked when weights are to be loaded into it).
    """
    data = cfg.data
    if data.path and not Path(data.path).exists():
        raise ConfigError(f"data.path = {data.path!r}: data path does not exist")
    if not data.path and data.source == "benchmark":
        from fedsim.sources import check_benchmark_settings

        check_benchmark_settings(cfg)
    for name, value in (("data.stain_reference", data.stain_reference), ("model.pretrained", cfg.model.pretrained)):
        if value:
            _readable_file(name, value)
    if cfg.model.pretrained:
        from models import check_backbone, check_pretrained

        check_backbone(cfg.model.backbone)  # a UserError naming model.backbone
        try:
            check_pretrained(
                cfg.model.backbone,
                cfg.model.scales,
                cfg.model.pretrained,
                len(cfg.data.classes),
                cfg.model.hidden,
                cfg.norm,
            )
        except (UserError, FileNotFoundError) as err:
            raise ConfigError(f"model.pretrained: {err}") from None


def _readable_file(name: str, value: str) -> None:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"{name} = {value!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{name} = {value!r} is not a file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise ConfigError(f"{name} = {value!r} cannot be read: {err.strerror or err}") from None


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically: temporary file, fsync, rename)."""
    write_atomic(path, json.dumps(cfg.record(), indent=2, sort_keys=True) + "\n")
