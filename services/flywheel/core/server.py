"""The gRPC + HTTP server every Flywheel service runs (docs/ARCHITECTURE.md, 'Services').

One `ServiceServer` owns, in one asyncio event loop:
  * a grpc.aio server with the service's servicers, grpc.health.v1 (NOT_SERVING until the
    service calls `set_serving(True)` and again during shutdown) and server reflection;
  * an interceptor that turns `errors.FlywheelError` into its status code with the message
    unchanged, any other exception into INTERNAL (logged, never a crash), and counts RPCs;
    an INTERNAL / DATA_LOSS answer carries a fixed text and a reference that the log line with
    the traceback also carries, never exception text or a path (`errors.public_message`);
  * an aiohttp app with `/metrics`, `/health` (TGI: 200 with an empty body when serving,
    503 otherwise), `/live`, and whatever routes the service adds before `start()`; with
    `metrics_port` set, `/metrics` moves to a port of its own (a NetworkPolicy can then let
    only the monitoring namespace scrape, while clients reach the API port);
  * TLS on both ports once the `tls` section has a certificate, mutual TLS with a client CA
    (core/tls.py: certificates re-read when their files change);
  * browser access by an allow-list of origins (`cors_origins`, core/cors.py) and
    `X-Content-Type-Options: nosniff` on every HTTP answer;
  * one OpenTelemetry SERVER span per RPC and per HTTP request (core/tracing.py; probes,
    reflection and /metrics excepted), a child of the caller's `traceparent`; an HTTP answer
    carries its span's `traceparent` header.

Overload: at most `max_concurrent_rpcs` RPCs (a stream counts until it ends) and
`max_concurrent_http` HTTP requests (a streamed answer counts until it ends) are handled at
once; one more is refused at once with RESOURCE_EXHAUSTED / 429, a message that names the limit
and a retry-after hint (trailing metadata `retry-after`, header `Retry-After`). Health checks,
reflection, `/health`, `/live` and `/metrics` are outside both limits, so a loaded service still
answers its probes (open health Watch streams have their own bound, `max_health_watches`).
gRPC itself refuses anything beyond twice the limit plus the Watch bound plus 64, which also
bounds requests that are still arriving, and an HTTP body is at most `max_http_body_mb`:
memory stays bounded by the configuration.

Blocking model work must never run on this loop: an engine runs it in its own thread or
process (vLLM's EngineClient idea) and hands results back with `loop.call_soon_threadsafe`
or futures; for one-off blocking calls (loading a checkpoint, hashing files) use
`await run_blocking(fn, *args)`, which uses a dedicated pool so that a long load can never
starve the loop's default executor (which asyncio also uses for DNS lookups).

Shutdown (SIGTERM/SIGINT or `stop()`): health NOT_SERVING everywhere -> optional drain pause
(so load balancers see it) -> gRPC stop with `grace_s` (in-flight RPCs finish, new ones are
refused) -> HTTP runner cleanup -> `wait()` returns. The same shutdown, with exit code 1, once
a part registered with `watch()` died, or the process named by FLYWHEEL_PARENT_PID (`flywheel
up`) is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import math
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from flywheel.core import cors, errors, metrics, tracing
from flywheel.core.config import DEFAULT_PORTS, require, setting
from flywheel.core.errors import (
    INTERNAL_CODES,
    FlywheelError,
    ResourceExhausted,
    internal_error_message,
    log_internal,
    retry_after_header,
)
from flywheel.core.health import HEALTH_SERVICE, HealthService
from flywheel.core.http import error_body, error_middleware
from flywheel.core.tls import ServerCertificates, TlsConfig, load_tls

log = logging.getLogger("flywheel.server")
T = TypeVar("T")
MAX_CONCURRENT = 100_000  # the largest max_concurrent_rpcs / max_concurrent_http accepted


@dataclasses.dataclass
class ServerConfig:
    """Where a service listens and how its gRPC server treats connections."""

    SECTION: ClassVar[str] = "server"

    host: str = setting("0.0.0.0", "Interface both servers bind to.", alias="FLYWHEEL_HOST")
    grpc_port: int = setting(50051, "gRPC port (0: pick a free one).", alias="FLYWHEEL_GRPC_PORT")
    http_port: int = setting(
        8080, "HTTP port for /metrics, /health and HTTP APIs (0: pick a free one).", alias="FLYWHEEL_HTTP_PORT"
    )
    metrics_port: int = setting(
        0,
        "Port that serves /metrics alone (TLS and mutual TLS as the other ports when the tls section is set); "
        "the HTTP port then has no /metrics, so a NetworkPolicy can open scraping to the monitoring namespace "
        "only. 0: /metrics on the HTTP port.",
    )
    max_message_mb: int = setting(
        16, "Largest gRPC message sent or received, in MiB.", alias="FLYWHEEL_GRPC_MAX_MESSAGE_MB"
    )
    keepalive_time_s: float = setting(
        30.0, "Server pings an idle connection this often to detect dead peers.", alias="FLYWHEEL_GRPC_KEEPALIVE_TIME_S"
    )
    keepalive_timeout_s: float = setting(
        10.0, "A ping unanswered this long closes the connection.", alias="FLYWHEEL_GRPC_KEEPALIVE_TIMEOUT_S"
    )
    grace_s: float = setting(
        10.0,
        "On shutdown, in-flight requests get this long to finish before they are cancelled.",
        alias="FLYWHEEL_GRACE_S",
    )
    drain_s: float = setting(
        0.0,
        "On shutdown, report NOT_SERVING this long before refusing new RPCs, so load balancers and readiness probes notice.",
        alias="FLYWHEEL_DRAIN_S",
    )
    max_concurrent_rpcs: int = setting(
        256,
        "Most RPCs handled at once (a stream counts until it ends; health checks and reflection are outside the "
        "limit); one more is refused at once with RESOURCE_EXHAUSTED and a retry-after hint. gRPC itself refuses "
        "RPCs beyond twice this plus max_health_watches plus 64, so requests in memory stay under about that many "
        "times max_message_mb.",
        alias="FLYWHEEL_MAX_CONCURRENT_RPCS",
    )
    max_concurrent_http: int = setting(
        256,
        "Most HTTP requests handled at once (a streamed answer counts until it ends; /health, /live and /metrics "
        "are outside the limit); one more is refused at once with 429 and Retry-After.",
    )
    overload_retry_after_s: float = setting(
        1.0,
        "The retry hint (gRPC trailing metadata retry-after, HTTP Retry-After; whole seconds, rounded up) sent "
        "with a refusal for being over max_concurrent_rpcs or max_concurrent_http.",
    )
    max_health_watches: int = setting(
        100,
        "Most grpc.health.v1 Watch streams open at once (health is outside max_concurrent_rpcs); one more is "
        "RESOURCE_EXHAUSTED. Check is never refused.",
    )
    max_http_body_mb: int = setting(
        4,
        "Largest HTTP request body, in MiB (aiohttp's client_max_size); a larger one is refused with 413.",
    )
    cors_origins: list[str] = setting(
        [],
        "Web origins whose pages may call this service's HTTP API from a browser (CORS), comma-separated, each "
        "exactly scheme://host[:port] as browsers send it, e.g. https://app.example.com; no '*', no path. "
        "Empty: no cross-origin access.",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(bool(self.host), n, "host", self.host, "use an interface address such as 0.0.0.0 or 127.0.0.1")
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            require(
                isinstance(port, int) and 0 <= port <= 65535,
                n,
                name,
                port,
                "use a port in 0..65535 (0: pick a free one)",
            )
        require(
            self.grpc_port == 0 or self.grpc_port != self.http_port,
            n,
            "http_port",
            self.http_port,
            f"gRPC already uses port {self.grpc_port}; give HTTP its own port",
        )
        require(
            self.metrics_port == 0 or self.metrics_port not in (self.grpc_port, self.http_port),
            n,
            "metrics_port",
            self.metrics_port,
            "gRPC or HTTP already uses this port; give /metrics its own port (0: /metrics on the HTTP port)",
        )
        require(1 <= self.max_message_mb <= 2047, n, "max_message_mb", self.max_message_mb, "use 1..2047 MiB")
        require(
            self.keepalive_time_s > 0, n, "keepalive_time_s", self.keepalive_time_s, "use a positive number of seconds"
        )
        require(
            self.keepalive_timeout_s > 0,
            n,
            "keepalive_timeout_s",
            self.keepalive_timeout_s,
            "use a positive number of seconds",
        )
        require(self.grace_s >= 0, n, "grace_s", self.grace_s, "use 0 or more seconds")
        require(self.drain_s >= 0, n, "drain_s", self.drain_s, "use 0 or more seconds")
        for name in ("max_concurrent_rpcs", "max_concurrent_http", "max_health_watches"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and 1 <= value <= MAX_CONCURRENT,
                n,
                name,
                value,
                f"use 1..{MAX_CONCURRENT} (every service has a bound: memory grows with it)",
            )
        require(
            math.isfinite(self.overload_retry_after_s) and 0 < self.overload_retry_after_s <= 3600,
            n,
            "overload_retry_after_s",
            self.overload_retry_after_s,
            "use a number of seconds in (0, 3600]",
        )
        require(1 <= self.max_http_body_mb <= 1024, n, "max_http_body_mb", self.max_http_body_mb, "use 1..1024 MiB")
        for origin in self.cors_origins:
            problem = cors.origin_problem(origin)
            require(problem is None, n, "cors_origins", self.cors_origins, str(problem))
        self.cors_origins = [o.strip() for o in self.cors_origins]

    @property
    def grpc_hard_limit(self) -> int:
        """grpc's own maximum_concurrent_rpcs, a backstop: room past our limit for refusals in
        progress, health Watch streams and probes."""
        return 2 * self.max_concurrent_rpcs + self.max_health_watches + 64

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel arguments for grpc.aio.server."""
        max_bytes = self.max_message_mb * 1024 * 1024
        return [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Let clients ping as often as we do without being told "too_many_pings".
            ("grpc.http2.min_ping_interval_without_data_ms", int(min(self.keepalive_time_s, 10.0) * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # Without this a second process can bind the same port on Linux and steal traffic.
            ("grpc.so_reuseport", 0),
        ]


def server_config(service: str, file_values: dict[str, Any] | None = None, **overrides: Any) -> ServerConfig:
    """`load(ServerConfig)` with `service`'s default ports (file, env and overrides still win)."""
    from flywheel.core.config import load

    grpc_port, http_port = DEFAULT_PORTS[service]
    values: dict[str, Any] = {"grpc_port": grpc_port, "http_port": http_port, **(file_values or {})}
    return load(ServerConfig, values, **overrides)


# ---------------------------------------------------------------- blocking work

_blocking_pool: concurrent.futures.ThreadPoolExecutor | None = None


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a dedicated thread pool and await its result."""
    global _blocking_pool
    if _blocking_pool is None:
        _blocking_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="flywheel-blocking")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_blocking_pool, functools.partial(fn, *args, **kwargs))


# ---------------------------------------------------------------- gRPC interceptor


def _status_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> tuple[grpc.StatusCode, str, tuple]:
    """The status code, details and trailing metadata an exception from a handler becomes."""
    if isinstance(exc, FlywheelError):
        trailing: tuple[tuple[str, str], ...] = ()
        if exc.retry_after_s is not None:
            trailing = (("retry-after", retry_after_header(exc.retry_after_s)),)
        if not exc.internal:
            log.debug("%s: %s %s", method, exc.code.name, exc.message)
        return exc.code, exc.public_message(method), trailing  # an internal one: logged with its reference
    code = _final_code(context)
    details = context.details()
    if code != grpc.StatusCode.OK and (details or code not in INTERNAL_CODES):
        # set_code() / set_details() then raise, as generated base servicers do: the handler's own words
        log.debug("%s: %s after set_code(%s)", method, type(exc).__name__, code.name)
        return code, details or code.name, ()
    return grpc.StatusCode.INTERNAL, internal_error_message(log_internal(exc, method)), ()


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions store the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK


class InFlightLimit:
    """A bound on work in flight, counted on the event loop: `enter()` or a refusal, then `leave()`.

    Refusals are immediate (no queue: a queue would hold memory and time for work the service
    cannot start), with a message that names the limit and its setting, and a retry hint.
    """

    def __init__(self, limit: int, service: str, what: str, setting_name: str, retry_after_s: float) -> None:
        self.limit, self.service, self.what, self.setting_name = limit, service, what, setting_name
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    def enter(self) -> None:
        """Count one more in flight, or raise ResourceExhausted when the limit is reached."""
        if self.full:
            raise self.refusal()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"the {self.service} service is handling its limit of {self.limit} {self.what} at once "
            f"(server.{self.setting_name}): retry in {retry_after_header(self.retry_after_s)} s, "
            "on another replica, or raise the limit",
            retry_after_s=self.retry_after_s,
            reason="overloaded",
        )


# RPCs outside the limit: a loaded service must still answer its probes and describe itself.
UNLIMITED_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _refuse_behavior(error: FlywheelError) -> Callable[..., Any]:
    def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error

    return refuse


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8 in a string
    field), so the handler's wrapper answers INVALID_ARGUMENT instead of grpc's UNKNOWN with the
    parser's text."""

    type_name: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's bytes, answered precisely
            return Undecodable(name)

    return parse


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(
            f"the request is not a valid {request.type_name} message (malformed protobuf, or a string "
            "field that is not UTF-8): send a message encoded by a protobuf library from the published protos"
        )


def _end_rpc_span(span: Any, code: grpc.StatusCode) -> None:
    """Record an RPC's status code on its span; any code but OK marks the span as an error."""
    if span is None or not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes, records request metrics and, with a `limit`, bounds the
    RPCs in flight (health and reflection excepted), for every RPC kind."""

    def __init__(self, limit: InFlightLimit | None = None, service: str = "flywheel") -> None:
        self.limit, self.service = limit, service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        service, name = metrics.split_method(method)
        limit = None if method.startswith(UNLIMITED_GRPC_PREFIXES) else self.limit
        traced = not method.startswith(UNLIMITED_GRPC_PREFIXES)  # probes and reflection: no spans
        tracer_of = self.service

        def rpc_span(context: grpc.aio.ServicerContext) -> Any:
            if not traced:
                return contextlib.nullcontext(None)
            return tracing.span(
                tracer_of,
                method.lstrip("/"),
                context=tracing.context_of(context.invocation_metadata()),
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
                record_errors=False,
            )

        def observe(code: grpc.StatusCode, started: float) -> None:
            metrics.GRPC_IN_FLIGHT.labels(service, name).dec()
            metrics.GRPC_REQUESTS.labels(service, name, code.name).inc()
            metrics.GRPC_LATENCY.labels(service, name).observe(time.perf_counter() - started)

        def unary_response(behavior: Callable[..., Any], limit: InFlightLimit | None) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with rpc_span(context) as span:
                    return await traced_unary(request, context, span)

            async def traced_unary(request: Any, context: grpc.aio.ServicerContext, span: Any) -> Any:
                started, code, entered = time.perf_counter(), grpc.StatusCode.OK, None
                metrics.GRPC_IN_FLIGHT.labels(service, name).inc()
                try:
                    if limit is not None:
                        limit.enter()
                        entered = limit
                    _refuse_undecodable(request)
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    code = _final_code(context)
                    return result
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:  # the handler called context.abort itself
                    code = _final_code(context)
                    raise
                except Exception as exc:
                    code, details, trailing = _status_for(exc, context, method)
                    await context.abort(code, details, trailing_metadata=trailing)
                finally:
                    if entered is not None:
                        entered.leave()
                    observe(code, started)
                    _end_rpc_span(span, code)

            return wrapper

        def stream_response(
            behavior: Callable[..., Any], limit: InFlightLimit | None
        ) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with rpc_span(context) as span:
                    # aclosing: a cancelled stream closes the inner one now, so its finally
                    # (the in-flight count, metrics, the span's code) runs before the span ends
                    async with contextlib.aclosing(traced_stream(request, context, span)) as items:
                        async for item in items:
                            yield item

            async def traced_stream(
                request: Any, context: grpc.aio.ServicerContext, span: Any
            ) -> AsyncGenerator[Any, None]:
                started, code, entered = time.perf_counter(), grpc.StatusCode.OK, None
                metrics.GRPC_IN_FLIGHT.labels(service, name).inc()
                try:
                    if limit is not None:
                        limit.enter()
                        entered = limit
                    _refuse_undecodable(request)
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):  # handler writes with context.write()
                        await result
                    else:  # a plain iterator
                        for item in result or ():
                            yield item
                    code = _final_code(context)
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    code = _final_code(context)
                    raise
                except Exception as exc:
                    code, details, trailing = _status_for(exc, context, method)
                    await context.abort(code, details, trailing_metadata=trailing)
                finally:
                    if entered is not None:
                        entered.leave()
                    observe(code, started)
                    _end_rpc_span(span, code)

            return wrapper

        unary_request = bool(handler.unary_unary or handler.unary_stream)
        kw: dict[str, Any] = {
            "request_deserializer": _lenient(handler.request_deserializer)
            if unary_request
            else handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if limit is not None and limit.full:
            # Refused before the request is parsed: its bytes are not turned into a message.
            refuse = _refuse_behavior(limit.refusal())
            kw["request_deserializer"] = None
            limit = None
            behaviors = dict.fromkeys(("unary_unary", "unary_stream", "stream_unary", "stream_stream"), refuse)
        else:
            behaviors = {
                "unary_unary": handler.unary_unary,
                "unary_stream": handler.unary_stream,
                "stream_unary": handler.stream_unary,
                "stream_stream": handler.stream_stream,
            }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(behaviors["unary_unary"], limit), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response(behaviors["unary_stream"], limit), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(behaviors["stream_unary"], limit), **kw)
        return grpc.stream_stream_rpc_method_handler(stream_response(behaviors["stream_stream"], limit), **kw)


SERVER_KEY: web.AppKey[ServiceServer] = web.AppKey("flywheel.server")


async def _health_route(request: web.Request) -> web.Response:
    server: ServiceServer = request.app[SERVER_KEY]
    if server.serving:
        return web.Response(status=200)  # TGI: 200 with an empty body
    return web.json_response({"error": "not serving", "error_type": "unavailable"}, status=503)


async def _live_route(request: web.Request) -> web.Response:
    return web.Response(status=200)  # liveness: the loop answers, even while the model loads


async def _metrics_route(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


# HTTP routes outside the limit: probes and scrapes must get through a loaded service.
UNLIMITED_HTTP_PATHS = frozenset({"/health", "/live", "/metrics"})
# Under mutual TLS, the routes answered without a client certificate: the kubelet's probes
# cannot present one (Prometheus can: /metrics needs a certificate).
MTLS_EXEMPT_HTTP_PATHS = frozenset({"/health", "/live"})


def _limit_middleware(limit: InFlightLimit) -> Any:
    """Refuse a request past `limit` with ResourceExhausted (error_middleware, outside it, makes it
    a 429 with Retry-After and TGI's body) before its body is read."""

    @web.middleware
    async def limit_in_flight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in UNLIMITED_HTTP_PATHS:
            return await handler(request)
        limit.enter()
        try:
            return await handler(request)  # a streamed answer is written before the handler returns
        finally:
            limit.leave()

    return limit_in_flight


TRACEPARENT_KEY: web.RequestKey[str] = web.RequestKey("flywheel.traceparent", str)


def _trace_middleware(service: str) -> Any:
    """One SERVER span per HTTP request (probes and scrapes excepted), child of the request's
    `traceparent`; a 5xx marks it as an error. Its traceparent goes back on the answer's headers
    (`_traceparent_header`), so a client can send it with the feedback on that answer."""

    @web.middleware
    async def trace_request(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in UNLIMITED_HTTP_PATHS or request.method == "OPTIONS":
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path  # /models/{model}, not each name
        with tracing.span(
            service,
            f"{request.method} {route}",
            context=tracing.context_of(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        ) as span:
            value = tracing.traceparent_of(span)
            if value is not None:
                request[TRACEPARENT_KEY] = value
            response = await handler(request)
            if span.is_recording():
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(response.status)))
            return response

    return trace_request


async def _traceparent_header(request: web.Request, response: web.StreamResponse) -> None:
    value = request.get(TRACEPARENT_KEY)
    if value is not None and tracing.TRACEPARENT not in response.headers:
        response.headers[tracing.TRACEPARENT] = value


# ---------------------------------------------------------------- the server


def _service_name_of(add_fn: Callable[..., Any]) -> str:
    """'add_RewardServicer_to_server' from flywheel.v1.reward_pb2_grpc -> 'flywheel.v1.Reward'."""
    short = add_fn.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
    module = importlib.import_module(add_fn.__module__.removesuffix("_grpc"))
    return module.DESCRIPTOR.services_by_name[short].full_name


class ServiceServer:
    """gRPC + HTTP for one service, with health, reflection, metrics and graceful shutdown.

    Usage::

        server = ServiceServer(cfg, name="reward")
        server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, RewardServicer(engine))
        server.http_app.router.add_post("/score", handler)      # optional, before start()
        await server.start()
        await engine.load(); await server.set_serving(True)
        await server.wait()                                     # until SIGTERM or stop()
    """

    def __init__(
        self,
        config: ServerConfig,
        name: str = "flywheel",
        tls: TlsConfig | None = None,
        tracing_config: tracing.TracingConfig | None = None,
    ) -> None:
        """`tls`: TLS of both ports; None reads the `tls` config section (FLYWHEEL_TLS_* variables),
        so every service serves TLS once it is configured; `TlsConfig()` is plaintext.
        `tracing_config`: None reads the `tracing` section; the service's spans are named `name`
        (`tracing.ensure`: a process that set up `name`'s tracing before keeps that)."""
        self.config = config
        self.name = name
        self.tls = load_tls() if tls is None else tls
        self.certificates = ServerCertificates(self.tls) if self.tls.server_enabled else None
        self.health = HealthService(config.max_health_watches)
        retry_after = config.overload_retry_after_s
        self.rpc_limit = InFlightLimit(config.max_concurrent_rpcs, name, "RPCs", "max_concurrent_rpcs", retry_after)
        self.http_limit = InFlightLimit(
            config.max_concurrent_http, name, "HTTP requests", "max_concurrent_http", retry_after
        )
        tracing.ensure(name, tracing_config)
        middlewares = [_trace_middleware(name), error_middleware, cors.preflight_middleware(config.cors_origins)]
        middlewares.append(_limit_middleware(self.http_limit))
        if self.certificates is not None and self.certificates.mutual:
            middlewares.insert(2, self.certificates.http_middleware(MTLS_EXEMPT_HTTP_PATHS))
        self.http_app = web.Application(
            middlewares=middlewares,
            client_max_size=config.max_http_body_mb * 1024**2,
        )
        self.http_app.on_response_prepare.append(cors.response_headers(config.cors_origins))
        self.http_app.on_response_prepare.append(_traceparent_header)
        self.http_app[SERVER_KEY] = self
        self.http_app.router.add_get("/health", _health_route)
        self.http_app.router.add_get("/live", _live_route)
        self.metrics_app: web.Application | None = None
        if config.metrics_port:
            self.metrics_app = self._metrics_only_app()
        else:
            self.http_app.router.add_get("/metrics", _metrics_route)
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None  # bound; equals http_port when /metrics is served there
        self._servicers: list[tuple[Callable[[Any, Any], None], Any, str]] = []
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._serving = False
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._signals: list[signal.Signals] = []
        self._watched: list[tuple[str, Callable[[], BaseException | None]]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self.exit_code = 0  # 1 once a watched part died (serve() returns it)

    def _metrics_only_app(self) -> web.Application:
        """The app of `metrics_port`: /metrics alone; under mutual TLS it needs a client certificate."""
        middlewares = [error_middleware]
        if self.certificates is not None and self.certificates.mutual:
            middlewares.append(self.certificates.http_middleware(frozenset()))
        app = web.Application(middlewares=middlewares)
        app.on_response_prepare.append(cors.response_headers(()))  # nosniff; no browser access to /metrics
        app.router.add_get("/metrics", _metrics_route)
        return app

    @property
    def service_names(self) -> list[str]:
        return [full_name for _, _, full_name in self._servicers]

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def stopping(self) -> bool:
        return self._stopping

    def add_servicer(
        self, add_fn: Callable[[Any, Any], None], servicer: Any, service_full_name: str | None = None
    ) -> None:
        """Register a servicer with its generated `add_XServicer_to_server` (before start()).

        The full service name (for health and reflection) is derived from the generated
        module when not given, e.g. 'flywheel.v1.Reward'.
        """
        if self._grpc is not None:
            raise RuntimeError("add_servicer() must be called before start()")
        self._servicers.append((add_fn, servicer, service_full_name or _service_name_of(add_fn)))

    async def start(self, *, handle_signals: bool = True) -> None:
        """Bind gRPC and HTTP; afterwards `grpc_port`/`http_port` hold the bound ports.

        Health is NOT_SERVING until `set_serving(True)`. With `handle_signals`, SIGTERM and
        SIGINT start a graceful stop (tests pass False to leave the runner's handlers alone).
        """
        if self._grpc is not None:
            raise RuntimeError("start() called twice")
        cfg = self.config
        self._grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.rpc_limit, self.name)],
            options=cfg.grpc_options(),
            maximum_concurrent_rpcs=cfg.grpc_hard_limit,  # a backstop; the interceptor's limit answers first
        )
        for add_fn, servicer, _ in self._servicers:
            add_fn(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection([*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], self._grpc)
        for service in ["", *self.service_names]:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.SERVING.set(0)

        address = f"[{cfg.host}]:{cfg.grpc_port}" if ":" in cfg.host else f"{cfg.host}:{cfg.grpc_port}"
        try:
            if self.certificates is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, self.certificates.grpc_credentials())
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC to {address} ({e}): is the port in use? set --grpc-port") from None
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {address}: is the port in use? set --grpc-port")
        await self._grpc.start()

        self._runner = web.AppRunner(self.http_app, access_log=None, shutdown_timeout=cfg.grace_s)
        await self._runner.setup()
        ssl_context = self.certificates.ssl_context() if self.certificates is not None else None
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            await self._grpc.stop(0)
            await self._runner.cleanup()
            raise OSError(f"cannot bind HTTP to {cfg.host}:{cfg.http_port} ({e}): set --http-port") from None
        self.http_port = self._runner.addresses[0][1]
        self.metrics_port = self.http_port
        if self.metrics_app is not None:
            self.metrics_port = await self._start_metrics(ssl_context)
        if handle_signals:
            self._install_signal_handlers()
        security = "plaintext" if self.certificates is None else "mutual TLS" if self.tls.mutual else "TLS"
        log.info(
            "%s listening (%s): gRPC %s:%d, HTTP %s:%d, /metrics on port %d",
            self.name,
            security,
            cfg.host,
            self.grpc_port,
            cfg.host,
            self.http_port,
            self.metrics_port,
        )

    async def _start_metrics(self, ssl_context: Any) -> int:
        """Bind `metrics_port` with the HTTP port's TLS; on failure undo what start() bound."""
        assert self.metrics_app is not None and self._grpc is not None and self._runner is not None
        cfg = self.config
        self._metrics_runner = web.AppRunner(self.metrics_app, access_log=None, shutdown_timeout=cfg.grace_s)
        await self._metrics_runner.setup()
        try:
            await web.TCPSite(self._metrics_runner, cfg.host, cfg.metrics_port, ssl_context=ssl_context).start()
        except OSError as e:
            await self._grpc.stop(0)
            await self._runner.cleanup()
            await self._metrics_runner.cleanup()
            raise OSError(
                f"cannot bind /metrics to {cfg.host}:{cfg.metrics_port} ({e}): set FLYWHEEL_SERVER_METRICS_PORT"
            ) from None
        return int(self._metrics_runner.addresses[0][1])

    def watch(self, name: str, error: Callable[[], BaseException | None]) -> None:
        """Stop the service with exit code 1 once `error()` returns an exception (checked every 0.5 s).

        For background loops the service cannot do without (a Kafka consumer, a training
        thread): one that died unseen would leave a process that answers health checks and
        does nothing. Crash-only, like Kafka Streams' SHUTDOWN_CLIENT: the orchestrator
        (Kubernetes, `flywheel up`) sees the exit and restarts it, and it resumes from what it
        committed. Call from the event loop's thread, e.g. in run_forever's setup.
        """
        self._watched.append((name, error))
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch_loop())

    async def _watch_loop(self) -> None:
        while not self._stopping:
            for name, error in self._watched:
                e = error()
                if e is not None and not self._stopping:
                    log.critical(
                        "%s: %s died (%r); stopping with exit code 1 so that it is restarted", self.name, name, e
                    )
                    self.exit_code = 1
                    await self.stop()
                    return
            await asyncio.sleep(0.5)

    async def set_serving(self, serving: bool = True, service: str | None = None) -> None:
        """Report SERVING (model loaded) or NOT_SERVING on gRPC health and /health.

        `service=None` sets the overall status and every registered service. Ignored once
        shutdown has begun: a stopping server stays NOT_SERVING.
        """
        if self._stopping:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        targets = ["", *self.service_names] if service is None else [service]
        for name in targets:
            await self.health.set(name, status)
        if service is None or service == "":
            self._serving = serving
            metrics.SERVING.set(1 if serving else 0)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (idempotent; concurrent callers all wait for the same shutdown)."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._shutdown(self.config.grace_s if grace is None else grace))
        await asyncio.shield(self._stop_task)

    async def wait(self) -> None:
        """Return once the server has stopped (after a signal or `stop()`)."""
        await self._stopped.wait()

    async def run_forever(self, setup: Callable[[ServiceServer], Awaitable[None]] | None = None) -> None:
        """start(), then `setup(self)` (e.g. load the model, then set_serving), then wait for a signal.

        A signal during setup cancels it; a setup failure stops the server and re-raises.
        """
        await self.start(handle_signals=True)
        parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
        if parent:  # started by `flywheel up`: never outlive it (a SIGKILLed supervisor cannot stop us)
            self.watch(f"the process that started it (pid {parent})", lambda: _gone(parent))
        if setup is None:
            await self.wait()
            return
        setup_task = asyncio.ensure_future(setup(self))
        waiter = asyncio.ensure_future(self.wait())
        await asyncio.wait({setup_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        failure = setup_task.exception() if setup_task.done() and not setup_task.cancelled() else None
        if failure is not None:
            waiter.cancel()
            await self.stop(grace=0)
            raise failure
        if not setup_task.done():
            setup_task.cancel()
            await asyncio.gather(setup_task, return_exceptions=True)
        await waiter

    async def _shutdown(self, grace: float) -> None:
        self._stopping, self._serving = True, False
        metrics.SERVING.set(0)
        try:
            await self.health.enter_graceful_shutdown()
            if self._grpc is not None and self.config.drain_s > 0:
                log.info("%s: NOT_SERVING, draining for %.1fs", self.name, self.config.drain_s)
                await asyncio.sleep(self.config.drain_s)
            await self.health.close()
            if self._grpc is not None:
                log.info("%s: stopping gRPC (grace %.1fs)", self.name, grace)
                await self._grpc.stop(grace)
            if self._runner is not None:
                await self._runner.cleanup()
            if self._metrics_runner is not None:
                await self._metrics_runner.cleanup()
        finally:
            self._remove_signal_handlers()
            self._stopped.set()
            log.info("%s stopped", self.name)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                log.warning("cannot install a %s handler; stop the server with stop()", sig.name)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_task is not None:
            log.warning("%s: %s during shutdown; still waiting for in-flight requests", self.name, sig.name)
            return
        log.info("%s: %s received, shutting down", self.name, sig.name)
        self._stop_task = asyncio.ensure_future(self._shutdown(self.config.grace_s))


PARENT_PID_ENV = "FLYWHEEL_PARENT_PID"


def _gone(parent: int) -> BaseException | None:
    return None if os.getppid() == parent else ProcessLookupError(f"pid {parent} is no longer this process's parent")


def serve(
    server: ServiceServer,
    setup: Callable[[ServiceServer], Awaitable[None]] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> int:
    """Blocking entry point for `__main__`: run the server until SIGTERM/SIGINT (or a watched part
    died), then `cleanup()`; return the exit code (see end_process)."""
    try:
        asyncio.run(server.run_forever(setup))
    finally:
        if cleanup is not None:
            cleanup()
    return end_process(server.exit_code)


def end_process(code: int) -> int:
    """Return 0; any other code ends the process at once (a crash-only stop: a watched part died).

    The interpreter would first join every thread of run_blocking's pool, and one may be stuck
    for minutes (connecting to a Kafka that is gone): a stopped service must not linger. What
    must survive is durable by then (spools, the join's store, committed offsets)."""
    if code:
        logging.shutdown()
        os._exit(code)
    return code


__all__ = [
    "DEFAULT_PORTS",
    "ErrorInterceptor",
    "InFlightLimit",
    "ServerConfig",
    "ServiceServer",
    "error_body",
    "error_middleware",
    "retry_after_header",
    "run_blocking",
    "serve",
    "server_config",
]
