"""The errors that mean "the input or the settings are wrong", as opposed to a bug.

Entry points (``train.py``, ``eval.py``, ``python -m data.prepare``, ``python -m fedsim.experiments``)
print a :class:`UserError` as one line and exit with code 2; any other exception is a bug and shows its
traceback. The family lives in the bottom layer and imports nothing, so ``data/`` and ``models/`` raise it
without importing ``fedsim`` (which re-exports it as ``fedsim.errors``) and without pulling in torch or numpy.

They derive from :class:`ValueError`, so library code that caught ``ValueError`` before still does.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or settings: the message is one line that names the setting or file and what is allowed."""


class DataError(UserError):
    """The data named by the settings cannot be used: a bad manifest, unknown classes, a split or partition
    the images cannot fill, a cache entry that is corrupt."""


class WeightsError(UserError):
    """Weights (``model.pretrained``, a checkpoint's model) that cannot be read or do not fit the model."""
