"""The bus on real brokers over the network: Apache Kafka 4.x (KRaft) and the embedded Tansu.

Every test asserts on counts and contents, so none can pass by receiving nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerrors
from prometheus_client import REGISTRY

from flywheel.core import bus
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.testing import wait_for
from flywheel.v1 import common_pb2, events_pb2

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(60)]


@pytest.fixture(params=["kafka", "tansu"])
def kafka(request: pytest.FixtureRequest) -> KafkaConfig:
    """A KafkaConfig for each broker; 2 s sessions so a dead member leaves the group quickly."""
    bootstrap = request.getfixturevalue(f"{request.param}_bootstrap")
    return KafkaConfig(
        bootstrap=bootstrap, session_timeout_ms=2000, max_attempts=3, retry_backoff_s=0.01, request_timeout_ms=10_000
    )


def consume(kafka: KafkaConfig, group: str, decoders: dict, n: int, handler=None, timeout_s: float = 20.0) -> list:
    """Run a consumer (in its thread) until its handler has returned for `n` records; return them."""
    got: list[bus.Record] = []

    def handle(record: bus.Record) -> None:
        if handler is not None:
            handler(record)
        got.append(record)

    dlq = decoders.pop("__dlq__", None)
    c = bus.Consumer(kafka, group, decoders, handle, dlq_topic=dlq)
    c.start()
    try:
        wait_for(lambda: len(got) >= n or c.error is not None, timeout_s, f"{n} records in group {group}")
    finally:
        c.stop()
    if c.error is not None:
        raise c.error
    return got


def committed(kafka: KafkaConfig, group: str, topic: str, reader: KafkaConsumer | None = None) -> int | None:
    """The group's committed offset on partition 0, read without joining the group."""
    c = reader or KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, 0))
    finally:
        if reader is None:
            c.close(autocommit=False)


def test_round_trip_of_every_event_type(kafka: KafkaConfig, topics_config: TopicsConfig) -> None:
    t = topics_config
    bus.ensure_topics(kafka, t)
    sent = {
        t.interactions: (
            "i-1",
            events_pb2.Interaction(
                interaction_id="i-1",
                prompt="Say hi",
                response="hi ✓",
                policy_version=3,
                params=common_pb2.SamplingParams(max_new_tokens=16, temperature=0.7, stop=["\n"]),
                prompt_tokens=2,
                generated_tokens=1,
            ),
        ),
        t.feedback: (
            "i-1",
            events_pb2.FeedbackEvent(
                feedback_id="f-1", interaction_id="i-1", kind=events_pb2.FEEDBACK_KIND_RATING, value=3, rating_scale=3
            ),
        ),
        t.preferences: (
            "p-1",
            events_pb2.PreferencePair(
                pair_id="p-1", prompt="q", chosen="a", rejected="b", weight=1.0, source_feedback_ids=["f-1"]
            ),
        ),
        t.policy_updates: (
            "policy",
            events_pb2.ModelUpdate(
                model="policy",
                version=4,
                parent=3,
                uri="file:///m/policy/v4",
                files=[events_pb2.FileDigest(path="model.safetensors", sha256="ab" * 32, size=10)],
                metrics={"kl_to_reference": 0.02},
            ),
        ),
        t.dlq: (
            "k",
            events_pb2.DeadLetter(
                topic="x", partition=1, offset=7, key=b"k", value=b"\x00\xff", error="boom", attempts=3
            ),
        ),
    }
    decoders = {
        t.interactions: events_pb2.Interaction,
        t.feedback: events_pb2.FeedbackEvent,
        t.preferences: events_pb2.PreferencePair,
        t.policy_updates: events_pb2.ModelUpdate,
        t.dlq: events_pb2.DeadLetter,
    }
    with bus.Producer(kafka) as producer:
        for topic, (key, msg) in sent.items():
            md = producer.send_sync(topic, key, msg, headers={"trace": "t1"})
            assert md.topic == topic and md.offset == 0
    got = consume(kafka, "rt", decoders, n=len(sent))
    assert len(got) == len(sent)
    for r in got:
        key, msg = sent[r.topic]
        assert (r.key, r.value, r.headers["trace"]) == (key, msg, b"t1")
        assert type(r.value) is type(msg)


