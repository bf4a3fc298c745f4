"""A record the broker can never accept never blocks a spool or a producer (issue 19, section 1).

On the real Apache Kafka broker: topics with a small `max.message.bytes`, records that are
too large for them (refused by the broker) or for the producer's max_request_size (refused by
the client), between normal records. The normal ones arrive in order, the refused ones are on
the dead-letter topic with the reason (or counted as dropped when even that topic refuses
them), and the spool is empty.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from prometheus_client import REGISTRY

from flywheel.core import bus
from flywheel.core.config import KafkaConfig
from flywheel.core.spool import DurableSpool, ProducerSender
from flywheel.policy.interactions import InteractionPublisher
from flywheel.testing import wait_for
from flywheel.v1 import events_pb2

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]

LIMIT = 2000  # the topics' max.message.bytes


def make_topic(bootstrap: str, max_message_bytes: int | None = None) -> str:
    name = f"t{uuid.uuid4().hex[:10]}.unfixable"
    configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
    finally:
        admin.close()
    return name


def read(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list[Any]:
    """The first `n` records of partition 0 (fails naming the topic if fewer arrive)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got: list[Any] = []
    try:
        wait_for(
            lambda: got.extend(m for ms in consumer.poll(timeout_ms=100).values() for m in ms) or len(got) >= n,
            timeout_s,
            f"{n} records on {topic}",
        )
    finally:
        consumer.close()
    return got


def count(name: str, topic: str, reason: str) -> float:
    return REGISTRY.get_sample_value(name, {"topic": topic, "reason": reason}) or 0.0


