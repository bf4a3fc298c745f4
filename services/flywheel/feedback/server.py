"""Front ends of the feedback service: a thin gRPC `Feedback` servicer and HTTP `POST /feedback`,
plus session minting (gRPC CreateSession, HTTP `POST /sessions`: core/sessions.py).

Both only convert between the wire and `FeedbackRequest`, identify the caller, and call the
FeedbackIntake engine; every rule lives in intake.py and the modules it uses (validation.py,
ratelimit.py, dedup.py), so both front ends answer alike.
Errors travel as FlywheelError: the server's interceptor and error middleware turn them into
gRPC codes and TGI-shaped HTTP bodies (403 / 409 / 422 / 429 / 503, Retry-After when known;
a body that is not UTF-8 JSON is 400 / 413 / 415, see core.http.read_json_object).

Health: SERVING as soon as the spool and the claims store (dedup.py) are open, even when Kafka is down.
That is the point of the spool: feedback is accepted (SUBMIT_STATUS_SPOOLED) and drains when
Kafka returns; flywheel_spool_depth tells operators that Kafka is away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from aiohttp import web

from flywheel.core import errors
from flywheel.core.auth import AuthConfig, Authenticator, Caller
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.http import read_json_object, shown
from flywheel.core.limits import LimitsConfig, check_user_id
from flywheel.core.server import ServerConfig, ServiceServer, run_blocking
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.intake import REJECTED, FeedbackIntake
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

STRING_FIELDS = ("feedback_id", "interaction_id", "pair_id", "feedback_token", "user_id", "demonstration", "comment")
VALUE_FIELDS = ("thumbs", "rating", "preference", "demonstration")
JSON_FIELDS = (*STRING_FIELDS[:5], "thumbs", "rating", "preference", "demonstration", "comment")
PREFERENCES = {"A": events_pb2.PREFERENCE_A, "B": events_pb2.PREFERENCE_B, "TIE": events_pb2.PREFERENCE_TIE}
STATUS_NAMES = {
    feedback_pb2.SUBMIT_STATUS_ACCEPTED: "accepted",
    feedback_pb2.SUBMIT_STATUS_SPOOLED: "spooled",
    feedback_pb2.SUBMIT_STATUS_DUPLICATE: "duplicate",
    feedback_pb2.SUBMIT_STATUS_ALREADY_VOTED: "already_voted",
}


SESSION_FIELDS = ("user_id", "ttl_s")


def _caller(auth: Authenticator, metadata: Any) -> Any:
    try:
        return auth.caller(metadata)
    except errors.FlywheelError:
        REJECTED.labels("unauthenticated").inc()
        raise


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    """gRPC flywheel.v1.Feedback over a FeedbackIntake."""

    def __init__(self, intake: FeedbackIntake, auth: Authenticator) -> None:
        self.intake, self.auth = intake, auth

    async def Submit(
        self, request: feedback_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.FeedbackResponse:
        caller = _caller(self.auth, context.invocation_metadata())
        return await self.intake.submit(request, caller)

    async def SubmitBatch(
        self, request: feedback_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitBatchResponse:
        caller = _caller(self.auth, context.invocation_metadata())
        results = await self.intake.submit_batch(list(request.items), caller)
        out = feedback_pb2.SubmitBatchResponse()
        for item, r in zip(request.items, results, strict=True):
            if isinstance(r, errors.FlywheelError):
                out.results.add(
                    response=feedback_pb2.FeedbackResponse(feedback_id=item.feedback_id),
                    error_code=r.code.name,
                    error=r.public_message("a SubmitBatch item"),
                )
            else:
                out.results.add(response=r)
        return out

    async def CreateSession(
        self, request: feedback_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.Session:
        caller = _caller(self.auth, context.invocation_metadata())
        return mint_session(self.intake, self.auth, caller, request.user_id, request.ttl_s)


def mint_session(
    intake: FeedbackIntake, auth: Authenticator, caller: Caller, user_id: str, ttl_s: int
) -> feedback_pb2.Session:
    """A session for `user_id` (Authenticator.mint_session's rules), after the user id's limits and
    the caller's rate limit (per_key_rate, shared with its feedback: minting is not free)."""
    check_user_id(user_id, intake.limits)
    intake.key_limits.take(caller.who, 1)
    text, expires = auth.mint_session(caller, user_id, ttl_s)
    return feedback_pb2.Session(session=text, user_id=user_id, expires_at=expires)


def session_route(intake: FeedbackIntake, auth: Authenticator) -> Any:
    """The aiohttp handler of POST /sessions: {"user_id", "ttl_s"?} -> {"session", "user_id", "expires_at"}."""

    async def handle(request: web.Request) -> web.Response:
        caller = _caller(auth, request.headers)
        body = await read_json_object(request)
        unknown = sorted(set(body) - set(SESSION_FIELDS))
        if unknown:
            names = ", ".join(repr(u[:40]) for u in unknown[:5])
            raise errors.InvalidArgument(f"unknown field(s) {names}: the fields are {', '.join(SESSION_FIELDS)}")
        user_id, ttl_s = body.get("user_id"), body.get("ttl_s")
        if not isinstance(user_id, str) or not user_id:
            raise errors.InvalidArgument(f"user_id must be a non-empty string (the end user), got {shown(user_id)}")
        if ttl_s is None:
            ttl_s = 0
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int):
            raise errors.InvalidArgument(f"ttl_s must be an integer number of seconds, got {shown(ttl_s)}")
        s = mint_session(intake, auth, caller, user_id, ttl_s)
        return web.json_response({"session": s.session, "user_id": s.user_id, "expires_at": s.expires_at})

    return handle


