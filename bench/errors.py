"""The mistakes a user can make, as opposed to bugs.

The CLI turns these, and only these, into one-line messages; any other exception is a bug in
the harness or a detector and is shown with its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, flag, detector parameter, device or setting is not what was expected."""


class DataError(ValueError):
    """A dataset or an input file on disk is missing, unreadable or not in the expected form."""


#: the errors the CLI reports in one line
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)
