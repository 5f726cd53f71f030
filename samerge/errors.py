"""Exceptions and warnings users see.

Every mistake a user can make (a bad path, a wrong parameter, checkpoints that do not fit together) raises
:class:`SamergeError`. It subclasses :class:`ValueError` so that ``except ValueError`` keeps working, and the CLI
turns it into one clear line and a non-zero exit code. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class SamergeError(ValueError):
    """A user-facing error: bad input, bad parameter, incompatible checkpoints."""


class CheckpointError(SamergeError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or in a format we refuse to load."""


class SamergeWarning(UserWarning):
    """Something the user should know about, where samerge goes on with a stated choice."""


def invalid(where: str, exc: ValidationError, model: type[BaseModel], *, noun: str = "key",
            error: type[SamergeError] = SamergeError) -> SamergeError:
    """The one line for the first problem pydantic found validating ``model`` (``where``: the file or the owner of
    the values): ``unknown key 'k' at LOC; valid keys: ...``, ``missing key 'k' at LOC`` or ``LOC: message (got
    value)``. ``noun`` names the keys (``parameter`` for a method's). The one pydantic error formatter of samerge."""
    err = exc.errors()[0]
    loc, kind = tuple(err["loc"]), err["type"]
    at = f" at {_where(loc[:-1])}" if loc[:-1] else ""
    if kind == "extra_forbidden":
        valid = ", ".join(_field_names(model, loc[:-1]) or []) or "(none)"
        return error(f"{where}: unknown {noun} {loc[-1]!r}{at}; valid {noun}s: {valid}")
    if kind == "missing":
        return error(f"{where}: missing {noun} {loc[-1]!r}{at}")
    msg = str(err["msg"]).removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], Mapping) else ""
    return error(f"{where}: {_where(loc) or noun + 's'}: {msg}{got}")


def _field_names(model: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """The valid keys at ``loc`` (a pydantic error location) inside ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        current = next((c for c in (ann, *typing.get_args(ann),
                                    *(a for x in typing.get_args(ann) for a in typing.get_args(x)))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _where(loc: Sequence[Any]) -> str:
    """``tasks[1].expert`` for the location ("tasks", 1, "expert")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
