"""HTTP plumbing shared by every service's aiohttp app: TGI-shaped error bodies and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from flywheel.core import metrics
from flywheel.core.errors import FlywheelError, retry_after_header

log = logging.getLogger("flywheel.http")


def error_body(exc: BaseException) -> tuple[dict[str, str], int, dict[str, str]]:
    """TGI's error body, HTTP status and headers for an exception."""
    if isinstance(exc, FlywheelError):
        headers = {} if exc.retry_after_s is None else {"Retry-After": retry_after_header(exc.retry_after_s)}
        return exc.http_body(), exc.http_status, headers
    body = {"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}", "error_type": "internal"}
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
        body, status, headers = error_body(exc)
        if status >= 500:
            log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return web.json_response(body, status=status, headers=headers)
    finally:
        metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        metrics.HTTP_LATENCY.labels(route, request.method).observe(time.perf_counter() - started)