CHILD = """
import sys, time
from flywheel.core import bus
from flywheel.core.config import KafkaConfig
from flywheel.v1 import events_pb2
bootstrap, topic, group, out = sys.argv[1:5]
def handle(r):
    with open(out, "a") as f:
        f.write(r.value.interaction_id + "\\n")
    if r.value.interaction_id == "block":
        time.sleep(600)  # killed here: handled but never committed
import logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=2000)
bus.Consumer(kafka, group, {topic: events_pb2.Interaction}, handle, dlq_topic=None).run(timeout_s=60)
"""


def test_killed_consumer_redelivers_only_what_it_did_not_commit(
    kafka: KafkaConfig, topics_config: TopicsConfig, tmp_path: Path
) -> None:
    topic, group, out = topics_config.interactions, "killed", tmp_path / "handled.txt"
    bus.ensure_topics(kafka, topics_config)
    producer = bus.Producer(kafka)
    producer.send_sync(topic, "a", events_pb2.Interaction(interaction_id="first"))
    child_log = open(tmp_path / "child.log", "wb")  # noqa: SIM115
    child = subprocess.Popen([sys.executable, "-c", CHILD, kafka.bootstrap, topic, group, str(out)], stderr=child_log)
    reader = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)

    def lines() -> list[str]:
        return out.read_text().split() if out.exists() else []

    def state() -> str:
        log = (tmp_path / "child.log").read_text()[-3000:]
        return f"handled={lines()} committed={committed(kafka, group, topic, reader)} child log:\n{log}"

    try:
        # "first" handled and committed: killed after its commit, it must not come back.
        wait_for(lambda: lines() == ["first"] and committed(kafka, group, topic, reader) == 1, 30, state, 0.2)
        producer.send_sync(topic, "b", events_pb2.Interaction(interaction_id="block"))
        wait_for(lambda: lines() == ["first", "block"], 30, state)
        os.kill(child.pid, signal.SIGKILL)  # inside the handler of "block", before its commit
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
        child_log.close()
        reader.close(autocommit=False)
    assert committed(kafka, group, topic) == 1
    producer.send_sync(topic, "c", events_pb2.Interaction(interaction_id="sentinel"))
    producer.close()
    got = consume(kafka, group, {topic: events_pb2.Interaction}, n=2)
    # Same partition, so order is offset order: "first" would have come before "block".
    assert [r.value.interaction_id for r in got] == ["block", "sentinel"]
    assert [r.offset for r in got] == [1, 2]
    assert committed(kafka, group, topic) == 3


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_failing_record_goes_to_dlq_and_consumer_moves_on(kafka: KafkaConfig, topics_config: TopicsConfig) -> None:
    t = topics_config
    bus.ensure_topics(kafka, t)
    group = "dlq-" + t.interactions
    with bus.Producer(kafka) as producer:
        for iid in ("ok-1", "poison", "ok-2"):
            producer.send_sync(t.interactions, iid, events_pb2.Interaction(interaction_id=iid), headers={"trace": iid})
        producer.send_raw(t.interactions, b"garbage", b"\xff\xff\xff").get(10)  # cannot be decoded
        producer.send_sync(t.interactions, "ok-3", events_pb2.Interaction(interaction_id="ok-3"))
    tries: list[str] = []

    def handler(r: bus.Record) -> None:
        tries.append(r.value.interaction_id)
        if r.value.interaction_id == "poison":
            raise ValueError("poison pill: prompt missing")

    got = consume(kafka, group, {t.interactions: events_pb2.Interaction, "__dlq__": t.dlq}, n=3, handler=handler)
    assert [r.value.interaction_id for r in got] == ["ok-1", "ok-2", "ok-3"]
    assert tries == ["ok-1", "poison", "poison", "poison", "ok-2", "ok-3"]  # max_attempts=3, then moved on
    assert committed(kafka, group, t.interactions) == 5

    dead = consume(kafka, "dlq-reader", {t.dlq: events_pb2.DeadLetter}, n=2)
    assert len(dead) == 2
    poison, garbage = dead
    assert poison.key == "poison" and garbage.key == "garbage"
    dl = poison.value
    assert (dl.topic, dl.partition, dl.offset, dl.key, dl.consumer_group) == (t.interactions, 0, 1, b"poison", group)
    assert events_pb2.Interaction.FromString(dl.value).interaction_id == "poison"
    assert (dl.error_type, dl.error, dl.attempts) == ("ValueError", "poison pill: prompt missing", 3)
    assert dl.failed_at.seconds > 0
    h = poison.headers
    assert h[bus.H_ERROR] == b"poison pill: prompt missing" and h[bus.H_ERROR_TYPE] == b"ValueError"
    assert (h[bus.H_TOPIC], h[bus.H_OFFSET], h[bus.H_ATTEMPTS], h["trace"]) == (
        t.interactions.encode(),
        b"1",
        b"3",
        b"poison",
    )
    g = garbage.value
    assert (g.offset, g.value, g.attempts, g.error_type) == (3, b"\xff\xff\xff", 0, "DecodeError")

    labels = {"topic": t.interactions, "group": group}
    assert metric("flywheel_bus_dead_lettered_total", **labels) == 2
    assert metric("flywheel_bus_handler_failures_total", **labels) == 4
    assert metric("flywheel_bus_consumed_total", **labels) == 3
    assert metric("flywheel_bus_consumer_lag", topic=t.interactions, partition="0", group=group) == 0
    assert metric("flywheel_bus_produced_total", topic=t.dlq) >= 2