def request_from_json(body: Any, rating_scale: int = 3) -> feedback_pb2.FeedbackRequest:
    """A FeedbackRequest from the JSON body of POST /feedback (as core.http.read_json_object parsed it);
    errors.InvalidArgument (422) otherwise. Never raises anything else, whatever `body` holds."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument(f"the body must be a JSON object with the fields {', '.join(JSON_FIELDS)}")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        names = ", ".join(repr(u[:40]) for u in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise errors.InvalidArgument(f"unknown field(s) {names}: the fields are {', '.join(JSON_FIELDS)}")
    given = [k for k in VALUE_FIELDS if body.get(k) is not None]
    if len(given) > 1:
        raise errors.InvalidArgument(
            f"send exactly one of thumbs, rating, preference or demonstration, got {' and '.join(given)}"
        )
    req = feedback_pb2.FeedbackRequest()
    for name in STRING_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise errors.InvalidArgument(f"{name} must be a string, got {shown(value)}")
        setattr(req, name, value)
    expected = {"thumbs": "+1 (up) or -1 (down)", "rating": f"an integer in 1..{rating_scale}"}
    for name, what in expected.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
            raise errors.InvalidArgument(f"{name} must be {what}, got {shown(value)}")
        setattr(req, name, value)
    pref = body.get("preference")
    if pref is not None:
        if not isinstance(pref, str) or pref.upper() not in PREFERENCES:
            raise errors.InvalidArgument(f'preference must be "A", "B" or "TIE", got {shown(pref)}')
        req.preference = PREFERENCES[pref.upper()]
    return req


def feedback_route(intake: FeedbackIntake, auth: Authenticator) -> Any:
    """The aiohttp handler of POST /feedback."""

    async def handle(request: web.Request) -> web.Response:
        caller = _caller(auth, request.headers)
        try:
            req = request_from_json(await read_json_object(request), intake.config.rating_scale)
        except errors.FlywheelError:
            REJECTED.labels("invalid_argument").inc()
            raise
        resp = await intake.submit(req, caller)
        return web.json_response({"feedback_id": resp.feedback_id, "status": STATUS_NAMES[resp.status]})

    return handle


def build_server(
    server_cfg: ServerConfig,
    config: FeedbackConfig,
    kafka: KafkaConfig,
    topics: TopicsConfig,
    auth: AuthConfig,
    limits: LimitsConfig | None = None,
) -> tuple[ServiceServer, FeedbackIntake]:
    """The feedback ServiceServer (gRPC + HTTP routes registered) and its engine, not started yet."""
    intake = FeedbackIntake(config, kafka, topics, auth, limits=limits)
    authenticator = Authenticator(auth)
    server = ServiceServer(server_cfg, name="feedback")
    server.add_servicer(feedback_pb2_grpc.add_FeedbackServicer_to_server, FeedbackServicer(intake, authenticator))
    server.http_app.router.add_post("/feedback", feedback_route(intake, authenticator))
    from flywheel.feedback.page import add_page_routes  # the web page and widget (docs/PAGE.md)

    add_page_routes(server.http_app, config, auth)
    server.http_app.router.add_post("/sessions", session_route(intake, authenticator))
    return server, intake


async def open_and_serve(server: ServiceServer, intake: FeedbackIntake) -> None:
    """Open the stores, report SERVING, and create the topic in the background (Kafka may be down)."""
    await run_blocking(intake.open)
    await server.set_serving(True)
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, intake.ensure_topics)  # its own thread: it can wait for a dead broker
