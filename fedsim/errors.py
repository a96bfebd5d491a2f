"""The user-error family (see :mod:`data.errors`, where it lives so the bottom layer can raise it)."""

from data.errors import DataError, UserError, WeightsError

__all__ = ["DataError", "UserError", "WeightsError"]
