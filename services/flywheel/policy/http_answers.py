"""What the TGI routes (http.py) and the OpenAI routes (openai_routes.py) both answer with: the
end user of a request, the `x-flywheel-*` headers and fields that identify a served answer, and
server-sent events.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web

from flywheel.core.auth import Caller
from flywheel.core.http import error_body
from flywheel.policy.requests import TokenEvent
from flywheel.policy.service import PolicyService, Served

H_ID, H_VERSION, H_TOKEN, H_USER = (
    "x-flywheel-interaction-id",
    "x-flywheel-policy-version",
    "x-flywheel-feedback-token",
    "x-flywheel-user-id",
)


def user_of(service: PolicyService, request: web.Request, fallback: str | None = None) -> tuple[str, Caller]:
    """The end user (the x-flywheel-user-id header, else `fallback` (OpenAI's `user`), else a session's
    user or the authenticated caller's name) and the caller, in whose namespace the service binds the
    user (Caller.scoped_user_id). A session refuses here, before any work, a request that names
    another user in either place (PermissionDenied)."""
    caller = service.auth.caller(request.headers)
    named = [u for u in (request.headers.get(H_USER), fallback) if u]
    for u in named:
        caller.end_user(u)
    return (named[0] if named else caller.default_user()), caller


def id_headers(s: Served) -> dict[str, str]:
    return {H_ID: s.interaction_id, H_VERSION: str(s.result.version), H_TOKEN: s.feedback_token}


def extras(s: Served) -> dict[str, Any]:
    """The fields that let a client give feedback on the answer."""
    return {"interaction_id": s.interaction_id, "policy_version": s.result.version, "feedback_token": s.feedback_token}


def sse(obj: Any) -> bytes:
    return b"data:" + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def stream_sse(
    request: web.Request,
    events: AsyncGenerator[tuple[TokenEvent, Served | None], None],
    iid: str,
    render: Callable[[int, TokenEvent, Served | None], list[Any]],
    done: bytes | None = None,
) -> web.StreamResponse:
    """Send `events` as SSE. The first event is awaited before the headers, so a refused request
    still gets its 422/429/503; later errors become a TGI error event (a 500's without its text, see core.http.error_body). A client that goes away
    closes the engine stream, which frees the slot."""
    async with contextlib.aclosing(events):
        first = await anext(events)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", H_ID: iid})
        await resp.prepare(request)
        i = 0
        try:
            item: tuple[TokenEvent, Served | None] | None = first
            while item is not None:
                for obj in render(i, *item):
                    await resp.write(sse(obj))
                i += 1
                item = await anext(events, None)
            if done is not None:
                await resp.write(done)
        except (ConnectionResetError, ConnectionError):
            return resp  # the client went away; aclosing frees the slot
        except Exception as e:  # noqa: BLE001 - the headers are gone: the error becomes the last event
            with contextlib.suppress(ConnectionError):
                await resp.write(sse(error_body(e, f"the stream of {iid}")[0]))
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
