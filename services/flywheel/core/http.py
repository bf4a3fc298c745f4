"""HTTP plumbing shared by every service's aiohttp app: the one parser of JSON request bodies,
TGI-shaped error bodies and HTTP metrics.

Every JSON route reads its body with `read_json_object`, so malformed input is refused the same
way everywhere, and always with a 4xx that says what to send instead:

| the body | status |
|---|---|
| no Content-Type, or not `application/json` (nor `application/*+json`) | 415 |
| a charset other than UTF-8 | 415 |
| larger than the app's `client_max_size` (`server.max_http_body_mb`) | 413 |
| a corrupt `Content-Encoding` (gzip, deflate) | 400 |
| not UTF-8, empty, not JSON (truncated, `NaN`, trailing text), a lone UTF-16 surrogate | 400 |
| nested deeper than MAX_JSON_DEPTH, an integer of over 4,300 digits (Python's limit), a float beyond 64 bits | 400 |
| JSON, but not an object at the top | 422 (errors.InvalidArgument, as every wrong field) |

A 500 never shows exception text (it may hold file paths or internals): the caller gets a
reference that the service's log line carries with the details.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from flywheel.core import metrics
from flywheel.core.errors import (
    FlywheelError,
    InvalidArgument,
    internal_error_message,
    log_internal,
    retry_after_header,
)

log = logging.getLogger("flywheel.http")

# Deeper JSON than any request of ours needs (a chat message's content parts are 4 levels); the
# bound keeps every later walk over a body cheap and far from Python's recursion limit.
MAX_JSON_DEPTH = 32
# Bodies up to this size are parsed on the event loop (microseconds); larger ones on a thread.
PARSE_INLINE_BYTES = 64 << 10
JSON_TYPES = ("application/json",)
UTF8_NAMES = ("utf-8", "utf8")


class BodyError(FlywheelError):
    """A request body the server cannot take (HTTP only; INVALID_ARGUMENT should one reach gRPC).
    `close_connection`: the connection cannot carry another request (the answer says Connection: close)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    close_connection = False


class BadRequest(BodyError):
    """HTTP 400: the body cannot be read as JSON at all."""

    http_status, error_type = 400, "bad_request"


class PayloadTooLarge(BodyError):
    """HTTP 413: the body is over the server's limit."""

    http_status, error_type = 413, "payload_too_large"


class UnsupportedMediaType(BodyError):
    """HTTP 415: the body is not declared as UTF-8 JSON."""

    http_status, error_type = 415, "unsupported_media_type"


# ---------------------------------------------------------------------------- request bodies


def check_content_type(content_type_header: str | None, content_type: str, charset: str | None) -> None:
    """UnsupportedMediaType unless the request declares JSON in UTF-8 (or no charset: JSON is UTF-8)."""
    if not content_type_header:
        raise UnsupportedMediaType("the request has no Content-Type: send the body as JSON with application/json")
    if content_type not in JSON_TYPES and not (
        content_type.startswith("application/") and content_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"Content-Type {content_type[:60]!r} is not supported: send the body as JSON with application/json"
        )
    if charset is not None and charset.lower() not in UTF8_NAMES:
        raise UnsupportedMediaType(f"charset {charset[:40]!r} is not supported: send JSON in UTF-8 (charset=utf-8)")


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most the app's client_max_size bytes (PayloadTooLarge past it)."""
    limit = request.client_max_size
    too_large = PayloadTooLarge(
        f"the body is over the limit of {limit} bytes: send less (the server.max_http_body_mb setting)"
    )
    too_large.close_connection = True  # the rest of the body is still on the wire
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked or compressed body grew past the limit
        raise too_large from None
    except RequestPayloadError as e:  # corrupt gzip/deflate, broken chunked framing
        why = str(e).strip().splitlines()[-1].strip()[:100]
        err = BadRequest(f"the body could not be read ({why}): send it uncompressed or correctly encoded")
        err.close_connection = True  # aiohttp drops the connection after a payload error
        raise err from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object; BadRequest / PayloadTooLarge / UnsupportedMediaType /
    InvalidArgument (module doc) otherwise. Every JSON route reads its body with this. A large body
    is parsed on a worker thread, so one request cannot stall the event loop that serves the others."""
    check_content_type(request.headers.get("Content-Type"), request.content_type, request.charset)
    raw = await read_body(request)
    if len(raw) <= PARSE_INLINE_BYTES:
        return parse_json_object(raw)
    return await asyncio.get_running_loop().run_in_executor(None, parse_json_object, raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """`raw` (UTF-8 JSON) as a dict; never raises anything but a FlywheelError (module doc)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"the body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): send JSON in UTF-8"
        ) from None
    if not text.strip():
        raise BadRequest("the body is empty: send a JSON object")
    try:
        value = json.loads(text, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): send one JSON object"
        ) from None
    except RecursionError:  # the C scanner's guard, on nesting of about a thousand levels
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels: flatten it") from None
    except ValueError:  # int(): Python refuses integer literals over sys.get_int_max_str_digits() (4,300)
        raise BadRequest(
            f"the body has an integer of over {sys.get_int_max_str_digits()} digits: send a smaller number"
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"the body must be a JSON object, got {_kind(value)}")
    _check_tree(value, check_strings="\\u" in text)
    return value


