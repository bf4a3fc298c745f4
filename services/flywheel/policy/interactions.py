"""Every served answer goes to flywheel.interactions without delaying the answer.

`publish` only puts the Interaction on a bounded in-memory queue (no I/O, safe on the event
loop). One worker thread sends it to Kafka (acks=all) and waits for the ack off the serving
path; whatever Kafka does not acknowledge within `send_timeout_s` (or cannot take at all)
goes to a bounded DurableSpool, which drains in order when Kafka returns. While the spool
holds anything, new interactions go behind it, so they reach Kafka in the order served.

An interaction Kafka refuses for good (larger than the topic accepts, invalid) goes to the
dead-letter topic with the reason (`spool.ProducerSender`, `bus.Producer.dead_letter`) and the
interactions behind it flow on; it never holds the spool's head.

Bounded everywhere: a full in-memory queue or a full spool drops the interaction (counted in
flywheel_policy_interactions_total{outcome="dropped"}, logged) rather than slowing answers.
Consumers dedup by interaction_id (the record key), so a rare duplicate after a slow ack is
harmless.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from flywheel.core import errors, tracing
from flywheel.core.bus import Producer
from flywheel.core.config import KafkaConfig
from flywheel.core.spool import DurableSpool, ProducerSender
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

INTERACTIONS = Counter(
    "flywheel_policy_interactions",
    "Served answers handed to Kafka by outcome (sent: acknowledged, spooled: waiting on disk, dropped).",
    ["outcome"],
)


class InteractionPublisher:
    """Fire-and-forget publisher of Interaction events with a durable spool as fallback."""

    def __init__(
        self,
        kafka: KafkaConfig,
        topic: str,
        spool_path: str | Path,
        *,
        max_queue: int = 10_000,
        spool_max_records: int = 100_000,
        spool_max_bytes: int = 256 << 20,
        send_timeout_s: float = 5.0,
        batch: int = 256,
        dlq_topic: str = "flywheel.dlq",
        **producer_options: Any,
    ) -> None:
        self.topic, self.send_timeout_s, self.batch = topic, send_timeout_s, batch
        self.producer = Producer(kafka, dlq_topic=dlq_topic, **producer_options)
        self.spool = DurableSpool(
            spool_path, name="policy-interactions", max_records=spool_max_records, max_bytes=spool_max_bytes
        )
        self.sender = ProducerSender(self.producer, timeout_s=send_timeout_s, source="policy-interactions")
        # each with the trace context of the request that made it (record headers, core/tracing.py)
        self._queue: queue.Queue[tuple[events_pb2.Interaction, list[tuple[str, bytes]]]] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._ok, self._spooled, self._dropped = (INTERACTIONS.labels(o) for o in ("sent", "spooled", "dropped"))

    def start(self) -> None:
        if self._thread is None:
            self.spool.start(self.sender)
            self._thread = threading.Thread(target=self._run, name="policy-interactions", daemon=True)
            self._thread.start()

    def publish(self, interaction: events_pb2.Interaction) -> bool:
        """Queue one interaction (never blocks); False when the queue is full and it was dropped."""
        try:
            self._idle.clear()
            self._queue.put_nowait((interaction, tracing.record_headers()))
            return True
        except queue.Full:
            self._dropped.inc()
            log.error("interaction queue full (%d): dropped %s", self._queue.maxsize, interaction.interaction_id)
            return False

    def depth(self) -> int:
        """Interactions not yet acknowledged by Kafka: in memory plus on disk."""
        return self._queue.qsize() + self.spool.depth()

    def wait_idle(self, timeout_s: float) -> bool:
        """Until everything queued is either acknowledged or spooled (tests, shutdown)."""
        return self._idle.wait(timeout_s)

    # ------------------------------------------------------------------ worker thread
    def _take(self) -> list[tuple[events_pb2.Interaction, list[tuple[str, bytes]]]]:
        try:
            items = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(items) < self.batch:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            items = self._take()
            if not items:
                if self._queue.empty():
                    self._idle.set()
                continue
            try:
                self._send(items)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("publishing %d interactions failed", len(items))
                self._dropped.inc(len(items))
            if self._queue.empty():
                self._idle.set()

    def _send(self, items: list[tuple[events_pb2.Interaction, list[tuple[str, bytes]]]]) -> None:
        records = [(self.topic, it.interaction_id, it.SerializeToString(), headers) for it, headers in items]
        if self.spool.depth() > 0:  # Kafka was away: keep the order, go behind what waits
            self._to_spool(records, [None] * len(records))
            return
        futures: list[Any] = []
        try:
            for _, key, value, headers in records:
                futures.append(self.producer.send_raw(self.topic, key.encode(), value, headers))
        except errors.FlywheelError as e:  # unreachable, or refused for good: the spool's drain settles it
            log.warning("Kafka did not take an interaction (%s): spooling %d", e, len(records) - len(futures))
        deadline = time.monotonic() + self.send_timeout_s
        acked = 0
        for fut in futures:
            try:
                fut.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - not acknowledged in time: it goes to the spool
                break
            acked += 1
        self._ok.inc(acked)
        rest = records[acked:]
        if rest:
            pending = futures[acked:] + [None] * (len(rest) - len(futures[acked:]))
            self._to_spool(rest, pending)

    def _to_spool(self, records: list[tuple], futures: list[Any]) -> None:
        def adopt(seqs: list[int]) -> None:  # a slow ack still counts: do not send it twice
            for seq, fut in zip(seqs, futures, strict=True):
                if fut is not None:
                    self.sender.adopt(seq, fut)

        try:
            self.spool.append_many(records, before_visible=adopt)
            self._spooled.inc(len(records))
        except errors.ResourceExhausted as e:
            self._dropped.inc(len(records))
            log.error("dropped %d interactions: %s", len(records), e.message)

    def close(self, drain_timeout_s: float = 2.0) -> None:
        """Stop the worker (it spools what it still holds), give the spool a moment to drain."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.send_timeout_s + 5)
        self.spool.close(drain_timeout_s)
        try:
            self.producer.close(timeout_s=2.0)
        except Exception:  # noqa: BLE001 - closing a producer that never connected
            pass
