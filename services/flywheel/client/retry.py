"""When the client calls again: UNAVAILABLE and RESOURCE_EXHAUSTED only, with capped exponential
backoff and jitter, or after the server's own `retry-after` hint when it sends one.

Every other status is the caller's to handle (a bad argument, an expired token: calling again
would fail the same way). A retried feedback call sends the same feedback_id, so the feedback
service records it once however many attempts it took (see `Receipt`).
"""

from __future__ import annotations

import dataclasses
import math
import random

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to call again. `RetryPolicy(max_attempts=1)`: never retry.

    The wait before attempt n+1 is the server's retry-after hint when it sent one (plus up to
    `jitter` of `base_backoff_s`, so clients refused together do not return together), else
    `min(max_backoff_s, base_backoff_s * 2**(n-1))` shortened by up to `jitter` of itself. A hint
    longer than `max_retry_after_s` is not waited for: the error is raised at once, with the hint
    in `retry_after_s`, so an application never blocks for minutes inside one call.
    """

    max_attempts: int = 4  # calls in all, the first included
    base_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    jitter: float = 0.5  # 0: exact waits; 1: anywhere from 0 to the full backoff
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts = {self.max_attempts}: use 1 (no retries) or more")
        if not (0 <= self.base_backoff_s <= self.max_backoff_s and math.isfinite(self.max_backoff_s)):
            raise ValueError(
                f"RetryPolicy backoff: base_backoff_s = {self.base_backoff_s}, max_backoff_s = {self.max_backoff_s}: "
                "use 0 <= base_backoff_s <= max_backoff_s (seconds)"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter = {self.jitter}: use a fraction in 0..1")
        if self.max_retry_after_s < 0:
            raise ValueError(f"RetryPolicy.max_retry_after_s = {self.max_retry_after_s}: use 0 or more seconds")

    def delay_s(
        self, attempt: int, code: grpc.StatusCode, retry_after_s: float | None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before calling again after failed attempt number `attempt` (1-based) with
        `code`, or None: do not call again."""
        if code not in RETRYABLE or attempt >= self.max_attempts:
            return None
        r = (rng or random).random()
        if retry_after_s is not None:
            if retry_after_s > self.max_retry_after_s:
                return None
            return retry_after_s + self.jitter * self.base_backoff_s * r
        backoff = min(self.max_backoff_s, self.base_backoff_s * 2 ** (attempt - 1))
        return backoff * (1 - self.jitter * r)


NO_RETRY = RetryPolicy(max_attempts=1)
