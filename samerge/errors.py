"""Exceptions and warnings users see.

Every mistake a user can make (a bad path, a wrong parameter, checkpoints that do not fit together) raises
:class:`SamergeError`. It subclasses :class:`ValueError` so that ``except ValueError`` keeps working, and the CLI
turns it into one clear line and a non-zero exit code. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class SamergeError(ValueError):
    """A user-facing error: bad input, bad parameter, incompatible checkpoints."""


class CheckpointError(SamergeError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or in a format we refuse to load."""


class SamergeWarning(UserWarning):
    """Something the user should know about, where samerge goes on with a stated choice."""