def _constant(literal: str) -> Any:
    raise BadRequest(f"{literal} is not JSON: send a finite number")


def _check_tree(value: dict[str, Any], check_strings: bool) -> None:
    """BadRequest for nesting deeper than MAX_JSON_DEPTH, a float literal beyond 64 bits (json reads
    1e999 as inf), and (when the text had \\u escapes) a lone UTF-16 surrogate, which no UTF-8
    consumer (protobuf, Kafka, a tokenizer) can take. Visits containers only; their scalars are
    looked at by type in C (`set(map(type, ...))`) and one by one only when a float or a string
    needs a look, so a 4 MiB array of numbers costs milliseconds."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels: flatten it")
        items = list(v.values()) if isinstance(v, dict) else v
        kinds = set(map(type, items))
        if float in kinds:
            for x in items:
                if type(x) is float and not math.isfinite(x):
                    raise BadRequest("the body has a number beyond a 64-bit float (such as 1e999): send a smaller one")
        if check_strings:
            for s in (*v.keys(), *items) if isinstance(v, dict) else items:
                if type(s) is str:
                    _check_string(s)
        if dict in kinds or list in kinds:
            stack.extend((x, depth + 1) for x in items if type(x) is dict or type(x) is list)


def _check_string(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"a string in the body holds a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x}): send valid Unicode"
        ) from None


def _kind(v: Any) -> str:
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return "a number"


def shown(v: Any, limit: int = 40) -> str:
    """A short, safe rendering of a JSON value for an error message (never the whole of a big value)."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return json.dumps(v[:limit]) + ("..." if len(v) > limit else "")
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
        return f"an integer of about {int(v.bit_length() * 0.30103)} digits"
    text = json.dumps(v) if isinstance(v, bool | float | int) or v is None else repr(v)
    return text[:limit] + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------------------- error bodies


def error_body(exc: BaseException, where: str = "an HTTP request") -> tuple[dict[str, str], int, dict[str, str]]:
    """TGI's error body, HTTP status and headers for an exception. A 500 (an unexpected exception,
    or a FlywheelError of INTERNAL / DATA_LOSS) carries a reference instead of its text, which may
    name files or internals; the error is logged under that reference with `where`."""
    if isinstance(exc, FlywheelError):
        headers = {} if exc.retry_after_s is None else {"Retry-After": retry_after_header(exc.retry_after_s)}
        return exc.http_body(where), exc.http_status, headers
    body = {"error": internal_error_message(log_internal(exc, where)), "error_type": "internal"}
    return body, 500, {}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """FlywheelError -> its HTTP status with TGI's body; anything else -> 500 with the same shape.

    aiohttp's own HTTP exceptions (404, 405, redirects) pass through unchanged. Also records
    HTTP metrics by route template so that path parameters cannot blow up label cardinality.
    """
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # client went away
        raise
    except Exception as exc:
        body, status, headers = error_body(exc, f"{request.method} {request.path}")
        if status > 500:  # 503, 504: the caller's message; a 500 was logged with its reference
            log.error("%s %s failed: %s", request.method, request.path, body["error"])
        response = web.json_response(body, status=status, headers=headers)
        if isinstance(exc, BodyError) and exc.close_connection:
            response.force_close()
        return response
    finally:
        metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        metrics.HTTP_LATENCY.labels(route, request.method).observe(time.perf_counter() - started)
