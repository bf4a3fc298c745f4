"""Chaos on a real Apache Kafka of the test's own: feedback keeps coming while the broker is stopped
for 30 s, the feedback service is SIGKILLed during the outage and the reward service is SIGKILLed
while it joins the backlog. Every acknowledged feedback event ends up on the topic (at least once: a
kill between Kafka's ack and the spool's delete sends it again) and in the reward dataset once,
joined to its answer.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from kafka import KafkaProducer

from flywheel.core import bus
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.testing import wait_for
from flywheel.v1 import events_pb2, feedback_pb2
from tests.integration.test_feedback_service import Service, free_port, read_topic, token
from tools.kafka import ApacheKafka

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]

ANSWERS = 40
OUTAGE_S = 30
ACKED = (feedback_pb2.SUBMIT_STATUS_ACCEPTED, feedback_pb2.SUBMIT_STATUS_SPOOLED, feedback_pb2.SUBMIT_STATUS_DUPLICATE)


class Load:
    """One client submitting thumbs without pause, each on (answer i % ANSWERS, user i); a call that
    fails (the service restarting) is sent again with the same feedback_id, as a client should."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.acked: set[str] = set()
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            iid, user = f"i-{i % ANSWERS}", f"u-{i}"
            req = feedback_pb2.FeedbackRequest(
                feedback_id=f"f-{i}", interaction_id=iid, user_id=user, thumbs=1 if i % 3 else -1,
                feedback_token=token(iid, user),
            )  # fmt: skip
            try:
                self.statuses.append(self.service.stub.Submit(req, timeout=5).status)
            except (grpc.RpcError, ValueError):  # down, restarting, or a closed channel: same id again
                time.sleep(0.1)
                continue
            if self.statuses[-1] in ACKED:
                self.acked.add(f"f-{i}")
            i += 1
            time.sleep(0.02)