class Crash(BaseException):
    """Stands in for a process dying mid-handler: not an Exception, so no retry and no commit."""


def test_duplicate_delivery_leaves_one_effect(kafka: KafkaConfig, topics_config: TopicsConfig, tmp_path: Path) -> None:
    t = topics_config
    bus.ensure_topics(kafka, t)
    seen = bus.SeenIds(tmp_path / "seen.sqlite")
    seen.conn.execute("CREATE TABLE effects (feedback_id TEXT, value INTEGER)")
    fb = events_pb2.FeedbackEvent(
        feedback_id="f-42", interaction_id="i-1", kind=events_pb2.FEEDBACK_KIND_THUMBS, value=1
    )
    with bus.Producer(kafka) as producer:
        producer.send_sync(t.feedback, "i-1", fb)  # the client retried: the same event twice
        producer.send_sync(t.feedback, "i-1", fb)
    applied: list[bool] = []

    def apply(r: bus.Record) -> None:
        insert = lambda conn: conn.execute("INSERT INTO effects VALUES (?, ?)", (r.value.feedback_id, r.value.value))  # noqa: E731
        applied.append(seen.apply_once(r.value.feedback_id, insert))

    def apply_then_crash(r: bus.Record) -> None:
        apply(r)
        raise Crash()  # the effect is durable, the offset is not committed

    with pytest.raises(Crash):
        consume(kafka, "dup", {t.feedback: events_pb2.FeedbackEvent}, n=1, handler=apply_then_crash)
    assert committed(kafka, "dup", t.feedback) is None
    got = consume(kafka, "dup", {t.feedback: events_pb2.FeedbackEvent}, n=2, handler=apply)
    assert [r.offset for r in got] == [0, 1]  # offset 0 delivered a second time, then the duplicate
    assert applied == [True, False, False]
    assert seen.conn.execute("SELECT feedback_id, value FROM effects").fetchall() == [("f-42", 1)]
    assert "f-42" in seen and len(seen) == 1 and not seen.add("f-42") and seen.add("f-43")
    seen.close()
    assert "f-42" in bus.SeenIds(tmp_path / "seen.sqlite")  # durable across reopen


