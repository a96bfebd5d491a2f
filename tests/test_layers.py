"""The import direction of the house: ``models/`` and ``data/`` never import ``fedsim``.

``data/prepare.py`` is an entry point (``python -m data.prepare``) that takes its flags from the settings
declared in ``fedsim.config``; it is the one module of the bottom layer allowed to look up.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"data/prepare.py"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


BOTTOM = sorted(
    p.relative_to(ROOT).as_posix()
    for package in ("data", "models")
    for p in (ROOT / package).rglob("*.py")
    if p.relative_to(ROOT).as_posix() not in ENTRY_POINTS
)


def test_the_bottom_layer_has_modules_to_check():
    assert len(BOTTOM) >= 10 and "models/dual_stream.py" in BOTTOM and "data/errors.py" in BOTTOM


@pytest.mark.parametrize("module", BOTTOM)
def test_the_bottom_layer_does_not_import_fedsim(module):
    upward = sorted(m for m in _imported_modules(ROOT / module) if m == "fedsim" or m.startswith("fedsim."))
    assert not upward, f"{module} imports {upward}: models/ and data/ must not depend on the federation"


def test_the_error_family_is_one_family():
    import data.errors
    import fedsim.errors

    assert fedsim.errors.UserError is data.errors.UserError
    assert issubclass(data.errors.DataError, data.errors.UserError)
    assert issubclass(data.errors.WeightsError, data.errors.UserError)
