"""A real feedback service process on the real Kafka broker, logging JSON: every line it writes
parses, with the fields; kafka-python's per-connection INFO lines stay out unless asked for."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from flywheel.core import bus
from flywheel.core.config import KafkaConfig
from tests.integration.test_feedback_service import Service, fb, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def run_once(bootstrap: str, tmp_path: Path, topics_config, **env: str) -> list[dict]:
    """Start the service, give one piece of feedback, stop it; its output lines, parsed."""
    bus.ensure_topics(KafkaConfig(bootstrap=bootstrap), topics_config)
    svc = Service(bootstrap, topics_config.feedback, tmp_path, FLYWHEEL_LOG_FORMAT="json", **env)
    try:
        svc.stub.Submit(fb("f-1", "u1", "i-1"), timeout=10)
        assert len(read_topic(bootstrap, topics_config.feedback, 1)) == 1
    finally:
        assert svc.stop(signal.SIGTERM) == 0
    text = Path(svc.log.name).read_text()
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line that is not JSON: {line!r}\nin:\n{text[-3000:]}")
    return out


def test_json_logs_by_default_without_library_chatter(kafka_bootstrap: str, tmp_path: Path, topics_config) -> None:
    records = run_once(kafka_bootstrap, tmp_path, topics_config)
    assert records, "the service logged nothing"
    for r in records:
        assert {"time", "level", "service", "logger", "message"} <= set(r), r
        assert r["service"] == "feedback"
    assert any(r["logger"].startswith("flywheel") for r in records)
    chatter = [r for r in records if r["logger"].startswith("kafka") and r["level"] in ("DEBUG", "INFO")]
    assert not chatter, chatter[:3]


def test_log_levels_bring_a_library_back(kafka_bootstrap: str, tmp_path: Path, topics_config) -> None:
    records = run_once(kafka_bootstrap, tmp_path, topics_config, FLYWHEEL_LOG_LEVELS="kafka=INFO")
    kafka_info = [r for r in records if r["logger"].startswith("kafka.") and r["level"] == "INFO"]
    assert kafka_info, [r["logger"] for r in records]
    assert all(r["service"] == "feedback" for r in kafka_info)