def test_stop_finishes_the_current_record_commits_and_closes(kafka: KafkaConfig, topics_config: TopicsConfig) -> None:
    t = topics_config
    bus.ensure_topics(kafka, t)
    with bus.Producer(kafka) as producer:
        for i in range(3):
            producer.send(t.interactions, f"k{i}", events_pb2.Interaction(interaction_id=f"i{i}"))
        producer.flush()
    started, handled = [], []

    def slow(r: bus.Record) -> None:
        started.append(r.offset)
        time.sleep(0.5)
        handled.append(r.offset)

    c = bus.Consumer(kafka, "stopper", {t.interactions: events_pb2.Interaction}, slow, dlq_topic=None)
    thread = c.start()
    wait_for(lambda: started, 15, "the first record")
    c.stop()
    assert not thread.is_alive() and c.error is None
    assert handled == started == [0]  # finished the record in hand, started no other
    assert committed(kafka, "stopper", t.interactions) == 1


def test_refused_commit_and_poll_error_do_not_end_the_loop(kafka: KafkaConfig, topics_config: TopicsConfig) -> None:
    """kafka-python raises from commit while its group rebalances (a RebalanceInProgressError ended the
    reward join's loop in a demo run, and with it the reward model's training) and from poll while
    the broker is away. Injected once each into a real consumer: the loop goes on and the next
    commit covers the refused offsets."""
    t, group = topics_config, "refused"
    bus.ensure_topics(kafka, t)
    producer = bus.Producer(kafka)
    for i in range(3):
        producer.send(t.interactions, "k", events_pb2.Interaction(interaction_id=f"i{i}"))  # one key, one partition
    producer.flush()
    got: list[str] = []
    c = bus.Consumer(
        kafka, group, {t.interactions: events_pb2.Interaction}, lambda r: got.append(r.value.interaction_id)
    )
    real_commit, real_poll = c.consumer.commit, c.consumer.poll
    faults = {
        "commit": [kerrors.RebalanceInProgressError("injected")],
        "poll": [kerrors.KafkaConnectionError("injected")],
    }

    def commit(offsets=None, **kw):
        if faults["commit"]:
            raise faults["commit"].pop()
        return real_commit(offsets, **kw)

    def poll(**kw):
        if got and faults["poll"]:
            raise faults["poll"].pop()
        return real_poll(**kw)

    c.consumer.commit, c.consumer.poll = commit, poll
    before = {
        k: metric("flywheel_bus_consumer_errors_total", group=group, kind=k) for k in ("commit_rebalanced", "poll")
    }
    c.start()
    try:
        wait_for(lambda: len(got) == 3 and not faults["poll"], 20, lambda: f"3 records and a poll, got {got}")
        producer.send_sync(t.interactions, "k", events_pb2.Interaction(interaction_id="i3"))
        wait_for(lambda: committed(kafka, group, t.interactions) == 4, 20, lambda: f"the commit of 4, got {got}")
    finally:
        c.stop()
        producer.close()
    assert c.error is None and got == ["i0", "i1", "i2", "i3"]
    for kind, n in before.items():
        assert metric("flywheel_bus_consumer_errors_total", group=group, kind=kind) == n + 1, kind


def test_send_sync_says_clearly_when_kafka_is_unreachable() -> None:
    from flywheel.core import errors
    from flywheel.core.brokers import free_port

    kafka = KafkaConfig(bootstrap=f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    producer = bus.Producer(kafka)
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable, match="cannot reach Kafka at '127.0.0.1:"):
        producer.send_sync("flywheel.feedback", "k", events_pb2.FeedbackEvent(feedback_id="f"))
    assert time.monotonic() - t0 < 10
