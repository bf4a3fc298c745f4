"""A durable, ordered, bounded on-disk spool in front of Kafka (docs/ARCHITECTURE.md, 'Feedback is never lost').

When Kafka is unreachable a service appends records here; `append` returns only once the
record is on disk (sqlite3, WAL, synchronous=FULL), so the caller may acknowledge it. A drain
thread sends the oldest records, in order, and deletes each only after Kafka acknowledged it
(acks=all); while Kafka stays away it backs off exponentially. The spool survives a restart
of the process: whatever was not acknowledged is still on disk and drains on the next start.
A record Kafka refuses for good (too large, invalid: `bus.produce_refusal`) does not hold the
spool's head: `ProducerSender` dead-letters it and the records behind it flow on.

Delivery is at-least-once: a crash between Kafka's ack and the delete sends a record twice,
so consumers dedup by the event's own id (as everywhere on the bus). `ProducerSender` keeps
that rare: it never puts a second copy of a record into the producer while the first one is
still in flight, and it can adopt the in-flight future of a direct send that timed out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from flywheel.core import bus, errors

log = logging.getLogger(__name__)

SPOOL_DEPTH = Gauge("flywheel_spool_depth", "Records waiting in a durable spool for Kafka.", ["spool"])
SPOOL_BYTES = Gauge("flywheel_spool_bytes", "Bytes of record values waiting in a durable spool.", ["spool"])
SPOOL_DRAINED = Counter(
    "flywheel_spool_drained",
    "Records that left a spool: acknowledged by Kafka, or refused by it for good and then dead-lettered "
    "(flywheel_bus_records_dead_lettered_total) or dropped (flywheel_bus_records_dropped_total).",
    ["spool"],
)
SPOOL_SEND_FAILURES = Counter("flywheel_spool_send_failures", "Drain attempts that Kafka did not ack.", ["spool"])

Headers = list[tuple[str, bytes]]


@dataclasses.dataclass(frozen=True)
class SpoolRecord:
    """One spooled record; `seq` orders the spool (strictly increasing, never reused)."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


# Sends records in the given order; returns how many from the start Kafka acknowledged.
Sender = Callable[[Sequence[SpoolRecord]], int]


def _encode_headers(headers: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None) -> bytes:
    out = bytearray()
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for k, v in items:
        kb, vb = k.encode(), v.encode() if isinstance(v, str) else bytes(v)
        out += len(kb).to_bytes(4, "big") + kb + len(vb).to_bytes(4, "big") + vb
    return bytes(out)


def _decode_headers(raw: bytes) -> Headers:
    out, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i : i + 4], "big")
        k = raw[i + 4 : i + 4 + n].decode()
        i += 4 + n
        m = int.from_bytes(raw[i : i + 4], "big")
        out.append((k, raw[i + 4 : i + 4 + m]))
        i += 4 + m
    return out


