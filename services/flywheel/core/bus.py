"""The Kafka bus: protobuf events over kafka-python, at-least-once with idempotent effects.

The rules (docs/ARCHITECTURE.md, 'Rules that hold everywhere'):
- producers use acks=all and idempotence;
- a consumer commits a record's offset only after its handler returned (the effect is
  durable); a handler that keeps failing is retried with exponential backoff, then the
  record goes to the dead-letter topic with the error, and the consumer moves on;
- every event has an id and applying it twice changes nothing: `SeenIds` helps with that;
- a record carries the W3C trace context of the request that made it in its `traceparent`
  header (core/tracing.py), so a consumer's span joins that request's trace.

kafka-python speaks only the classic consumer-group protocol (not KIP-848), which is what
both Apache Kafka and the embedded Tansu broker serve here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerrors
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from flywheel.core import errors, tracing
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

PRODUCED = Counter(
    "flywheel_bus_produced", "Records sent (minus produce_errors: acknowledged with acks=all).", ["topic"]
)
PRODUCE_ERRORS = Counter("flywheel_bus_produce_errors", "Records Kafka did not acknowledge.", ["topic"])
CONSUMED = Counter(
    "flywheel_bus_consumed", "Records whose handler returned (offset then committed).", ["topic", "group"]
)
FAILED = Counter("flywheel_bus_handler_failures", "Handler exceptions (each try counts).", ["topic", "group"])
DEAD_LETTERED = Counter("flywheel_bus_dead_lettered", "Records sent to the dead-letter topic.", ["topic", "group"])
LAG = Gauge(
    "flywheel_bus_consumer_lag",
    "Records not yet processed (high watermark - next offset).",
    ["topic", "partition", "group"],
)
HANDLER_SECONDS = Histogram("flywheel_bus_handler_seconds", "Time a handler took on one record.", ["topic", "group"])
LOOP_ERRORS = Counter(
    "flywheel_bus_consumer_errors",
    "Kafka errors a consumer loop survived, by kind: commit_rebalanced (records will be redelivered), "
    "commit_retry (offsets kept for the next commit), poll (polled again after a backoff).",
    ["group", "kind"],
)
# A commit the group refused because its membership changed: the partitions' owner after the
# rebalance (maybe this consumer again, once its next poll rejoins) gets those records again.
# kafka-python 3 raises RebalanceInProgressError when it already knows of the rebalance and
# CommitFailedError when the coordinator says so.
COMMIT_REBALANCED = (
    kerrors.CommitFailedError,
    kerrors.RebalanceInProgressError,
    kerrors.IllegalGenerationError,
    kerrors.UnknownMemberIdError,
)

# Headers of a dead-lettered record (the DeadLetter value repeats them).
H_ERROR, H_ERROR_TYPE, H_TOPIC = "flywheel-error", "flywheel-error-type", "flywheel-original-topic"
H_PARTITION, H_OFFSET, H_GROUP, H_ATTEMPTS = (
    "flywheel-original-partition",
    "flywheel-original-offset",
    "flywheel-consumer-group",
    "flywheel-attempts",
)

# Headers of a record a producer could never deliver (dead-lettered by `Producer.dead_letter`).
H_REASON, H_TRUNCATED = "flywheel-refusal-reason", "flywheel-value-truncated"

Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None

RECORDS_DEAD_LETTERED = Counter(
    "flywheel_bus_records_dead_lettered",
    "Records Kafka refused for good when produced (too large, invalid), written to the dead-letter topic "
    "instead, by original topic and reason.",
    ["topic", "reason"],
)
RECORDS_DROPPED = Counter(
    "flywheel_bus_records_dropped",
    "Records Kafka refused for good that not even the dead-letter topic took (logged with their key), "
    "by original topic and reason.",
    ["topic", "reason"],
)

# Produce errors that no retry can fix for this record (docs/ARCHITECTURE.md, 'Delivery
# guarantees'), by the reason label they count under. Everything else (no broker, timeouts,
# not enough replicas, a leader that moved, authorization) is transient: keep the record.
_PERMANENT_PRODUCE_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (kerrors.MessageSizeTooLargeError, "too_large"),  # client side (max_request_size) or MESSAGE_TOO_LARGE
    (kerrors.RecordListTooLargeError, "too_large"),
    (kerrors.InvalidRecordError, "invalid_record"),
    (kerrors.CorruptRecordError, "invalid_record"),
    (kerrors.InvalidTimestampError, "invalid_record"),
    (TypeError, "serialization"),  # kafka-python's checks of key, value and headers
    (ValueError, "serialization"),
)
# The longest error text a DeadLetter carries; on its last, short try: the error, key and value kept.
_DLQ_MAX_ERROR_CHARS = 1000
_DLQ_SHORT_ERROR_CHARS, _DLQ_SHORT_KEY_BYTES, _DLQ_SHORT_VALUE = 300, 256, 1024
# The value a DeadLetter keeps on its first try (the broker's default limit is 1 MiB).
_DLQ_MAX_VALUE = 512 << 10
# Room left in a producer request for the DeadLetter's other fields and headers.
_DLQ_ROOM = 16 << 10


def produce_refusal(exc: BaseException | None) -> str | None:
    """Why Kafka refused a record for good ("too_large", "invalid_record", "serialization"), or
    None when the error is transient and sending the record again can succeed.

    The one classification of produce errors: the spool drain, the policy's interactions
    publisher, the feedback hand-off and `Producer` all use it. A `RecordRefused` carries its
    reason; an `errors.Unavailable` is transient by definition.
    """
    if isinstance(exc, RecordRefused):
        return exc.refusal
    if exc is None or isinstance(exc, errors.FlywheelError):
        return None
    for cls, reason in _PERMANENT_PRODUCE_ERRORS:
        if isinstance(exc, cls):
            return reason
    return None


class RecordRefused(errors.InvalidArgument):
    """Kafka refused this record for a reason no retry can fix (`produce_refusal`).

    The records behind it must flow on: a spool dead-letters it (`Producer.dead_letter`), a
    caller waiting on it is told this error instead of an acknowledgement.
    """

    def __init__(self, topic: str, key: bytes | None, refusal: str, cause: BaseException, size: int) -> None:
        what = {
            "too_large": f"is {size} bytes, more than Kafka accepts for topic {topic!r} (its max.message.bytes, "
            "or the producer's max_request_size): send less",
            "invalid_record": f"was refused by Kafka as invalid for topic {topic!r}",
            "serialization": "could not be serialized",
        }.get(refusal, f"was refused by Kafka for topic {topic!r}")
        super().__init__(f"the record {what} ({type(cause).__name__}: {cause})", reason=f"refused_{refusal}")
        self.topic, self.key, self.refusal, self.cause, self.size = topic, key, refusal, cause, size


def _is_fatal(client: Any) -> bool:
    """An idempotent kafka-python producer that failed a record with a non-retriable error
    (MESSAGE_TOO_LARGE from the broker, INVALID_RECORD) is in a fatal state: it fails every
    later record with that same error. It must be replaced, never reused."""
    tm = getattr(client, "_transaction_manager", None)
    return bool(tm is not None and tm.has_fatal_error())


def _retire(client: Any) -> None:
    """Close a producer off the caller's thread (it may be the producer's own I/O thread)."""

    def close() -> None:
        with contextlib.suppress(Exception):
            client.close(timeout=5)

    threading.Thread(target=close, name="kafka-producer-retire", daemon=True).start()


Sample = tuple[str, dict[str, str], float]  # (sample name, labels, value)


def consumer_samples() -> list[Sample]:
    """This process's consumer counters and lag, for a parent process to export as its own
    (`mirror_consumer_samples`): a consumer that runs in a helper process (the policy's swap
    worker) still shows on its service's /metrics."""
    return [
        (s.name, s.labels, s.value)
        for metric in (CONSUMED, FAILED, LOOP_ERRORS, LAG)
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def mirror_consumer_samples(samples: list[Sample], seen: dict[tuple, float]) -> None:
    """Export another process's `consumer_samples` through this process's metrics. Counters
    advance by what they gained since the last call (`seen` keeps each series' last value; a
    helper that was restarted counts from 0 again: pass a new `seen`); gauges take the value."""
    counters = {
        "flywheel_bus_consumed_total": CONSUMED,
        "flywheel_bus_handler_failures_total": FAILED,
        "flywheel_bus_consumer_errors_total": LOOP_ERRORS,
    }
    for name, labels, value in samples:
        if name == "flywheel_bus_consumer_lag":
            LAG.labels(**labels).set(value)
        elif name in counters:
            key = (name, tuple(sorted(labels.items())))
            gained, seen[key] = value - seen.get(key, 0.0), value
            if gained > 0:
                counters[name].labels(**labels).inc(gained)


def _headers(headers: Headers) -> list[tuple[str, bytes]]:
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    return [(k, v.encode() if isinstance(v, str) else bytes(v)) for k, v in items]


def ensure_topics(kafka: KafkaConfig, topics: TopicsConfig, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics of `topics`; return the names created.

    Event topics get `topics.partitions` partitions and `retention_ms`; the model-update
    topics get one partition and cleanup.policy=compact (only the latest version per model
    matters, and one partition keeps announcements in order). "Already exists", also from a
    creator racing us, is fine.
    """
    try:
        admin = KafkaAdminClient(**kafka.client_options(), bootstrap_timeout_ms=int(timeout_s * 1000))
    except kerrors.KafkaError as e:
        raise errors.Unavailable(f"cannot reach Kafka at {kafka.bootstrap!r} to create topics: {e}") from e
    try:
        existing = set(admin.list_topics())
        wanted: dict[str, dict[str, Any]] = {}
        for name in topics.all():
            if name in existing:
                continue
            if name in topics.compacted():
                cfg = {"cleanup.policy": "compact"}
                wanted[name] = {"num_partitions": 1, "replication_factor": topics.replication_factor, "configs": cfg}
            else:
                cfg = {"retention.ms": str(topics.retention_ms)}
                n = topics.partitions
                wanted[name] = {"num_partitions": n, "replication_factor": topics.replication_factor, "configs": cfg}
        if not wanted:
            return []
        result = admin.create_topics(wanted, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        created = []
        for t in result["topics"]:
            code = t["error_code"]
            if code == 0:
                created.append(t["name"])
            elif code != kerrors.TopicAlreadyExistsError.errno:
                err = kerrors.for_code(code).__name__
                raise errors.FailedPrecondition(f"creating topic {t['name']!r} failed: {err}: {t.get('error_message')}")
        admin.wait_for_topics(list(wanted), timeout_ms=int(timeout_s * 1000))
        return created
    except kerrors.KafkaError as e:
        raise errors.Unavailable(f"Kafka at {kafka.bootstrap!r} did not create topics in time: {e}") from e
    finally:
        admin.close()


class Producer:
    """Publishes protobuf events with acks=all and idempotence; the client connects on first use.

    A record Kafka refuses for good (`produce_refusal`) never blocks the producer: `send_raw`
    raises `RecordRefused` at once for what the client itself refuses (larger than
    max_request_size, not serializable); a refusal by the broker fails that record's future,
    and the idempotent client it poisoned (it then fails every later record) is replaced on the
    next send. `deliver_alone` tells a real refusal from such collateral failures, and
    `dead_letter` writes a refused record to the dead-letter topic, so callers move on.
    """

    def __init__(self, kafka: KafkaConfig, *, dlq_topic: str = "flywheel.dlq", **overrides: Any) -> None:
        self.kafka, self.dlq_topic = kafka, dlq_topic
        self._opts = {
            **kafka.client_options(),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 5,
            "max_block_ms": kafka.request_timeout_ms,
            "bootstrap_timeout_ms": kafka.request_timeout_ms,
            **overrides,
        }
        self._producer: KafkaProducer | None = None
        self._alone: KafkaProducer | None = None  # one record at a time: deliver_alone, dead_letter
        self._lock = threading.Lock()
        self._alone_lock = threading.Lock()
        self._metrics: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}  # label lookups cost per record

    @property
    def max_request_size(self) -> int:
        return int(self._opts.get("max_request_size", 1048576))

    def _connect(self, **extra: Any) -> KafkaProducer:
        try:
            return KafkaProducer(**{**self._opts, **extra})
        except kerrors.KafkaError as e:
            raise errors.Unavailable(f"cannot reach Kafka at {self.kafka.bootstrap!r}: {e}") from e

    @property
    def client(self) -> KafkaProducer:
        p = self._producer
        if p is None or _is_fatal(p):
            with self._lock:
                if self._producer is not None and _is_fatal(self._producer):
                    log.warning("the Kafka producer was poisoned by a refused record: replacing it")
                    _retire(self._producer)
                    self._producer = None
                if self._producer is None:
                    self._producer = self._connect()
                p = self._producer
        return p

    def _refused(self, topic: str, key: bytes | None, value: bytes | None, exc: BaseException) -> RecordRefused | None:
        reason = produce_refusal(exc)
        if reason is None:
            return None
        return RecordRefused(topic, key, reason, exc, len(key or b"") + len(value or b""))

    def send_raw(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers = None) -> Any:
        """Send bytes as they are; returns kafka-python's future.

        RecordRefused when the client refuses this record for good (nothing was queued);
        errors.Unavailable when Kafka cannot take records now. The current trace context goes
        into the record's headers unless they carry one already (`tracing.with_context`).
        """
        try:
            fut = self.client.send(
                topic, value=value, key=key, headers=tracing.with_context(_headers(headers) if headers else None)
            )
        except (kerrors.KafkaError, TypeError, ValueError) as e:
            PRODUCE_ERRORS.labels(topic).inc()
            refused = self._refused(topic, key, value, e)
            if refused is not None:
                raise refused from e
            raise errors.Unavailable(
                f"Kafka at {self.kafka.bootstrap!r} did not take a record for {topic!r}: {e}"
            ) from e
        ok, failed = self._metrics.get(topic) or self._metrics.setdefault(
            topic, (PRODUCED.labels(topic).inc, PRODUCE_ERRORS.labels(topic).inc)
        )
        ok()  # counted at send: a success callback per record cost ~15% of produce throughput
        fut.add_errback(lambda _e: failed())
        return fut

    def send(self, topic: str, key: str | None, message: Message, headers: Headers = None) -> Any:
        """Queue `message` for `topic` under `key`; returns a future of its RecordMetadata."""
        return self.send_raw(topic, key.encode() if key is not None else None, message.SerializeToString(), headers)

    def send_sync(
        self, topic: str, key: str | None, message: Message, headers: Headers = None, timeout_s: float | None = None
    ) -> Any:
        """Send and wait for the broker's ack; errors.Unavailable when it does not come in time,
        RecordRefused when Kafka refused this record for good."""
        key_b = key.encode() if key is not None else None
        value = message.SerializeToString()
        fut = self.send_raw(topic, key_b, value, headers)
        try:
            return self.wait_ack(fut, topic, timeout_s)
        except errors.Unavailable as e:
            if produce_refusal(e.__cause__) is None:
                raise
            return self.deliver_alone(topic, key_b, value, headers, timeout_s)  # refused for good, or collateral?

    def wait_ack(self, fut: Any, topic: str, timeout_s: float | None = None) -> Any:
        """Wait for the broker's ack of a future from `send`; errors.Unavailable when it does not come.

        timeout_s None: the Kafka request timeout. A refusal comes back as errors.Unavailable too
        (its __cause__ the Kafka error): a failure caused by another record that poisoned the
        client looks the same, so only `deliver_alone` can say the record itself is refused.
        """
        timeout_s = timeout_s if timeout_s is not None else self.kafka.request_timeout_ms / 1000
        try:
            return fut.get(timeout=timeout_s)
        except kerrors.KafkaError as e:
            raise errors.Unavailable(
                f"Kafka at {self.kafka.bootstrap!r} did not acknowledge a record for {topic!r} within {timeout_s:g}s: {e}"
            ) from e

    def deliver_alone(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one record on a client of its own and wait for the ack: its RecordMetadata.

        For a record whose future failed with a permanent-looking error: alone, a refusal is
        this record's own (RecordRefused), not the collateral of another record that poisoned
        the shared client; and a record that was only collateral is delivered here.
        errors.Unavailable when Kafka is away.
        """
        timeout_s = timeout_s if timeout_s is not None else self.kafka.request_timeout_ms / 1000
        with self._alone_lock:
            if self._alone is not None and _is_fatal(self._alone):
                _retire(self._alone)
                self._alone = None
            if self._alone is None:
                self._alone = self._connect(linger_ms=0)
            client = self._alone
            try:
                fut = client.send(topic, value=value, key=key, headers=_headers(headers) if headers else None)
                return fut.get(timeout=timeout_s)
            except (kerrors.KafkaError, TypeError, ValueError) as e:
                refused = self._refused(topic, key, value, e)
                if refused is not None:
                    raise refused from e
                raise errors.Unavailable(
                    f"Kafka at {self.kafka.bootstrap!r} did not acknowledge a record for {topic!r} "
                    f"within {timeout_s:g}s: {e}"
                ) from e

    def dead_letter(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        refused: RecordRefused,
        source: str,
        timeout_s: float | None = None,
    ) -> bool:
        """Write a record Kafka refused for good to the dead-letter topic; True once acknowledged.

        The `DeadLetter` carries the original topic, key and value (partition and offset -1: it
        never was on a topic), the error and, as `consumer_group`, the `source` that produced it.
        A value too large for the dead-letter topic is cut (header flywheel-value-truncated: the
        original size; the error text says so too); if even a short copy is refused, the record
        is counted in flywheel_bus_records_dropped_total, logged with its key, and False comes
        back. errors.Unavailable when Kafka is away (the caller keeps the record and retries).
        """
        key = key or b""
        short_key = key[:_DLQ_SHORT_KEY_BYTES]
        first = min(len(value), _DLQ_MAX_VALUE, max(0, self.max_request_size - len(key) - _DLQ_ROOM))
        tries = [(key, first), (short_key, min(len(value), _DLQ_SHORT_VALUE))]
        last: RecordRefused = refused
        for attempt, (k, keep) in enumerate(tries, start=1):
            if attempt > 1 and keep == len(value) and k == key:
                break  # a shorter copy would be the same record
            cut = keep < len(value)
            error = str(refused)[: _DLQ_MAX_ERROR_CHARS if attempt == 1 else _DLQ_SHORT_ERROR_CHARS]
            if cut:
                error += f" (value truncated from {len(value)} to {keep} bytes)"
            now = Timestamp()
            now.GetCurrentTime()
            dl = events_pb2.DeadLetter(
                topic=topic,
                partition=-1,
                offset=-1,
                key=k,
                value=value[:keep],
                consumer_group=source,
                error_type=type(refused.cause).__name__,
                error=error,
                attempts=1,
                failed_at=now,
            )
            meta = {
                H_ERROR: error,
                H_ERROR_TYPE: type(refused.cause).__name__,
                H_REASON: refused.refusal,
                H_TOPIC: topic,
                H_PARTITION: "-1",
                H_OFFSET: "-1",
                H_GROUP: source,
                H_ATTEMPTS: "1",
            }
            if cut:
                meta[H_TRUNCATED] = str(len(value))
            extra = [] if cut or attempt > 1 else _headers(headers)
            try:
                self.deliver_alone(self.dlq_topic, k or None, dl.SerializeToString(), extra + _headers(meta), timeout_s)
            except RecordRefused as e:
                last = e
                continue
            RECORDS_DEAD_LETTERED.labels(topic, refused.refusal).inc()
            log.error(
                "dead-lettered a record for %s (key %r, %d bytes) to %s: %s",
                topic,
                key[:200],
                len(value),
                self.dlq_topic,
                refused,
            )
            return True
        RECORDS_DROPPED.labels(topic, refused.refusal).inc()
        log.error(
            "dropped a record for %s (key %r, %d bytes): %s; the dead-letter topic %s refused it too: %s",
            topic,
            key[:200],
            len(value),
            refused,
            self.dlq_topic,
            last,
        )
        return False

    def flush(self, timeout_s: float | None = None) -> None:
        if self._producer is not None:
            try:
                self._producer.flush(timeout=timeout_s)
            except kerrors.KafkaError as e:
                raise errors.Unavailable(f"Kafka at {self.kafka.bootstrap!r}: flush did not finish: {e}") from e

    def close(self, timeout_s: float = 10.0) -> None:
        with self._alone_lock:
            if self._alone is not None:
                with contextlib.suppress(Exception):
                    self._alone.close(timeout=timeout_s)
                self._alone = None
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
            self._producer = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Record:
    """One consumed record, value decoded to its protobuf message."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: Message
    headers: dict[str, bytes]
    timestamp_ms: int

    @property
    def timestamp_s(self) -> float | None:
        """When the record was produced, in epoch seconds; None for a record without a timestamp
        (-1: the old message format)."""
        return self.timestamp_ms / 1000 if self.timestamp_ms > 0 else None


Handler = Callable[[Record], None]


class Consumer:
    """A consumer-group loop: decode, handle, commit after the handler returned; retry, then dead-letter.

    `decoders` maps each topic to its protobuf class. Offsets are committed after each poll
    batch and at least every `commit_interval_s` (so slow handlers still make progress),
    always only up to records whose handler returned or that went to the DLQ (acked).
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        group: str,
        decoders: Mapping[str, type[Message]],
        handler: Handler,
        *,
        dlq_topic: str | None = "flywheel.dlq",
        producer: Producer | None = None,
        auto_offset_reset: str = "earliest",
        max_poll_records: int = 200,
        poll_timeout_ms: int = 200,
        commit_interval_s: float = 1.0,
        **overrides: Any,
    ) -> None:
        self.kafka, self.group, self.decoders, self.handler = kafka, group, dict(decoders), handler
        self.dlq_topic = dlq_topic
        self._own_producer = producer is None and dlq_topic is not None
        self.producer = producer or (Producer(kafka) if dlq_topic else None)
        self.poll_timeout_ms, self.commit_interval_s = poll_timeout_ms, commit_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._positions: dict[TopicPartition, int] = {}  # next offset to process, for the lag gauge
        self._last_commit = time.monotonic()
        self._lag_at = 0.0
        self.error: BaseException | None = None
        self._metrics: dict[str, tuple[Callable[[float], None], Callable[[], None]]] = {}
        opts = {
            **kafka.client_options(),
            "group_id": group,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "max_poll_records": max_poll_records,
            "max_poll_interval_ms": kafka.max_poll_interval_ms,
            "session_timeout_ms": kafka.session_timeout_ms,
            "heartbeat_interval_ms": max(100, kafka.session_timeout_ms // 3),
            **overrides,
        }
        try:
            self.consumer = KafkaConsumer(**opts)
            # Know every topic's partitions before joining: a leader that assigns without them
            # (a just-created topic) forces a second rebalance, and kafka-python 3.0.12 was seen
            # to stall in that rejoin.
            for topic in self.decoders:
                self.consumer.partitions_for_topic(topic)
        except kerrors.KafkaError as e:
            raise errors.Unavailable(f"cannot reach Kafka at {kafka.bootstrap!r} for group {group!r}: {e}") from e
        self.consumer.subscribe(list(self.decoders))

    # --- one record (public for subclasses such as reward's BatchConsumer) -------------
    @property
    def stopping(self) -> bool:
        """stop() was called: finish the record in hand and start no other."""
        return self._stop.is_set()

    def decode(self, msg: Any) -> Record:
        """The Record of a kafka-python message, its value parsed by the topic's decoder."""
        if msg.value is None:
            raise ValueError("record has no value (a tombstone); expected a protobuf message")
        value = self.decoders[msg.topic].FromString(msg.value)
        key = msg.key.decode("utf-8", "replace") if msg.key is not None else None
        headers = dict(msg.headers) if msg.headers else {}
        return Record(msg.topic, msg.partition, msg.offset, key, value, headers, msg.timestamp)

    def process(self, msg: Any) -> None:
        """Handle one record with retries; dead-letter it if every try fails."""
        try:
            record = self.decode(msg)
        except Exception as e:  # undecodable: no retry can help
            FAILED.labels(msg.topic, self.group).inc()
            self._dead_letter(msg, e, attempts=0)
            return
        delay = self.kafka.retry_backoff_s
        for attempt in range(1, self.kafka.max_attempts + 1):
            start = time.perf_counter()
            try:
                self.handler(record)
                seconds, consumed = self._metrics.get(msg.topic) or self._metrics.setdefault(
                    msg.topic,
                    (HANDLER_SECONDS.labels(msg.topic, self.group).observe, CONSUMED.labels(msg.topic, self.group).inc),
                )
                seconds(time.perf_counter() - start)
                consumed()
                return
            except Exception as e:
                FAILED.labels(msg.topic, self.group).inc()
                log.warning(
                    "%s[%d]@%d try %d/%d: %r", msg.topic, msg.partition, msg.offset, attempt, self.kafka.max_attempts, e
                )
                if attempt == self.kafka.max_attempts:
                    self._dead_letter(msg, e, attempts=attempt)
                    return
                if self._stop.wait(delay):  # shutting down: leave it uncommitted for the next owner
                    raise _Stopping() from None
                delay = min(delay * 2, 5.0)

    def _dead_letter(self, msg: Any, exc: BaseException, attempts: int) -> None:
        if self.producer is None or self.dlq_topic is None or msg.topic == self.dlq_topic:
            log.error(
                "dropping %s[%d]@%d after %d tries (no DLQ): %r", msg.topic, msg.partition, msg.offset, attempts, exc
            )
            return
        now = Timestamp()
        now.GetCurrentTime()
        dl = events_pb2.DeadLetter(
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=msg.key or b"",
            value=msg.value or b"",
            consumer_group=self.group,
            error_type=type(exc).__name__,
            error=str(exc)[:4000],
            attempts=attempts,
            failed_at=now,
        )
        headers = list(msg.headers or []) + _headers(
            {
                H_ERROR: str(exc)[:4000],
                H_ERROR_TYPE: type(exc).__name__,
                H_TOPIC: msg.topic,
                H_PARTITION: str(msg.partition),
                H_OFFSET: str(msg.offset),
                H_GROUP: self.group,
                H_ATTEMPTS: str(attempts),
            }
        )
        # Wait for the ack: the offset is committed next, so the DLQ copy must be durable first.
        try:
            self.producer.wait_ack(
                self.producer.send_raw(self.dlq_topic, msg.key, dl.SerializeToString(), headers), self.dlq_topic
            )
        except errors.FlywheelError as e:
            if produce_refusal(e) is None and produce_refusal(e.__cause__) is None:
                raise  # Kafka away: the record stays uncommitted and comes back
            if not self._dead_letter_cut(msg, dl, headers):
                return
        DEAD_LETTERED.labels(msg.topic, self.group).inc()
        log.error("dead-lettered %s[%d]@%d after %d tries: %r", msg.topic, msg.partition, msg.offset, attempts, exc)

    def _dead_letter_cut(self, msg: Any, dl: Any, headers: list[tuple[str, bytes]]) -> bool:
        """The DLQ refused a DeadLetter (or its send failed with a permanent-looking error): send
        it alone, then a short copy (value cut, says so); True once one is acknowledged, False
        when even that is refused (counted in flywheel_bus_records_dropped_total, logged with
        the key). errors.Unavailable when Kafka is away."""
        assert self.producer is not None and self.dlq_topic is not None
        try:
            self.producer.deliver_alone(self.dlq_topic, msg.key, dl.SerializeToString(), headers)
            return True
        except RecordRefused as e:
            refused = e
        value, key = msg.value or b"", (msg.key or b"")[:_DLQ_SHORT_KEY_BYTES]
        keep = min(len(value), _DLQ_SHORT_VALUE)
        dl.key, dl.value = key, value[:keep]
        dl.error = dl.error[:_DLQ_SHORT_ERROR_CHARS] + f" (value truncated from {len(value)} to {keep} bytes)"
        short = {
            H_ERROR: dl.error,
            H_ERROR_TYPE: dl.error_type,
            H_TOPIC: msg.topic,
            H_PARTITION: str(msg.partition),
            H_OFFSET: str(msg.offset),
            H_GROUP: self.group,
            H_TRUNCATED: str(len(value)),
        }
        try:
            self.producer.deliver_alone(self.dlq_topic, key or None, dl.SerializeToString(), short)
            return True
        except RecordRefused as e:
            refused = e
        RECORDS_DROPPED.labels(msg.topic, refused.refusal).inc()
        log.error(
            "dropped %s[%d]@%d (key %r): the dead-letter topic %s refused even a short copy: %s",
            msg.topic,
            msg.partition,
            msg.offset,
            (msg.key or b"")[:200],
            self.dlq_topic,
            refused,
        )
        return False

    # --- the loop -------------------------------------------------------------------
    def commit(self) -> None:
        """Commit every record processed so far (their effects are durable)."""
        if not self._pending:
            return
        owned = self.consumer.assignment()  # never commit for a partition another member may own now
        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self._pending.items() if tp in owned}
        self._last_commit = time.monotonic()
        try:
            if offsets:
                self.consumer.commit(offsets)
        except COMMIT_REBALANCED as e:
            LOOP_ERRORS.labels(self.group, "commit_rebalanced").inc()
            log.warning("commit refused (group %s is rebalancing); records will be redelivered: %r", self.group, e)
        except kerrors.KafkaError as e:  # timed out, coordinator away: the next commit carries these offsets
            LOOP_ERRORS.labels(self.group, "commit_retry").inc()
            log.warning("commit failed (group %s), kept for the next one: %r", self.group, e)
            return
        self._pending.clear()

    def mark_done(self, msg: Any) -> None:
        """`msg` was handled (or dead-lettered): the next commit includes it."""
        tp = TopicPartition(msg.topic, msg.partition)
        self._pending[tp] = self._positions[tp] = msg.offset + 1

    def update_lag(self, force: bool = False) -> None:
        """Refresh the lag gauge (at most once a second unless forced)."""
        if not force and time.monotonic() - self._lag_at < 1.0:
            return
        self._lag_at = time.monotonic()
        for tp in self.consumer.assignment():
            with contextlib.suppress(kerrors.KafkaError):
                high = self.consumer.highwater(tp)
                pos = self._positions.get(tp)
                if high is not None and pos is not None:
                    LAG.labels(tp.topic, str(tp.partition), self.group).set(max(0, high - pos))

    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Poll one batch, process it, commit; return how many records were processed."""
        batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms if timeout_ms is None else timeout_ms)
        done = 0
        for msgs in batches.values():
            for msg in msgs:
                if self._stop.is_set():
                    break
                self.process(msg)
                self.mark_done(msg)
                done += 1
                if time.monotonic() - self._last_commit >= self.commit_interval_s:
                    self.commit()
        self.commit()
        self.update_lag()
        return done

    def run(self, max_records: int | None = None, timeout_s: float | None = None) -> int:
        """Process records until stop() (or `max_records`, or `timeout_s`); then commit and close."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        total, backoff = 0, self.kafka.retry_backoff_s
        try:
            while not self._stop.is_set():
                if max_records is not None and total >= max_records:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    total += self.poll_once()
                    backoff = self.kafka.retry_backoff_s
                except _Stopping:
                    break
                except kerrors.KafkaError as e:  # the client stays usable: poll again (a rebalance completes there)
                    LOOP_ERRORS.labels(self.group, "poll").inc()
                    log.warning("consumer group %s: %r; polling again in %.1fs", self.group, e, backoff)
                    self._stop.wait(backoff)
                    backoff = min(max(backoff, 0.1) * 2, 30.0)
        finally:
            with contextlib.suppress(Exception):
                self.update_lag(force=True)
            self.close()
        return total

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread (services call stop() on shutdown)."""

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # surfaced to the owner via .error
                self.error = e
                log.exception("consumer loop of group %s died", self.group)

        self._thread = threading.Thread(target=target, name=f"consumer-{self.group}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 15.0) -> None:
        """Graceful shutdown: finish the current record, commit, close."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.commit()
        with contextlib.suppress(Exception):
            self.consumer.close(autocommit=False)
        if self._own_producer and self.producer is not None:
            self.producer.close()


class _Stopping(Exception):
    """Raised inside the loop when stop() interrupts a retry backoff."""


class SeenIds:
    """A durable set of processed event ids (sqlite3), so a redelivered event leaves one effect.

    `apply_once(id, effect)` runs `effect(conn)` and records the id in one transaction: with
    effects kept in the same database the pair is atomic (exactly-once effect on top of
    at-least-once delivery). `add(id)` is the plain check-and-mark for external effects.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._lock = threading.Lock()

    def __contains__(self, event_id: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM seen WHERE id = ?", (event_id,)).fetchone() is not None

    def add(self, event_id: str) -> bool:
        """Mark `event_id` seen; True the first time, False for a duplicate."""
        return self.apply_once(event_id, lambda _conn: None)

    def apply_once(self, event_id: str, effect: Callable[[sqlite3.Connection], None]) -> bool:
        """Run `effect` unless `event_id` was applied before; True if it ran (and is now durable)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self.conn.execute("INSERT OR IGNORE INTO seen (id, at) VALUES (?, ?)", (event_id, time.time()))
                if cur.rowcount == 0:
                    self.conn.execute("ROLLBACK")
                    return False
                effect(self.conn)
                self.conn.execute("COMMIT")
                return True
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
