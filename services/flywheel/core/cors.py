"""Cross-origin access from browsers (CORS) by an allow-list of exact origins, and `nosniff` on
every HTTP answer (docs/SECURITY.md, 'CORS').

A page on another origin (an application's own site with the feedback widget, the feedback page
on its own port) may call a service's HTTP API only when its origin is listed in
`server.cors_origins`. For a listed Origin a preflight (`OPTIONS` with
Access-Control-Request-Method, on any path) answers 204 with the methods and headers the APIs use,
and every answer carries Access-Control-Allow-Origin (that origin, never `*`), Vary: Origin and the
x-flywheel-* headers exposed to scripts. No cookies are involved and Access-Control-Allow-Credentials
is never sent: browsers authenticate with a bearer session (core/sessions.py), never an API key. An
unlisted origin gets no CORS headers (the browser then hides the answer) and its preflight a 403 that
says what to configure.

The headers are set in aiohttp's on_response_prepare signal, so streamed answers (their headers
leave before the handler returns) and aiohttp's own 404 / 405 get them too.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from flywheel.core import errors

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "authorization, content-type, x-flywheel-user-id"
EXPOSE_HEADERS = "x-flywheel-interaction-id, x-flywheel-policy-version, x-flywheel-feedback-token, retry-after"
MAX_AGE_S = "600"
EXAMPLE = "write each origin as scheme://host[:port], e.g. https://app.example.com or http://localhost:3000"
_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def origin_problem(origin: str) -> str | None:
    """What is wrong with `origin` as an entry of server.cors_origins, None when it is a valid one.
    Browsers send Origin in lower case, without a path and without the scheme's default port; an
    entry must match that text exactly, so anything else would never match and is refused."""
    o = origin.strip()
    if "*" in o:
        return f"{o!r}: wildcards are not allowed (any site could then call with its user's session); {EXAMPLE}"
    if "://" not in o:
        return f"{o!r} has no scheme: {EXAMPLE}"
    scheme, _, rest = o.partition("://")
    if any(c in rest for c in "/?#"):
        return f"{o!r} has a path: an origin ends after the host and port (no '/'); {EXAMPLE}"
    if o != o.lower():
        return f"{o!r}: write it in lower case, as browsers send it ({o.lower()})"
    m = _ORIGIN.fullmatch(o)
    if m is None:
        return f"{o!r} is not an http(s) origin: {EXAMPLE}"
    port = m.group(3)
    if port is not None and (port.startswith("0") or not 1 <= int(port) <= 65535):
        return f"{o!r}: the port must be in 1..65535, without leading zeros"
    if port is not None and _DEFAULT_PORTS[scheme] == port.lstrip("0"):
        return f"{o!r}: leave out the default port :{port} (browsers send {scheme}://{m.group(2)})"
    return None


def preflight_middleware(origins: Iterable[str]) -> Any:
    """Answer a CORS preflight before routing: 204 for a listed Origin, 403 (PermissionDenied) for
    another one. Any other request, OPTIONS without Access-Control-Request-Method included, passes."""
    allowed = frozenset(origins)

    @web.middleware
    async def preflight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if origin not in allowed:
            raise errors.PermissionDenied(
                f"origin {origin[:200]!r} may not call this service from a browser: the operator lists the "
                "allowed origins in server.cors_origins (FLYWHEEL_SERVER_CORS_ORIGINS)"
            )
        headers = {
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE_S,
        }
        return web.Response(status=204, headers=headers)

    return preflight


def response_headers(origins: Iterable[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The on_response_prepare hook: nosniff always; the CORS headers for a listed Origin; Vary:
    Origin on every answer while any origin is listed (an answer's headers then depend on Origin,
    and a cache must not hand one origin's answer to another)."""
    allowed = frozenset(origins)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        if not allowed:
            return
        vary = [v.strip() for v in h.get("Vary", "").split(",") if v.strip()]
        if "origin" not in (v.lower() for v in vary):
            h["Vary"] = ", ".join([*vary, "Origin"])
        origin = request.headers.get("Origin")
        if origin is not None and origin in allowed:
            h["Access-Control-Allow-Origin"] = origin
            h["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    return add