def test_spool_dead_letters_what_kafka_refuses_and_the_rest_flows_on(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic, dlq = make_topic(kafka_bootstrap, LIMIT), make_topic(kafka_bootstrap)
    producer = bus.Producer(KafkaConfig(bootstrap=kafka_bootstrap), dlq_topic=dlq, max_request_size=100_000)
    spool = DurableSpool(tmp_path / "s.db", name="t-unfixable", backoff_s=0.05, max_backoff_s=0.2)
    big, huge = b"B" * 5000, b"H" * 200_000  # refused by the broker; by the client (max_request_size)
    spool.append_many(
        [(topic, "k0", b"v0", None), (topic, "big", big, {"h": "x"}), (topic, "k1", b"v1", None)]
        + [(topic, "huge", huge, None)]
        + [(topic, f"k{i}", b"v%d" % i, None) for i in range(2, 6)]
    )
    spool.start(ProducerSender(producer, timeout_s=10, source="t-unfixable"))
    try:
        assert spool.wait_empty(30), f"the spool is stuck at its head: {spool.last_error!r}"
        assert [m.value for m in read(kafka_bootstrap, topic, 6)] == [b"v%d" % i for i in range(6)]  # in order
        letters = read(kafka_bootstrap, dlq, 2)
        dead = [events_pb2.DeadLetter.FromString(m.value) for m in letters]
        assert [(d.topic, d.key, d.partition, d.error_type) for d in dead] == [
            (topic, b"big", -1, "MessageSizeTooLargeError"),
            (topic, b"huge", -1, "MessageSizeTooLargeError"),
        ]
        assert all(d.consumer_group == "t-unfixable" and "send less" in d.error for d in dead)
        headers = dict(letters[0].headers)
        assert headers[bus.H_REASON] == b"too_large" and headers["h"] == b"x" and bus.H_TRUNCATED not in headers
        assert dead[0].value == big  # byte for byte
        # the huge one is cut to what the producer can send, and says so
        assert huge.startswith(dead[1].value) and 50_000 < len(dead[1].value) < 100_000
        assert dict(letters[1].headers)[bus.H_TRUNCATED] == b"200000" and "value truncated from 200000" in dead[1].error
        assert count("flywheel_bus_records_dead_lettered_total", topic, "too_large") == 2
        # the shared producer is not poisoned by the refusals: a later record goes straight through
        assert producer.send_sync(topic, "k6", events_pb2.DeadLetter(topic="after")).offset == 6
    finally:
        spool.close()
        producer.close()


def test_a_dead_letter_too_large_for_its_topic_is_cut_to_what_fits(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic, dlq = make_topic(kafka_bootstrap, LIMIT), make_topic(kafka_bootstrap, 3000)
    producer = bus.Producer(KafkaConfig(bootstrap=kafka_bootstrap), dlq_topic=dlq)
    spool = DurableSpool(tmp_path / "s.db", name="t-unfixable-cut", backoff_s=0.05, max_backoff_s=0.2)
    spool.append_many([(topic, "cut", b"C" * 5000, None), (topic, "k0", b"v0", None)])
    spool.start(ProducerSender(producer, timeout_s=10, source="t-unfixable-cut"))
    try:
        assert spool.wait_empty(30), f"the spool is stuck at its head: {spool.last_error!r}"
        assert [m.value for m in read(kafka_bootstrap, topic, 1)] == [b"v0"]
        (letter,) = read(kafka_bootstrap, dlq, 1)
        dead = events_pb2.DeadLetter.FromString(letter.value)
        assert (dead.key, dead.value) == (b"cut", b"C" * 1024)  # what fits, and it says so
        assert dict(letter.headers)[bus.H_TRUNCATED] == b"5000" and "truncated from 5000 to 1024" in dead.error
        assert count("flywheel_bus_records_dead_lettered_total", topic, "too_large") == 1
    finally:
        spool.close()
        producer.close()


def test_a_record_not_even_the_dead_letter_topic_takes_is_counted_and_passed(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic, dlq = make_topic(kafka_bootstrap, LIMIT), make_topic(kafka_bootstrap, 200)
    producer = bus.Producer(KafkaConfig(bootstrap=kafka_bootstrap), dlq_topic=dlq)
    spool = DurableSpool(tmp_path / "s.db", name="t-unfixable-drop", backoff_s=0.05, max_backoff_s=0.2)
    spool.append_many([(topic, "k0", b"v0", None), (topic, "lost", b"D" * 5000, None), (topic, "k1", b"v1", None)])
    spool.start(ProducerSender(producer, timeout_s=10, source="t-unfixable-drop"))
    try:
        assert spool.wait_empty(30), f"the spool is stuck at its head: {spool.last_error!r}"
        assert [m.value for m in read(kafka_bootstrap, topic, 2)] == [b"v0", b"v1"]
        assert count("flywheel_bus_records_dropped_total", topic, "too_large") == 1
        assert count("flywheel_bus_records_dead_lettered_total", topic, "too_large") == 0
        assert f"dropped a record for {topic} (key b'lost', 5000 bytes)" in caplog.text  # logged with its key
    finally:
        spool.close()
        producer.close()


def test_an_interaction_too_large_for_its_topic_does_not_block_later_ones(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic, dlq = make_topic(kafka_bootstrap, LIMIT), make_topic(kafka_bootstrap)
    publisher = InteractionPublisher(
        KafkaConfig(bootstrap=kafka_bootstrap), topic, tmp_path / "i.db", send_timeout_s=5, dlq_topic=dlq
    )
    publisher.start()
    try:
        publisher.publish(events_pb2.Interaction(interaction_id="i0", prompt="p0"))
        publisher.publish(events_pb2.Interaction(interaction_id="big", prompt="p", user_id="u" * 10_000))
        for i in range(1, 4):
            publisher.publish(events_pb2.Interaction(interaction_id=f"i{i}", prompt=f"p{i}"))
        assert publisher.wait_idle(20)
        wait_for(lambda: publisher.depth() == 0, 30, "the interactions spool to empty")
        got = [events_pb2.Interaction.FromString(m.value).interaction_id for m in read(kafka_bootstrap, topic, 4)]
        assert got == ["i0", "i1", "i2", "i3"]
        (letter,) = read(kafka_bootstrap, dlq, 1)
        dead = events_pb2.DeadLetter.FromString(letter.value)
        assert dead.key == b"big" and events_pb2.Interaction.FromString(dead.value).user_id == "u" * 10_000
        # later interactions go straight to Kafka again, not behind anything
        publisher.publish(events_pb2.Interaction(interaction_id="i4", prompt="p4"))
        assert publisher.wait_idle(20) and publisher.depth() == 0
        assert len(read(kafka_bootstrap, topic, 5)) == 5
    finally:
        publisher.close()


def test_a_consumer_whose_dead_letter_is_too_large_for_the_dlq_sends_a_cut_copy_and_goes_on(
    kafka_bootstrap: str,
) -> None:
    topic, dlq = make_topic(kafka_bootstrap), make_topic(kafka_bootstrap, 3000)
    kafka = KafkaConfig(bootstrap=kafka_bootstrap, max_attempts=1, retry_backoff_s=0.01, session_timeout_ms=2000)
    producer = bus.Producer(kafka)
    poison = events_pb2.Interaction(interaction_id="poison", prompt="P" * 2900)
    for it in (poison, events_pb2.Interaction(interaction_id="ok0"), events_pb2.Interaction(interaction_id="ok1")):
        producer.send_sync(topic, it.interaction_id, it)
    handled: list[str] = []

    def handle(record: bus.Record) -> None:
        if record.key == "poison":
            raise ValueError("cannot handle this one")
        handled.append(record.key or "")

    consumer = bus.Consumer(kafka, f"g-{uuid.uuid4().hex[:6]}", {topic: events_pb2.Interaction}, handle, dlq_topic=dlq)
    consumer.start()
    try:
        wait_for(lambda: len(handled) == 2 or consumer.error is not None, 30, "the records behind the poison one")
        assert consumer.error is None and handled == ["ok0", "ok1"]
        (letter,) = read(kafka_bootstrap, dlq, 1)
        dead = events_pb2.DeadLetter.FromString(letter.value)
        assert (dead.topic, dead.offset, dead.error_type) == (topic, 0, "ValueError")
        assert poison.SerializeToString().startswith(dead.value) and len(dead.value) == 1024
        assert dict(letter.headers)[bus.H_TRUNCATED] == str(poison.ByteSize()).encode()
    finally:
        consumer.stop()
        producer.close()
