"""Prometheus metrics shared by every service, and the text exposition for `/metrics`.

Metrics live in prometheus_client's default registry so that engines, Kafka consumers and
the server helper all show up on one `/metrics` page without passing a registry around.
Label values stay low-cardinality: gRPC service/method/code, HTTP route template/status.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Generation can take seconds; scoring and feedback take milliseconds. One set of buckets
# covers both so dashboards can compare services.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

GRPC_REQUESTS = Counter(
    "flywheel_grpc_requests",
    "gRPC requests handled, by final status code.",
    ["service", "method", "code"],
)
GRPC_LATENCY = Histogram(
    "flywheel_grpc_latency_seconds",
    "Time from the start of a gRPC handler to its final status (whole stream for streaming RPCs).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("flywheel_grpc_in_flight", "gRPC requests being handled now.", ["service", "method"])
HTTP_REQUESTS = Counter(
    "flywheel_http_requests",
    "HTTP requests handled, by route template and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "flywheel_http_latency_seconds",
    "Time to produce an HTTP response (for streaming responses: the whole stream).",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
SERVING = Gauge("flywheel_serving", "1 while this process reports SERVING on its health endpoints, else 0.")


def split_method(full_method: str) -> tuple[str, str]:
    """'/flywheel.v1.Reward/Score' -> ('flywheel.v1.Reward', 'Score')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text format of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
