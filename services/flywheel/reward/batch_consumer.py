"""A Kafka consumer that hands a whole poll to its handler, so the join pays one sqlite
transaction and one flush of pairs per poll instead of one per record.

Kafka plumbing only (a bus.Consumer subclass); what the records do is join.py's business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flywheel.core import bus

log = logging.getLogger(__name__)


class BatchConsumer(bus.Consumer):
    """bus.Consumer that hands a poll's records to `batch_handler` together, then commits.

    A poll is handled in batches of at most `batch_size` records, in order; its offsets are
    committed once every batch of it returned (their effects are durable). If a batch raises,
    it is redone one record at a time through `handler`, with bus.Consumer's retries and
    dead-letter topic, so one bad record costs only itself. A record that cannot be decoded
    goes to the dead-letter topic at once, and the rest still batch.
    """

    def __init__(
        self, *args: Any, batch_handler: Callable[[list[bus.Record]], None], batch_size: int = 200, **kwargs: Any
    ) -> None:
        kwargs.setdefault("max_poll_records", max(200, batch_size))
        super().__init__(*args, **kwargs)
        self.batch_handler, self.batch_size = batch_handler, batch_size

    def poll_once(self, timeout_ms: int | None = None) -> int:
        """Poll, handle the poll's records a batch at a time, commit; return how many records were done."""
        batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms if timeout_ms is None else timeout_ms)
        msgs = [m for ms in batches.values() for m in ms]
        done = 0
        for at in range(0, len(msgs), self.batch_size):
            if self.stopping:
                break
            done += self._batch(msgs[at : at + self.batch_size])
        self.commit()
        self.update_lag()
        return done

    def _batch(self, msgs: list[Any]) -> int:
        records: dict[int, bus.Record] = {}
        for i, msg in enumerate(msgs):
            try:
                records[i] = self.decode(msg)
            except Exception:
                self.process(msg)  # undecodable: no retry can help; it goes to the dead-letter topic
        if self._handle_together(list(records.values())):
            for msg in msgs:
                self.mark_done(msg)
            return len(msgs)
        done = 0
        for i, msg in enumerate(msgs):  # one at a time, with bus.Consumer's retries and DLQ
            if self.stopping:
                break
            if i in records:
                self.process(msg)
            self.mark_done(msg)
            done += 1
        return done

    def _handle_together(self, records: list[bus.Record]) -> bool:
        if not records:
            return True
        start = time.perf_counter()
        try:
            self.batch_handler(records)
        except Exception as e:
            bus.FAILED.labels(records[0].topic, self.group).inc()
            log.warning("a batch of %d record(s) failed (%r); redoing it one record at a time", len(records), e)
            return False
        share = (time.perf_counter() - start) / len(records)
        for r in records:
            bus.HANDLER_SECONDS.labels(r.topic, self.group).observe(share)
        for topic in {r.topic for r in records}:
            bus.CONSUMED.labels(topic, self.group).inc(sum(r.topic == topic for r in records))
        return True
