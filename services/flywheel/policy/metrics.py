"""Prometheus series of the policy service (base units, `_total` counters), one set per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Metrics:
    """Prometheus series of the engine (base units, `_total` counters). Created once per process."""

    def __init__(self) -> None:
        p = "flywheel_policy_"
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a slot.")
        self.running = Gauge(p + "running_sequences", "Sequences in the running batch.")
        self.tokens = Counter(p + "generated_tokens", "Tokens generated.")
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled.")
        self.requests = Counter(p + "requests", "Finished or refused requests by outcome.", ["outcome"])
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submit to first token.", buckets=_LATENCY)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two tokens.", buckets=_LATENCY)
        self.e2e_seconds = Histogram(p + "request_duration_seconds", "Submit to last token.", buckets=_LATENCY)
        self.queue_seconds = Histogram(p + "queue_time_seconds", "Submit to admission.", buckets=_LATENCY)
        self.step_seconds = Histogram(p + "step_duration_seconds", "One scheduler step.", buckets=_LATENCY)
        self.swaps = Counter(p + "swaps", "Hot swaps by outcome (ok, refused, failed).", ["outcome"])
        self.swap_seconds = Histogram(p + "swap_duration_seconds", "Load plus switch of a new version.")
        self.swap_lag = Histogram(
            p + "swap_lag_seconds",
            "Announcement on the updates topic (the record's timestamp) to the switch: delivery, verify, load.",
            buckets=_LATENCY,
        )
        self.version = Gauge(p + "serving_version", "Model-store version being served.")


METRICS = _Metrics()
