"""Per-user and per-caller token buckets for the feedback intake.

In a module of its own because it is plain in-memory bookkeeping with no tie to Kafka or the
claims store (dedup.py); the intake (intake.py) spends a user's tokens only after the feedback token
checked out, so forged tokens cannot drain a victim's budget, and names users in their caller's
namespace (core.auth.Caller.scoped_user_id), so one API key's callers cannot drain another key's.
"""

from __future__ import annotations

import collections
import time

from flywheel.core import errors


class RateLimiter:
    """Token buckets by name (rate events/s, `burst` deep); LRU-bounded so memory stays flat."""

    def __init__(self, rate: float, burst: int, what: str, max_names: int = 100_000) -> None:
        self.rate, self.burst, self.what, self.max_names = rate, burst, what, max_names
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, name: str, n: int = 1, now: float | None = None) -> None:
        """Spend n tokens of `name`'s bucket, or errors.ResourceExhausted with retry_after_s."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(name, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < n:
            self._buckets[name] = (tokens, now)
            wait = (n - tokens) / self.rate
            raise errors.ResourceExhausted(
                f"rate limit for {self.what} {name!r} reached ({self.rate:g} events/s, burst {self.burst}): "
                f"retry in {wait:.2f} s",
                retry_after_s=wait,
                reason="rate_limited",
            )
        self._buckets[name] = (tokens - n, now)
        if len(self._buckets) > self.max_names:
            self._buckets.popitem(last=False)
