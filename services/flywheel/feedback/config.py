"""Configuration of the feedback service: limits, rate limits, local stores, Kafka hand-off.

The longest user_id is not here: the policy and the feedback service share one limit
(`flywheel.core.limits.LimitsConfig.max_user_id_chars`, the `limits` section)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flywheel.core.config import require, setting


@dataclasses.dataclass
class FeedbackConfig:
    """What the feedback intake accepts and where it keeps its durable state."""

    SECTION: ClassVar[str] = "feedback"

    rating_scale: int = setting(3, "Ratings are integers 1..rating_scale.", alias="FLYWHEEL_RATING_SCALE")
    max_batch: int = setting(100, "Most items in one SubmitBatch.")
    max_id_chars: int = setting(128, "Longest feedback_id, interaction_id or pair_id.")
    max_comment_chars: int = setting(2000, "Longest comment.")
    max_demonstration_chars: int = setting(8000, "Longest demonstration (the answer the user wanted).")
    per_user_rate: float = setting(
        20.0, "Token bucket per user_id: events per second (0: no limit).", alias="FLYWHEEL_FEEDBACK_USER_RATE"
    )
    per_user_burst: int = setting(100, "Token bucket per user_id: burst size.", alias="FLYWHEEL_FEEDBACK_USER_BURST")
    per_key_rate: float = setting(
        5000.0,
        "Token bucket per API key (all anonymous callers share one): events per second (0: no limit).",
        alias="FLYWHEEL_FEEDBACK_KEY_RATE",
    )
    per_key_burst: int = setting(
        20000, "Token bucket per API key: burst size (at least max_batch).", alias="FLYWHEEL_FEEDBACK_KEY_BURST"
    )
    state_dir: str = setting(
        ".flywheel/feedback",
        "Directory of the spool and the store of accepted ids and votes (a persistent volume in Kubernetes).",
    )
    spool_path: str = setting("", "Spool database (empty: <state_dir>/spool.sqlite).")
    spool_max_records: int = setting(
        1_000_000,
        "Spool capacity in records; beyond it submissions get 429.",
    )
    spool_max_mb: int = setting(1024, "Spool capacity in MiB of events.")
    dedup_path: str = setting(
        "", "Store of the feedback_ids and votes already accepted, per user (empty: <state_dir>/seen.sqlite)."
    )
    dedup_retention_s: int = setting(
        8 * 24 * 3600,
        "How long a user's feedback_id and vote are remembered (longer than the feedback-token TTL, after which "
        "no token admits a retry or another vote anyway).",
    )
    send_timeout_s: float = setting(
        5.0,
        "Wait this long for Kafka's ack (acks=all) before the event goes to the spool instead.",
    )
    page_enabled: bool = setting(
        True,
        "Serve the feedback web page (GET / -> /ui/: chat, thumbs, ratings, edits, compare mode) and "
        "/ui/widget.js, the script an application embeds (docs/PAGE.md).",
    )
    page_policy_url: str = setting(
        "http://localhost:8080",
        "The policy's HTTP base URL as the user's browser reaches it (the page streams answers from it; the "
        "policy's server.cors_origins must list this page's origin). Empty: the page's own origin, for an "
        "Ingress that routes the policy's routes and the page under one host.",
    )
    page_prompts: list[str] = setting(
        [],
        "Sample prompts the page's compare mode offers with 'next' (comma-separated). Empty: the prompts of "
        "the starter policy's corpus.",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(2 <= self.rating_scale <= 100, n, "rating_scale", self.rating_scale, "use 2..100 (3 by default)")
        require(1 <= self.max_batch <= 10_000, n, "max_batch", self.max_batch, "use 1..10000")
        for name in ("max_id_chars", "max_comment_chars", "max_demonstration_chars"):
            require(getattr(self, name) >= 1, n, name, getattr(self, name), "use 1 or more characters")
        for name in ("per_user_rate", "per_key_rate"):
            require(getattr(self, name) >= 0, n, name, getattr(self, name), "use events per second, or 0 for no limit")
        require(self.per_user_burst >= 1, n, "per_user_burst", self.per_user_burst, "use 1 or more")
        require(
            self.per_key_burst >= self.max_batch,
            n,
            "per_key_burst",
            self.per_key_burst,
            f"use at least max_batch ({self.max_batch}), or a full batch could never pass",
        )
        require(bool(self.state_dir), n, "state_dir", self.state_dir, "name a writable directory")
        require(self.spool_max_records >= 1, n, "spool_max_records", self.spool_max_records, "use 1 or more")
        require(self.spool_max_mb >= 1, n, "spool_max_mb", self.spool_max_mb, "use 1 or more MiB")
        require(self.dedup_retention_s > 0, n, "dedup_retention_s", self.dedup_retention_s, "use a positive number")
        require(self.send_timeout_s > 0, n, "send_timeout_s", self.send_timeout_s, "use a positive number of seconds")
        url = self.page_policy_url
        require(
            url == "" or (url.startswith(("http://", "https://")) and "?" not in url and "#" not in url),
            n,
            "page_policy_url",
            url,
            "use the policy's base URL such as https://policy.example.com (a path is fine; no query or fragment), or empty "
            "for the page's own origin",
        )

    def spool_file(self) -> str:
        return self.spool_path or f"{self.state_dir}/spool.sqlite"

    def dedup_file(self) -> str:
        return self.dedup_path or f"{self.state_dir}/seen.sqlite"
