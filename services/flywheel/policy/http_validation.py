"""Strict checks of JSON request bodies, shared by the TGI routes (http.py) and the OpenAI routes
(openai_routes.py).

A body is read by `read_json` (core.http.read_json_object, the one parser every JSON route of
every service uses): malformed bodies are 400 / 413 / 415 there. Past it, every failure is an
errors.InvalidArgument (HTTP 422) whose message names the field and the fix; an unknown field is
an error too, so a typo is never silently ignored. These checks are about the JSON's shape and
types only: the ranges of the sampling values are GenerationRequest's (policy/requests.py), so
gRPC and HTTP callers meet the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, overload

from aiohttp import web

from flywheel.core import errors
from flywheel.core.http import read_json_object, shown

bad = errors.InvalidArgument


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (core.http.read_json_object)."""
    return await read_json_object(request)


def strict(obj: dict[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse fields of `obj` not in `known`."""
    unknown = sorted(set(obj) - set(known))
    if unknown:
        names = ", ".join(repr(u[:40]) for u in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise bad(f"unknown field(s) {names} in {where}: the fields are {', '.join(known)}")


@overload
def number(obj: dict[str, Any], name: str) -> float | None: ...
@overload
def number(obj: dict[str, Any], name: str, kind: type[int]) -> int | None: ...
@overload
def number(obj: dict[str, Any], name: str, kind: type[float]) -> float | None: ...
def number(obj: dict[str, Any], name: str, kind: type[int] | type[float] = float) -> int | float | None:
    """obj[name] as `kind` (an int must be a whole number), None when absent; booleans are refused."""
    v = obj.get(name)
    if v is None:
        return None
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"`{name}` must be {what}, got {shown(v)}")
    if isinstance(v, int):
        if kind is int:
            return v
        if abs(v) > 2**1023:
            raise bad(f"`{name}` must be a number that fits a 64-bit float, got {shown(v)}")
        return float(v)
    if kind is int and not v.is_integer():
        raise bad(f"`{name}` must be {what}, got {shown(v)}")
    return kind(v)


def flag(obj: dict[str, Any], name: str, default: bool = False) -> bool:
    """obj[name] as a JSON boolean, `default` when absent."""
    v = obj.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"`{name}` must be true or false, got {shown(v)}")
    return v


def stops(obj: dict[str, Any], name: str) -> list[str]:
    """Stop sequences: a string or a list of strings."""
    v = obj.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(f"`{name}` must be a string or a list of strings")
    return list(v)


def unsupported(obj: dict[str, Any], name: str, ok: Callable[[Any], bool], fix: str) -> None:
    """Refuse a field of the API that this server does not implement, unless its value is harmless."""
    v = obj.get(name)
    if v is not None and not ok(v):
        raise bad(f"`{name}` = {shown(v, 60)} is not supported by this server: {fix}")
