"""One trace per answer: OpenTelemetry spans and the W3C trace context between services
(docs/ARCHITECTURE.md, 'Tracing').

Every `ServiceServer` calls `setup(name)` once: it reads the `tracing` section and, unless the
exporter is "none" (the default), builds a TracerProvider whose resource names the service, with
ParentBased(TraceIdRatioBased(sample_ratio)) sampling and an OTLP/HTTP exporter. With "none" no
provider exists: `tracer()` is OpenTelemetry's no-op tracer, so a span costs a function call and
nothing is recorded or exported.

The context travels as a `traceparent` (and `tracestate`) entry: in gRPC metadata, HTTP headers
and Kafka record headers. `record_headers()` is what a producer adds to a record (bus.Producer
adds it to every record that has none, so a record re-sent later, by a spool's drain thread,
keeps the context of the request that made it); `context_of(headers)` is what a consumer starts
its span from.

Providers are kept per service name rather than installed globally, so the services of one test
process (policy, feedback, reward) each report under their own name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flywheel.core.config import load_section, require, setting

log = logging.getLogger(__name__)

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
EXPORTERS = ("none", "otlp")
_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP = trace.NoOpTracer()


@dataclasses.dataclass
class TracingConfig:
    """Spans of every service and where they go."""

    SECTION: ClassVar[str] = "tracing"

    exporter: str = setting(
        "none",
        "Where spans go: none (no spans are recorded; the trace context of callers still passes through) "
        "or otlp (OTLP over HTTP to otlp_endpoint).",
    )
    otlp_endpoint: str = setting(
        "http://localhost:4318/v1/traces",
        "The OTLP/HTTP traces endpoint of a collector (exporter otlp), e.g. http://otel-collector:4318/v1/traces.",
    )
    sample_ratio: float = setting(
        1.0,
        "Share of new traces recorded, 0..1. A request that arrives with a trace context follows its "
        "caller's decision (ParentBased sampling), so one answer's trace is whole or absent.",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        self.exporter = str(self.exporter).strip().lower()
        require(self.exporter in EXPORTERS, n, "exporter", self.exporter, f"use one of {', '.join(EXPORTERS)}")
        require(
            isinstance(self.sample_ratio, int | float)
            and math.isfinite(self.sample_ratio)
            and 0.0 <= self.sample_ratio <= 1.0,
            n,
            "sample_ratio",
            self.sample_ratio,
            "use a number from 0 (record no new trace) to 1 (record every trace)",
        )
        if self.exporter == "otlp":
            require(
                self.otlp_endpoint.startswith(("http://", "https://")),
                n,
                "otlp_endpoint",
                self.otlp_endpoint,
                "use the collector's http(s)://host:port/v1/traces URL",
            )


_providers: dict[str, TracerProvider] = {}
_configured: set[str] = set()  # services set up in this process, exporter none included


def setup(service: str, config: TracingConfig | None = None, *, exporter: SpanExporter | None = None) -> trace.Tracer:
    """Configure `service`'s tracer once per process (a second call replaces the first) and return it.

    `config` None reads the `tracing` section (YAML, FLYWHEEL_TRACING_* variables). `exporter`
    replaces the OTLP exporter (tests pass the SDK's InMemorySpanExporter); with exporter "none"
    it is ignored: nothing is recorded.
    """
    config = config if config is not None else load_section(TracingConfig)
    old = _providers.pop(service, None)
    if old is not None:
        old.shutdown()
    _configured.add(service)
    if config.exporter == "none":
        return _NOOP
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    _providers[service] = provider
    log.info("tracing: %s exports spans (%s, sample ratio %g)", service, config.exporter, config.sample_ratio)
    return provider.get_tracer("flywheel")


def ensure(service: str, config: TracingConfig | None = None) -> None:
    """`setup(service, config)` unless this process set `service` up already (ServiceServer calls
    this, so a test that installed an in-memory exporter first keeps it)."""
    if service not in _configured:
        setup(service, config)


def tracer(service: str) -> trace.Tracer:
    """`service`'s tracer; the no-op tracer when it has none (exporter none, or setup not called)."""
    provider = _providers.get(service)
    return provider.get_tracer("flywheel") if provider is not None else _NOOP


def shutdown(service: str | None = None) -> None:
    """Flush and drop `service`'s provider (all when None)."""
    for name in [service] if service is not None else list(_configured | set(_providers)):
        _configured.discard(name)
        provider = _providers.pop(name, None)
        if provider is not None:
            provider.shutdown()


# ---------------------------------------------------------------- carrying the context


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def context_of(carrier: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> Context:
    """The trace context in gRPC metadata, HTTP headers or Kafka record headers (keys matched
    case-insensitively, values str or bytes); an empty context when there is none or it is malformed."""
    if carrier is None:
        return Context()
    items = carrier.items() if isinstance(carrier, Mapping) else carrier
    found = {}
    for key, value in items:
        k = str(key).lower()
        if k in (TRACEPARENT, TRACESTATE):
            found[k] = _text(value)
    if TRACEPARENT not in found:
        return Context()
    return _PROPAGATOR.extract(found, context=Context())


def span_context_of(carrier: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> trace.SpanContext | None:
    """The remote span context in `carrier` (for a span link), or None."""
    sc = trace.get_current_span(context_of(carrier)).get_span_context()
    return sc if sc.is_valid else None


def current_fields(context: Context | None = None) -> dict[str, str]:
    """{'traceparent': ..., ['tracestate': ...]} of the current (or given) span; {} without a valid one."""
    out: dict[str, str] = {}
    if trace.get_current_span(context).get_span_context().is_valid:
        _PROPAGATOR.inject(out, context=context)
    return out


def current_ids() -> dict[str, str]:
    """trace_id and span_id (hex) of the current span, for a log line; {} without a valid one."""
    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return {}
    return {"trace_id": format(sc.trace_id, "032x"), "span_id": format(sc.span_id, "016x")}


def record_headers(context: Context | None = None) -> list[tuple[str, bytes]]:
    """Kafka record headers carrying the current (or given) trace context; [] without one."""
    return [(k, v.encode("latin-1")) for k, v in current_fields(context).items()]


def with_context(headers: list[tuple[str, bytes]] | None) -> list[tuple[str, bytes]] | None:
    """`headers` plus the current trace context, unless they already carry one (a record re-sent
    from a spool keeps the context of the request that made it) or there is none."""
    if headers and any(k.lower() == TRACEPARENT for k, _ in headers):
        return headers
    extra = record_headers()
    if not extra:
        return headers
    return [*(headers or []), *extra]


def traceparent_of(span: trace.Span) -> str | None:
    """The `traceparent` value naming `span`, for an answer's header or metadata; None when not recorded."""
    fields = current_fields(trace.set_span_in_context(span))
    return fields.get(TRACEPARENT)


# ---------------------------------------------------------------- spans


@contextlib.contextmanager
def span(
    service: str,
    name: str,
    *,
    context: Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    links: list[trace.Link] | None = None,
    attributes: dict[str, Any] | None = None,
    record_errors: bool = True,
) -> Iterator[trace.Span]:
    """A current span of `service` named `name`, child of `context` (default: the current one).

    Without a provider (exporter none) nothing is recorded, but a caller's context in `context`
    becomes current, so records produced under it still carry the caller's trace.
    `record_errors` False: an exception leaving the block sets no status (an RPC span's status
    is its gRPC code, set by the caller; grpc's AbortError is how an error answer leaves).
    """
    provider = _providers.get(service)
    if provider is None:
        parent = trace.get_current_span(context) if context is not None else trace.INVALID_SPAN
        with trace.use_span(parent, end_on_exit=False):
            yield parent
        return
    with provider.get_tracer("flywheel").start_as_current_span(
        name,
        context=context,
        kind=kind,
        links=links,
        attributes=attributes,
        record_exception=record_errors,
        set_status_on_exception=record_errors,
    ) as s:
        yield s


__all__ = [
    "TRACEPARENT",
    "TracingConfig",
    "context_of",
    "current_fields",
    "ensure",
    "record_headers",
    "setup",
    "shutdown",
    "span",
    "span_context_of",
    "traceparent_of",
    "tracer",
    "with_context",
]