class DurableSpool:
    """Append-only, ordered, bounded records on disk, drained to Kafka by a background thread."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str = "spool",
        max_records: int = 1_000_000,
        max_bytes: int = 1 << 30,
        drain_batch: int = 500,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("DurableSpool needs max_records >= 1 and max_bytes >= 1")
        self.path, self.name = Path(path), name
        self.max_records, self.max_bytes = max_records, max_bytes
        self.drain_batch, self.backoff_s, self.max_backoff_s = drain_batch, backoff_s, max_backoff_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # an append is on disk when it returns
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "key BLOB, value BLOB NOT NULL, headers BLOB NOT NULL)"
        )
        self._lock = threading.Lock()
        count, size = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM spool").fetchone()
        self._count, self._bytes = int(count), int(size)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: Sender | None = None
        self.last_error: BaseException | None = None
        self._publish_depth()
        if self._count:
            log.warning("spool %s: %d records left from a previous run will drain to Kafka", name, self._count)

    # ----------------------------------------------------------------- writing
    def append(self, topic: str, key: str | bytes | None, value: bytes, headers: Any = None) -> int:
        """Store one record durably; its seq. errors.ResourceExhausted when the spool is full."""
        return self.append_many([(topic, key, value, headers)])[0]

    def append_many(
        self,
        records: Sequence[tuple[str, str | bytes | None, bytes, Any]],
        before_visible: Callable[[list[int]], None] | None = None,
    ) -> list[int]:
        """Store records durably in one transaction (one fsync), in order; their seqs.

        `before_visible(seqs)` runs after the commit but before the drain thread can see the
        records (e.g. to hand ProducerSender.adopt the futures of sends that timed out).
        """
        rows = [(t, k.encode() if isinstance(k, str) else k, bytes(v), _encode_headers(h)) for t, k, v, h in records]
        size = sum(len(r[2]) for r in rows)
        with self._lock:
            if self._count + len(rows) > self.max_records or self._bytes + size > self.max_bytes:
                raise errors.ResourceExhausted(
                    f"the durable spool {self.name!r} is full ({self._count} records, {self._bytes} bytes; limits "
                    f"{self.max_records} records, {self.max_bytes} bytes) because Kafka has been unreachable for a "
                    "while: nothing was recorded, retry later",
                    retry_after_s=max(self.max_backoff_s, 5.0),
                )
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                seqs = [self._insert(row) for row in rows]
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._count += len(rows)
            self._bytes += size
            if before_visible is not None:
                before_visible(seqs)
        self._publish_depth()
        self._wake.set()
        return seqs

    def _insert(self, row: tuple[str, bytes | None, bytes, bytes]) -> int:
        seq = self._conn.execute("INSERT INTO spool (topic, key, value, headers) VALUES (?, ?, ?, ?)", row).lastrowid
        if seq is None:  # sqlite3 sets it after every INSERT of one row
            raise RuntimeError("sqlite3 did not report the rowid of a spool record")
        return seq

    # ----------------------------------------------------------------- reading
    def depth(self) -> int:
        """Records waiting (also exported as flywheel_spool_depth{spool})."""
        return self._count

    def size_bytes(self) -> int:
        return self._bytes

    def peek(self, limit: int | None = None) -> list[SpoolRecord]:
        """The oldest `limit` records (all when None), in order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, topic, key, value, headers FROM spool ORDER BY seq LIMIT ?", (limit or -1,)
            ).fetchall()
        return [SpoolRecord(s, t, k, v, _decode_headers(h)) for s, t, k, v, h in rows]

    def _delete_through(self, records: Sequence[SpoolRecord]) -> None:
        if not records:
            return
        size = sum(len(r.value) for r in records)
        with self._lock:
            self._conn.execute("DELETE FROM spool WHERE seq <= ?", (records[-1].seq,))
            self._count -= len(records)
            self._bytes -= size
        self._publish_depth()

    def _publish_depth(self) -> None:
        SPOOL_DEPTH.labels(self.name).set(self._count)
        SPOOL_BYTES.labels(self.name).set(self._bytes)

    # ----------------------------------------------------------------- draining
    def drain_once(self, sender: Sender | None = None) -> int:
        """Send the oldest batch in order; delete the acknowledged prefix; return how many went.

        Raises errors.Unavailable when the sender acknowledged none of a non-empty batch.
        """
        sender = sender or self._sender
        if sender is None:
            raise RuntimeError("drain_once() needs a sender (or start(sender) first)")
        batch = self.peek(self.drain_batch)
        if not batch:
            return 0
        try:
            acked = max(0, min(int(sender(batch)), len(batch)))
            error: BaseException | None = None
        except Exception as e:  # a sender that raises acknowledged nothing
            acked, error = 0, e
        self._delete_through(batch[:acked])
        SPOOL_DRAINED.labels(self.name).inc(acked)
        if acked < len(batch):
            SPOOL_SEND_FAILURES.labels(self.name).inc()
            self.last_error = error or errors.Unavailable(f"Kafka acknowledged {acked} of {len(batch)} records")
            if acked == 0:
                raise errors.Unavailable(f"spool {self.name!r}: Kafka did not take record {batch[0].seq}: {error}")
        return acked

    def start(self, sender: Sender) -> threading.Thread:
        """Start the drain thread: it empties the spool through `sender`, backing off on failure."""
        if self._thread is not None:
            raise RuntimeError("spool drain already started")
        self._sender = sender
        self._thread = threading.Thread(target=self._drain_loop, name=f"spool-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def _drain_loop(self) -> None:
        delay = self.backoff_s
        while not self._stop.is_set():
            if self._count == 0:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.drain_once()
                delay = self.backoff_s
            except Exception as e:
                log.warning(
                    "spool %s: %d records wait for Kafka (retry in %.1fs): %s", self.name, self._count, delay, e
                )
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.max_backoff_s)

    def wait_empty(self, timeout_s: float) -> bool:
        """Block until the drain thread emptied the spool (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self._count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._count == 0

    def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the drain thread (after trying to empty the spool for up to `drain_timeout_s`)."""
        if drain_timeout_s > 0 and self._thread is not None:
            self.wait_empty(drain_timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            self._conn.close()


class ProducerSender:
    """A spool Sender over a bus.Producer: pipelines a batch, waits for the acks in order.

    It remembers the future of every record it handed to the producer: while that future is
    still pending, a retry waits on it instead of queueing a second copy (kafka-python keeps
    retrying a record until delivery_timeout_ms). `adopt` does the same for a direct send that
    timed out and was spooled, so a slow ack is not turned into a duplicate.

    A record Kafka refuses for good (`bus.produce_refusal`: too large, invalid) never blocks
    the spool: once every record before it was acknowledged, it is sent once more on a client
    of its own (`Producer.deliver_alone`, so that a record failed only because another one
    poisoned the shared client is delivered, not dead-lettered), then written to the
    dead-letter topic with the reason (`Producer.dead_letter`; counted and logged with its key
    when even that topic refuses it) and counted as done, so that the spool deletes it and the
    records behind it flow on.
    """

    def __init__(self, producer: Any, timeout_s: float = 10.0, source: str = "spool") -> None:
        self.producer, self.timeout_s, self.source = producer, timeout_s, source
        self._inflight: dict[int, Any] = {}
        self._lock = threading.Lock()

    def adopt(self, seq: int, future: Any) -> None:
        """Wait on `future` (a kafka-python send future) instead of resending spool record `seq`."""
        if not future.is_done or future.succeeded():
            with self._lock:
                self._inflight[seq] = future

    def __call__(self, records: Sequence[SpoolRecord]) -> int:
        futures: list[tuple[int, Any]] = []
        refused: errors.FlywheelError | None = None  # the client refused records[len(futures)] outright
        for r in records:
            with self._lock:
                fut = self._inflight.get(r.seq)
            if fut is None or fut.failed():
                try:
                    fut = self.producer.send_raw(r.topic, r.key, r.value, r.headers)
                except errors.FlywheelError as e:
                    if bus.produce_refusal(e) is not None:
                        refused = e
                        break  # the records before it first, in order
                    if not futures:
                        raise
                    break  # send what was queued so far
                with self._lock:
                    self._inflight[r.seq] = fut
            futures.append((r.seq, fut))
        deadline = time.monotonic() + self.timeout_s
        acked, failure = 0, None
        for _seq, fut in futures:
            try:
                fut.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as e:
                failure = e
                break
            acked += 1
        with self._lock:
            for seq, _fut in futures[:acked]:
                self._inflight.pop(seq, None)
            for seq in [s for s, f in self._inflight.items() if f.failed()]:
                del self._inflight[seq]
        if failure is not None:
            if bus.produce_refusal(failure) is not None:  # this record's own refusal, or collateral: settle it
                return acked + self._settle(records[acked], failure)
            if acked == 0:
                seq = futures[0][0]
                raise errors.Unavailable(f"Kafka did not acknowledge spooled record {seq}: {failure}") from failure
            return acked
        if refused is not None:  # every record before the refused one was acknowledged
            acked += self._settle(records[acked], refused)
        return acked

    def _settle(self, r: SpoolRecord, error: BaseException) -> int:
        """The head record failed with a permanent-looking error: 1 once it is delivered alone or
        dead-lettered (or dropped, counted), so the spool deletes it; 0 when Kafka is away (it
        stays at the head, and the drain backs off)."""
        refused = error if isinstance(error, bus.RecordRefused) else None
        try:
            if refused is None:
                try:
                    self.producer.deliver_alone(r.topic, r.key, r.value, r.headers, self.timeout_s)
                    return 1  # it was collateral of another record: delivered now
                except bus.RecordRefused as e:
                    refused = e
            log.error("spool %s: Kafka refused record %d for good: %s", self.source, r.seq, refused)
            self.producer.dead_letter(r.topic, r.key, r.value, r.headers, refused, self.source, self.timeout_s)
        except errors.Unavailable as e:
            log.warning("spool %s: record %d waits (Kafka away while settling it): %s", self.source, r.seq, e)
            return 0
        return 1
