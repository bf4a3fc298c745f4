"""DurableSpool: order, persistence across reopen, bounds, failing senders, in-order drain."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from flywheel.core import errors
from flywheel.core.spool import DurableSpool, ProducerSender, SpoolRecord
from flywheel.testing import wait_for


class Recorder:
    """A sender that fails while `down` is set, then acknowledges up to `ack_limit` per call."""

    def __init__(self, down: bool = False, ack_limit: int | None = None) -> None:
        self.down, self.ack_limit = down, ack_limit
        self.sent: list[bytes] = []
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, records: Sequence[SpoolRecord]) -> int:
        with self.lock:
            self.calls += 1
            if self.down:
                raise ConnectionError("broker down")
            n = len(records) if self.ack_limit is None else min(self.ack_limit, len(records))
            self.sent.extend(r.value for r in records[:n])
            return n


def test_append_is_ordered_and_keeps_topic_key_headers(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "s.db", name="t-order")
    seqs = [spool.append("t", f"k{i}", f"v{i}".encode(), {"h": f"x{i}", "bin": b"\x00\xff"}) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    recs = spool.peek()
    assert [r.value for r in recs] == [f"v{i}".encode() for i in range(5)]
    assert recs[2].topic == "t" and recs[2].key == b"k2" and recs[2].headers == [("h", b"x2"), ("bin", b"\x00\xff")]
    assert spool.append("t", None, b"nokey") > seqs[-1] and spool.peek()[-1].key is None
    assert spool.depth() == 6 and REGISTRY.get_sample_value("flywheel_spool_depth", {"spool": "t-order"}) == 6
    spool.close()


CHILD = """
import sys
from flywheel.core.spool import DurableSpool
s = DurableSpool(sys.argv[1])
for i in range(50):
    s.append("t", "k", b"v%d" % i)
