"""The base of every configuration model (extra keys refused, values frozen) and its one-line error message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def one_line(err: ValidationError, source: str) -> str:
    """The first problem of a pydantic error as `source: a.b.c: message (+N more)`."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {key}: {msg}{more}"
