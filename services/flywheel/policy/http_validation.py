"""Strict checks of JSON request bodies, shared by the TGI routes (http.py) and the OpenAI routes
(openai_routes.py).

Every failure is an errors.InvalidArgument (HTTP 422) whose message names the field and the fix;
an unknown field is an error too, so a typo is never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, overload

from aiohttp import web

from flywheel.core import errors

bad = errors.InvalidArgument


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def strict(obj: dict[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse fields of `obj` not in `known`."""
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))} in {where}: the fields are {', '.join(known)}")


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
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
        raise bad(f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    return kind(v)


def flag(obj: dict[str, Any], name: str, default: bool = False) -> bool:
    """obj[name] as a JSON boolean, `default` when absent."""
    v = obj.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"`{name}` must be true or false, got {json.dumps(v)[:40]}")
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
        raise bad(f"`{name}` = {json.dumps(v)[:60]} is not supported by this server: {fix}")
