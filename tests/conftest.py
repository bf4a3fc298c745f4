"""Shared fixtures. Brokers start lazily: only a test that asks for one pays for it.

- `kafka_bootstrap`: the Apache Kafka broker named by FLYWHEEL_TEST_KAFKA (host:port; the
  test script starts one with `python -m tools.kafka start`), otherwise one
  this session starts in a temp dir and stops at the end.
- `tansu_bootstrap`: the embedded Tansu broker on a free port, for the session.
- `topics_config`: topic names with a unique prefix, so tests never share a topic.

Tests wait for conditions, never for a fixed time: `flywheel.testing.wait_for(condition,
timeout_s, what)` (and `wait_until` in a coroutine) polls until it holds and fails naming `what`.
A sleep stays only where time passing is the point (pacing a load, letting a deadline expire).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from flywheel.core.config import TopicsConfig


def _env_bootstrap() -> str | None:
    return os.environ.get("FLYWHEEL_TEST_KAFKA") or os.environ.get("FLYWHEEL_TEST_BOOTSTRAP") or None


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a real Apache Kafka 4.x broker (KRaft)."""
    external = _env_bootstrap()
    if external:
        yield external
        return
    from tools.kafka import ApacheKafka

    broker = ApacheKafka(data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.start(timeout_s=120)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tansu_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of the embedded Tansu broker (memory storage)."""
    from flywheel.core.brokers import EmbeddedTansu

    broker = EmbeddedTansu(log_path=str(tmp_path_factory.mktemp("tansu") / "tansu.log"))
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture
def topics_config() -> TopicsConfig:
    """Fresh topic names for one test (prefix `t<hex>.`), 1 partition so order is checkable."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    defaults = TopicsConfig()
    names = {f: prefix + getattr(defaults, f) for f in ("interactions", "feedback", "preferences")}
    names |= {f: prefix + getattr(defaults, f) for f in ("policy_updates", "reward_updates", "dlq")}
    return TopicsConfig(**names, partitions=1)