def start_reward(bootstrap: str, topics: TopicsConfig, tmp: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_TOPICS_INTERACTIONS": topics.interactions,
        "FLYWHEEL_TOPICS_FEEDBACK": topics.feedback,
        "FLYWHEEL_TOPICS_PREFERENCES": topics.preferences,
        "FLYWHEEL_TOPICS_REWARD_UPDATES": topics.reward_updates,
        "FLYWHEEL_TOPICS_DLQ": topics.dlq,
        "FLYWHEEL_TOPICS_PARTITIONS": "1",
        "FLYWHEEL_MODEL_STORE_ROOT": str(tmp / "store"),
        "FLYWHEEL_REWARD_JOIN_STATE_DIR": str(tmp / "reward"),
        "FLYWHEEL_REWARD_TRAIN_ENABLED": "false",  # the join alone
        "FLYWHEEL_SERVER_HOST": "127.0.0.1",
        "FLYWHEEL_SERVER_GRACE_S": "1",
    }
    log = open(tmp / "reward.log", "ab")  # noqa: SIM115 - the child keeps its own copy
    http = free_port()
    try:
        args = ["--grpc-port", str(free_port()), "--http-port", str(http)]
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.reward", *args], env=env, stdout=log, stderr=log)
    finally:
        log.close()

    def serving() -> bool:
        assert proc.poll() is None, (tmp / "reward.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_for(serving, 240, "the reward service to serve", poll_s=0.2)
    return proc


def joined(tmp: Path) -> dict[str, str]:
    """feedback_id -> status, of every feedback event in the reward join store."""
    path = tmp / "reward" / "join.sqlite"
    if not path.is_file():
        return {}
    with sqlite3.connect(path) as db:
        try:
            return dict(db.execute("SELECT feedback_id, status FROM feedback").fetchall())
        except sqlite3.OperationalError:  # not created yet
            return {}


def test_feedback_survives_a_broker_outage_and_kills_of_feedback_and_reward(tmp_path: Path) -> None:
    broker = ApacheKafka(free_port(), tmp_path / "kafka")
    bootstrap = broker.start()
    name = uuid.uuid4().hex[:8]
    topics = TopicsConfig(
        interactions=f"{name}.interactions", feedback=f"{name}.feedback", preferences=f"{name}.preferences",
        reward_updates=f"{name}.reward.updates", policy_updates=f"{name}.policy.updates", dlq=f"{name}.dlq",
        partitions=1, replication_factor=1,
    )  # fmt: skip
    reward = feedback = None
    try:
        bus.ensure_topics(KafkaConfig(bootstrap=bootstrap), topics)
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        for k in range(ANSWERS):  # the answers feedback is about, as the policy publishes them
            it = events_pb2.Interaction(interaction_id=f"i-{k}", prompt=f"question {k % 4}", response=f"answer {k}")
            producer.send(topics.interactions, key=it.interaction_id.encode(), value=it.SerializeToString())
        producer.flush()
        producer.close()
        reward = start_reward(bootstrap, topics, tmp_path)
        env = {"FLYWHEEL_KAFKA_REQUEST_TIMEOUT_MS": "1000"}
        (tmp_path / "feedback").mkdir()
        feedback = Service(bootstrap, topics.feedback, tmp_path / "feedback", **env)
        load = Load(feedback)
        wait_for(lambda: len(load.acked) >= 20, 60, "feedback accepted before the outage")
        broker.stop()  # the outage: feedback is spooled
        outage = time.monotonic()
        time.sleep(5)
        feedback.stop(signal.SIGKILL)  # ... and the feedback service dies with a spool full of it
        feedback = load.service = Service(bootstrap, topics.feedback, tmp_path / "feedback", **env)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage)))
        assert feedback_pb2.SUBMIT_STATUS_SPOOLED in load.statuses
        broker.start()  # back, same data: the spool drains, the join catches up
        wait_for(lambda: len(joined(tmp_path)) >= 10, 120, "the reward join to resume")
        reward.send_signal(signal.SIGKILL)  # mid-join
        reward.wait(10)
        reward = start_reward(bootstrap, topics, tmp_path)
        time.sleep(3)
        load.stop.set()
        load.thread.join(30)
        acked = set(load.acked)
        assert len(acked) >= 60 and set(load.statuses) <= set(ACKED), (len(acked), set(load.statuses))
        wait_for(
            lambda: acked <= set(joined(tmp_path)), 180, lambda: f"{len(acked - set(joined(tmp_path)))} not joined"
        )
        events = read_topic(bootstrap, topics.feedback, n=len(acked), settle_s=2, timeout_s=60)
        on_topic = [e.feedback_id for _, e, _ in events]
        assert acked <= set(on_topic), sorted(acked - set(on_topic))[:10]
        # At least once on the topic: a SIGKILL between Kafka's ack and the spool's delete sends a
        # record again (core/spool.py). The join store is keyed by (user, feedback_id): once in the dataset.
        status = joined(tmp_path)
        assert {status[f] for f in acked} == {"joined"}, {f: status[f] for f in acked if status[f] != "joined"}
    finally:
        for proc in (reward,):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if feedback is not None:
            feedback.stop(signal.SIGKILL)
        broker.stop()


def test_the_reward_service_waits_for_kafka_at_start(tmp_path: Path) -> None:
    """Started while its broker is down, the reward service waits (logged once) instead of exiting,
    and serves once the broker is up."""
    broker = ApacheKafka(free_port(), tmp_path / "kafka")
    name = uuid.uuid4().hex[:8]
    topics = TopicsConfig(
        **{t: f"{name}.{t}" for t in ("interactions", "feedback", "preferences", "reward_updates", "dlq")}
    )
    holder: list[subprocess.Popen[bytes]] = []
    starting = threading.Thread(target=lambda: holder.append(start_reward(broker.bootstrap, topics, tmp_path)))
    starting.start()
    try:
        wait_for(lambda: "waiting for it" in log_of(tmp_path), 60, "the reward service to say it waits for Kafka")
        assert starting.is_alive()  # not serving yet, and not exited (start_reward asserts it runs)
        broker.start()
        starting.join(180)
        assert holder and holder[0].poll() is None, log_of(tmp_path)[-2000:]
        assert log_of(tmp_path).count("Kafka unreachable at start") == 1
    finally:
        for proc in holder:
            proc.kill()
        broker.stop()


def log_of(tmp: Path) -> str:
    path = tmp / "reward.log"
    return path.read_text(errors="replace") if path.is_file() else ""
