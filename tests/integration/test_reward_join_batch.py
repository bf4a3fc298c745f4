"""The join's BatchConsumer on a real Apache Kafka broker: a poll handled together, committed after.

A poll goes to the batch handler in one call (an undecodable record goes to the dead-letter
topic on its own); a batch that fails is redone one record at a time with bus.Consumer's
retries; offsets are committed only for what was handled.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from flywheel.core import bus
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.reward.batch_consumer import BatchConsumer
from flywheel.reward.config import JoinConfig
from flywheel.reward.join import PreferenceJoin
from flywheel.reward.store import PreferenceStore
from flywheel.v1 import events_pb2 as ev
from tests.integration.test_reward_service import (
    REWARD_CMD,
    events,
    join_pair_count,
    produce,
    read_all,
    reward_process_env,
    wait_for_pairs,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]


def setup(kafka_bootstrap: str, t: TopicsConfig, n: int, garbage_at: int | None = None) -> KafkaConfig:
    kafka = KafkaConfig(
        bootstrap=kafka_bootstrap,
        session_timeout_ms=3000,
        max_attempts=2,
        retry_backoff_s=0.01,
        request_timeout_ms=10_000,
    )
    bus.ensure_topics(kafka, t)
    with bus.Producer(kafka) as p:
        for i in range(n):
            if i == garbage_at:
                p.send_raw(t.interactions, b"bad", b"\xff\x00 not a protobuf")
            p.send(t.interactions, f"i{i}", ev.Interaction(interaction_id=f"i{i}", prompt="q", response=f"r{i}"))
        p.flush(20)
    return kafka


def run_until(c: BatchConsumer, cond, timeout_s: float = 30.0) -> None:
    c.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not cond() and c.error is None:
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        c.stop()
    if c.error is not None:
        raise c.error


def committed(kafka: KafkaConfig, group: str, topic: str) -> int | None:
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, 0))
    finally:
        c.close(autocommit=False)


def read(kafka: KafkaConfig, topic: str, want: int) -> list:
    c = KafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    got, deadline = [], time.monotonic() + 20
    try:
        while len(got) < want and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                got += recs
    finally:
        c.close()
    return got


@pytest.mark.parametrize("batch_size", [200, 16])
def test_a_poll_goes_to_the_batch_handler_at_once_and_is_committed(
    kafka_bootstrap: str, topics_config: TopicsConfig, batch_size: int
) -> None:
    t, n = topics_config, 120
    kafka = setup(kafka_bootstrap, t, n, garbage_at=50)
    batches: list[list[str]] = []
    singles: list[str] = []
    group = f"batch-{uuid.uuid4().hex[:6]}"
    c = BatchConsumer(
        kafka,
        group,
        {t.interactions: ev.Interaction},
        lambda r: singles.append(r.value.interaction_id),
        batch_handler=lambda rs: batches.append([r.value.interaction_id for r in rs]),
        dlq_topic=t.dlq,
        batch_size=batch_size,
    )
    run_until(c, lambda: sum(map(len, batches)) >= n)
    assert singles == [] and [i for b in batches for i in b] == [f"i{i}" for i in range(n)]
    assert len(batches) < n / 4  # records arrived together, so they were handled together
    assert max(map(len, batches)) <= batch_size
    (dead,) = read(kafka, t.dlq, 1)
    assert ev.DeadLetter.FromString(dead.value).offset == 50
    assert committed(kafka, group, t.interactions) == n + 1  # every record, the dead-lettered one too


def test_a_failed_batch_is_redone_one_record_at_a_time(kafka_bootstrap: str, topics_config: TopicsConfig) -> None:
    t, n = topics_config, 30
    kafka = setup(kafka_bootstrap, t, n)
    singles: list[str] = []
    tries: list[int] = []

    def batch_fails(records: list[bus.Record]) -> None:
        tries.append(len(records))
        raise RuntimeError("a bad record somewhere in this poll")

    def single(r: bus.Record) -> None:
        if r.value.interaction_id == "i7" and "i7" not in singles:
            singles.append("i7")  # its first try fails; bus.Consumer's retry takes it
            raise RuntimeError("once")
        singles.append(r.value.interaction_id)

    group = f"batch-{uuid.uuid4().hex[:6]}"
    c = BatchConsumer(
        kafka, group, {t.interactions: ev.Interaction}, single, batch_handler=batch_fails, dlq_topic=t.dlq
    )
    run_until(c, lambda: len(singles) >= n + 1)
    assert tries and all(k > 0 for k in tries)
    assert [s for s in singles if s != "i7"] == [f"i{i}" for i in range(n) if i != 7] and singles.count("i7") == 2
    assert committed(kafka, group, t.interactions) == n


@pytest.mark.timeout(240)
def test_small_batches_killed_twice_lose_and_double_no_pair(
    kafka_bootstrap: str, topics_config: TopicsConfig, tmp_path
) -> None:
    """`python -m flywheel.reward` with 16-record batches, SIGKILLed twice mid-stream: each pair once."""
    kafka = KafkaConfig(bootstrap=kafka_bootstrap, request_timeout_ms=10_000)
    t = topics_config
    bus.ensure_topics(kafka, t)
    env = reward_process_env(kafka_bootstrap, t, tmp_path, FLYWHEEL_REWARD_JOIN_BATCH_RECORDS="16")
    n = 240
    produce(kafka, t, events(random.Random(2), 0, n))

    def run_until(at_least: int, sig: int, log: str) -> None:
        proc = subprocess.Popen(REWARD_CMD, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / log, "w"))
        try:
            wait_for_pairs(proc, tmp_path, at_least, f"see {log}", poll_s=0.01)
        finally:
            proc.send_signal(sig)
            proc.wait(20)

    for k, at in enumerate((30, 130)):
        run_until(max(at, join_pair_count(tmp_path) + 1), signal.SIGKILL, f"log{k}")
    run_until(n, signal.SIGTERM, "log-last")  # returns once the process has exited: the count is final
    assert join_pair_count(tmp_path) == n
    pairs = read_all(kafka, t.preferences, ev.PreferencePair, n)
    first: dict[str, bytes] = {}
    for p in pairs:  # every pair; a repeat only as the identical record under the same key
        assert first.setdefault(p.pair_id, p.SerializeToString()) == p.SerializeToString()
    assert len(first) == n


def test_a_users_repeated_vote_from_kafka_counts_once_and_ids_are_per_user(
    kafka_bootstrap: str, topics_config: TopicsConfig, tmp_path
) -> None:
    """The join behind a real BatchConsumer: alice's second preference on a pair and her second
    thumbs on an answer (other feedback_ids, put on the topic by some route other than the feedback
    service) make no pair and no label; bob's feedback under alice's ids is his own and counts."""
    t = topics_config
    kafka = KafkaConfig(bootstrap=kafka_bootstrap, session_timeout_ms=3000, request_timeout_ms=10_000)
    bus.ensure_topics(kafka, t)
    its = [ev.Interaction(interaction_id=f"P{s}", pair_id="P", pair_side=s, prompt="q", response=f"r{s}") for s in "AB"]
    its += [ev.Interaction(interaction_id=i, prompt="q2", response=f"r{i}") for i in ("x", "y")]
    pref = ev.FEEDBACK_KIND_PREFERENCE

    def thumb(fid: str, user: str, iid: str, value: int) -> ev.FeedbackEvent:
        return ev.FeedbackEvent(
            feedback_id=fid, user_id=user, interaction_id=iid, kind=ev.FEEDBACK_KIND_THUMBS, value=value
        )

    feedback = [
        ev.FeedbackEvent(feedback_id="f1", user_id="alice", pair_id="P", kind=pref, preference=ev.PREFERENCE_A),
        ev.FeedbackEvent(feedback_id="f2", user_id="alice", pair_id="P", kind=pref, preference=ev.PREFERENCE_B),
        ev.FeedbackEvent(feedback_id="f1", user_id="bob", pair_id="P", kind=pref, preference=ev.PREFERENCE_B),
        thumb("t1", "alice", "x", 1),
        thumb("t2", "alice", "x", -1),  # her second thumbs on x
        thumb("t1", "bob", "y", -1),
    ]
    with bus.Producer(kafka) as p:
        for it in its:
            p.send(t.interactions, it.interaction_id, it)
        for f in feedback:
            p.send(t.feedback, f.pair_id or f.interaction_id, f)
        p.flush(20)
    store = PreferenceStore(tmp_path / "join.sqlite")
    published: list[ev.PreferencePair] = []
    join = PreferenceJoin(JoinConfig(heldout_percent=0), store, published.extend)
    group = f"join-{uuid.uuid4().hex[:6]}"
    c = BatchConsumer(
        kafka,
        group,
        {t.interactions: ev.Interaction, t.feedback: ev.FeedbackEvent},
        join.handle,
        batch_handler=join.handle_batch,
        dlq_topic=t.dlq,
    )
    done = lambda: store.feedback_status("t1", "bob") == "joined" and store.feedback_status("f1", "bob") == "joined"  # noqa: E731
    run_until(c, lambda: done() and len(store.labels()) >= 2)
    assert store.feedback_status("f2", "alice") == store.feedback_status("t2", "alice") == "repeated_vote"
    pairs = sorted((p.chosen, p.rejected, p.source) for p in store.pairs_after(0, split=None))
    assert pairs == [("rA", "rB", "preference"), ("rB", "rA", "preference"), ("rx", "ry", "thumbs")]
    assert sorted((x.response, x.label) for x in store.labels()) == [("rx", 1.0), ("ry", 0.0)]
    assert len(published) == 3 and committed(kafka, group, t.feedback) == len(feedback)
    store.close()