print("appended", flush=True)
import os; os._exit(0) if sys.argv[2] == "exit" else os.kill(os.getpid(), 9)
"""


def test_records_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "kill"], capture_output=True, text=True, timeout=60)
    assert "appended" in out.stdout  # killed with SIGKILL right after the appends returned
    spool = DurableSpool(path)
    assert spool.depth() == 50 and [r.value for r in spool.peek()] == [b"v%d" % i for i in range(50)]
    assert spool.append("t", "k", b"after") > spool.peek()[-2].seq  # seq keeps increasing across restarts
    spool.close()


def test_bounded_by_records_and_bytes(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "s.db", max_records=3, max_bytes=1000)
    spool.append_many([("t", "k", b"a", None), ("t", "k", b"b", None)])
    with pytest.raises(errors.ResourceExhausted, match="spool 'spool' is full .*retry later") as e:
        spool.append_many([("t", "k", b"c", None), ("t", "k", b"d", None)])  # all or nothing
    assert e.value.retry_after_s and e.value.retry_after_s > 0
    assert spool.depth() == 2
    spool.append("t", "k", b"c")
    with pytest.raises(errors.ResourceExhausted):
        spool.append("t", "k", b"d")
    spool.close()
    small = DurableSpool(tmp_path / "b.db", max_bytes=10)
    small.append("t", "k", b"12345")
    with pytest.raises(errors.ResourceExhausted, match="full"):
        small.append("t", "k", b"123456")
    assert small.depth() == 1 and small.size_bytes() == 5
    small.close()


def test_failing_sender_keeps_records_and_drain_retries_in_order(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "s.db", name="t-retry", backoff_s=0.01, max_backoff_s=0.05, drain_batch=7)
    sender = Recorder(down=True)
    spool.append_many([("t", "k", b"%d" % i, None) for i in range(30)])
    with pytest.raises(errors.Unavailable):
        spool.drain_once(sender)
    assert spool.depth() == 30
    spool.start(sender)
    wait_for(lambda: sender.calls >= 3, 5, "the drain thread to retry")
    assert spool.depth() == 30 and sender.sent == []  # retried, nothing lost
    spool.append("t", "k", b"30")
    sender.down = False
    assert spool.wait_empty(5)
    assert sender.sent == [b"%d" % i for i in range(31)]
    drained = REGISTRY.get_sample_value("flywheel_spool_drained_total", {"spool": "t-retry"})
    assert drained == 31
    spool.close()
    assert DurableSpool(tmp_path / "s.db").depth() == 0  # deletions are durable too


def test_partial_ack_deletes_only_the_acknowledged_prefix(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "s.db")
    spool.append_many([("t", "k", b"%d" % i, None) for i in range(5)])
    assert spool.drain_once(Recorder(ack_limit=2)) == 2
    assert [r.value for r in spool.peek()] == [b"2", b"3", b"4"]
    spool.close()
    reopened = DurableSpool(tmp_path / "s.db")
    sender = Recorder()
    assert reopened.drain_once(sender) == 3 and sender.sent == [b"2", b"3", b"4"]
    reopened.close()


class FakeFuture:
    def __init__(self) -> None:
        self.is_done, self.exception, self.event = False, None, threading.Event()

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def failed(self) -> bool:
        return self.is_done and self.exception is not None

    def resolve(self, exc: Exception | None = None) -> None:
        self.is_done, self.exception = True, exc
        self.event.set()

    def get(self, timeout: float) -> None:
        if not self.event.wait(timeout):
            raise TimeoutError("not acked yet")
        if self.exception:
            raise self.exception


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[int, FakeFuture]] = []

    def send_raw(self, topic: str, key: bytes | None, value: bytes, headers: object) -> FakeFuture:
        fut = FakeFuture()
        self.sent.append((int(value), fut))
        return fut


def test_producer_sender_never_queues_a_second_copy_of_an_inflight_record(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "s.db")
    producer = FakeProducer()
    sender = ProducerSender(producer, timeout_s=0.05)
    seqs = spool.append_many([("t", "k", b"%d" % i, None) for i in range(3)])
    adopted = FakeFuture()  # a direct send that timed out, then was spooled
    sender.adopt(seqs[0], adopted)
    with pytest.raises(errors.Unavailable):
        spool.drain_once(sender)
    with pytest.raises(errors.Unavailable):
        spool.drain_once(sender)
    assert [v for v, _ in producer.sent] == [1, 2]  # record 0 rides on the adopted future; 1, 2 sent once
    adopted.resolve()
    for _, fut in producer.sent:
        fut.resolve()
    assert spool.drain_once(sender) == 3 and spool.depth() == 0
    assert [v for v, _ in producer.sent] == [1, 2]
    # a failed future is resent
    seq = spool.append("t", "k", b"7")
    failed = FakeFuture()
    failed.resolve(ConnectionError("gone"))
    sender.adopt(seq, failed)
    producer.sent.clear()
    threading.Timer(0.01, lambda: producer.sent[0][1].resolve()).start()
    assert spool.drain_once(sender) == 1 and [v for v, _ in producer.sent] == [7]
    spool.close()


def test_produce_errors_are_classified_once_permanent_or_transient() -> None:
    from kafka import errors as kerrors

    from flywheel.core import bus

    permanent: list[tuple[BaseException, str]] = [
        (kerrors.MessageSizeTooLargeError("client side: larger than max_request_size"), "too_large"),
        (kerrors.MessageSizeTooLargeError(), "too_large"),  # MESSAGE_TOO_LARGE from the broker
        (kerrors.RecordListTooLargeError(), "too_large"),
        (kerrors.InvalidRecordError(), "invalid_record"),
        (kerrors.CorruptRecordError(), "invalid_record"),
        (TypeError("All headers items must be (str, bytes) tuples"), "serialization"),
    ]
    for exc, reason in permanent:
        assert bus.produce_refusal(exc) == reason, exc
    refused = bus.RecordRefused("t", b"k", "too_large", kerrors.MessageSizeTooLargeError(), 5000)
    assert bus.produce_refusal(refused) == "too_large" and "5000 bytes" in refused.message
    assert refused.code.name == "INVALID_ARGUMENT"
    transient = [
        kerrors.KafkaTimeoutError(),
        kerrors.NotEnoughReplicasError(),
        kerrors.NotEnoughReplicasAfterAppendError(),
        kerrors.NotLeaderForPartitionError(),
        kerrors.KafkaConnectionError(),
        kerrors.RequestTimedOutError(),
        kerrors.TopicAuthorizationFailedError(),
        kerrors.KafkaError("part of a batch which had invalid records"),  # a batch-mate, not the culprit
        errors.Unavailable("Kafka away"),
        None,
    ]
    assert [bus.produce_refusal(e) for e in transient] == [None] * len(transient)
