"""The one base class of errors caused by what the user gave us (a setting, a path, a file).

Every user-input error type derives from :class:`UserError`, so the command-line entrypoints catch one type and
print one ``ERROR: ...`` line (no traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where (a key, a path, a line)."""


class ConfigError(UserError, ValueError):
    """A setting is invalid: the message starts with the key (``epochs: must be >= 1, got 0``)."""


class CheckpointError(UserError):
    """A checkpoint could not be used (missing, corrupt, unsupported, unsafe, or not fitting its model)."""
