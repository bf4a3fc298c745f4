"""The feedback engine behind the gRPC and HTTP front ends: validate, authorize, rate-limit,
deduplicate, and hand each event durably to Kafka (or to the local spool when Kafka is away).

Per item, in this order:
  1. shape (`validation.validate`): INVALID_ARGUMENT saying what is wrong and what to send;
  2. the feedback token (HMAC over interaction_id or pair_id, policy version and user):
     PERMISSION_DENIED with the signer's reason. The user is the one in the caller's namespace
     (core.auth.Caller.scoped_user_id): with API keys configured, "<key name>:<user_id>", so a
     token the policy issued under one key never passes under another;
  3. that user's token bucket, only now, so that forged tokens cannot spend a victim's budget
     (and one key's callers never spend another key's users' budget);
  4. the claims (dedup.py), both per user: its feedback_id seen before -> DUPLICATE; the user
     already gave this kind of feedback on this answer (or a preference on this pair) under
     another id -> ALREADY_VOTED (first wins); nothing new is recorded for either;
  5. hand-off: Kafka with acks=all -> ACCEPTED; unreachable or too slow -> the durable spool
     -> SPOOLED; spool full -> RESOURCE_EXHAUSTED. Nothing is acknowledged before it is durable.
     An event Kafka refuses for good (`bus.produce_refusal`: larger than the topic accepts,
     invalid) is INVALID_ARGUMENT for that item alone (`bus.RecordRefused`), never ACCEPTED; the
     events around it flow on. (Only an event that went to the spool without a try, behind a
     backlog while Kafka was away, is SPOOLED and then dead-lettered by the spool's drain.)

Idempotency and crashes. An item's claims (its feedback_id and its vote) are recorded only
*after* its event is durable (acked by Kafka, or committed to the spool). The other order
(record, then send) would let a crash between the two lose an event while a retry is answered
DUPLICATE: an acknowledged loss. With our order a crash in that window can at worst put a second
copy of the event on the topic when the client retries; both copies carry the same user and
feedback_id and consumers apply each (user_id, feedback_id) once (docs/ARCHITECTURE.md,
'At-least-once, idempotent effects'), so nothing is double-counted.
The claims of a group are committed to sqlite (one transaction per group, WAL +
synchronous=NORMAL: it survives a process crash, without an fsync per request, which would cap
intake at a few hundred per second) before any caller of the group is answered, so a retry
after a crash of the service is answered DUPLICATE (and another vote ALREADY_VOTED). While an
id, or a vote, is in flight, a concurrent request with the same one gets ABORTED ("retry to
learn the outcome"). Inside one SubmitBatch a repeated id is DUPLICATE and a second vote
ALREADY_VOTED once the first item is acknowledged.

Group hand-off. Concurrent requests (Submit calls and SubmitBatch calls alike) are coalesced,
like Kafka's linger.ms: each validates its own items on the event loop, then joins the next
*flush*: one trip to the intake's own hand-off thread reserves every id of the flush in one
sqlite query and queues every new event on the producer, and one loop wake-up waits for all
of their acks. While one flush is on that thread, or while MAX_FLUSHES_IN_FLIGHT flushes
already wait for their acks, new arrivals gather for the next one, so the group grows with
the load and costs no extra latency when the service is idle. (Without that bound, a busy
service split 20,000 concurrent Submits into 11,000 flushes of one or two events, each
paying two thread trips, an ack wake-up and a sqlite commit: 40% more CPU per Submit.) Each
caller is still answered only for its own items, and only after Kafka acked them (acks=all)
or the spool has them on disk.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from flywheel.core import bus, errors, tracing
from flywheel.core.auth import AuthConfig, Caller
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.limits import LimitsConfig
from flywheel.core.metrics import LATENCY_BUCKETS
from flywheel.core.server import run_blocking
from flywheel.core.spool import DurableSpool, ProducerSender
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.dedup import Claim, FeedbackClaims, id_key, vote_key
from flywheel.feedback.ratelimit import RateLimiter
from flywheel.feedback.validation import build_event, reason, validate
from flywheel.v1 import feedback_pb2

log = logging.getLogger(__name__)

ACCEPTED = Counter("flywheel_feedback_accepted", "Feedback acknowledged, by kind and outcome.", ["kind", "status"])
REJECTED = Counter("flywheel_feedback_rejected", "Feedback refused, by reason (status code).", ["reason"])
HANDOFF_SECONDS = Histogram(
    "flywheel_feedback_handoff_seconds", "Time to make a batch durable (Kafka ack or spool).", buckets=LATENCY_BUCKETS
)

ACCEPTED_S, SPOOLED_S, DUPLICATE_S, ALREADY_VOTED_S = (
    feedback_pb2.SUBMIT_STATUS_ACCEPTED,
    feedback_pb2.SUBMIT_STATUS_SPOOLED,
    feedback_pb2.SUBMIT_STATUS_DUPLICATE,
    feedback_pb2.SUBMIT_STATUS_ALREADY_VOTED,
)
STATUS_LABELS = {
    ACCEPTED_S: "accepted",
    SPOOLED_S: "spooled",
    DUPLICATE_S: "duplicate",
    ALREADY_VOTED_S: "already_voted",
}
H_EVENT_ID = "flywheel-event-id"
# The intake's producer (acks=all and idempotence stay, from bus.Producer). Each flush already
# groups concurrent requests, so a long linger would only add latency to every acknowledgement.
LINGER_MS, BATCH_BYTES = 2, 256 << 10
# Flushes waiting for their acks at once. More would not make Kafka faster (the producer
# pipelines anyway) but would split the load into groups of one or two requests, each paying
# the thread trips, the ack wake-up and a sqlite commit of its own.
MAX_FLUSHES_IN_FLIGHT = 2
# gzip (zlib, in C) shrinks a batch of similar events several times before kafka-python runs
# its CRC32C over it: 20% less CPU per SubmitBatch event when that CRC was pure Python (before
# the crc32c package was a dependency; not re-measured since), none more per Submit, and less
# for the broker's disk and every consumer. Apache Kafka and Tansu both take gzip batches.
COMPRESSION = "gzip"
# Events of one flush whose futures failed with a permanent-looking error that are sent once
# more alone to tell their own refusal from collateral (each costs a round trip); the rest spool.
MAX_SETTLE_ALONE = 16


class InFlight(errors.FlywheelError):
    """The same feedback_id (or another of the same user's vote) is being submitted right now."""

    code, http_status, error_type = grpc.StatusCode.ABORTED, 409, "conflict"


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}  # (id(counter), labels) -> the child's inc


def _inc(counter: Counter, labels: tuple[str, ...], n: int = 1) -> None:
    """counter.labels(*labels).inc(n), with the child cached (labels() costs microseconds)."""
    inc = _CHILDREN.get((id(counter), labels))
    if inc is None:
        inc = _CHILDREN.setdefault((id(counter), labels), counter.labels(*labels).inc)
    inc(n)


def _count(counter: Counter, label_sets: Sequence[tuple[str, ...]]) -> None:
    """Increment `counter` once per distinct label set."""
    if not label_sets:
        return
    if len(label_sets) == 1:
        _inc(counter, label_sets[0])
        return
    for labels, n in collections.Counter(label_sets).items():
        _inc(counter, labels, n)


def _timestamp() -> Timestamp:
    """Now as a Timestamp (Timestamp.GetCurrentTime goes through datetime: 4x slower)."""
    ns = time.time_ns()
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


# ---------------------------------------------------------------------------- the engine


@dataclasses.dataclass
class _Item:
    index: int
    feedback_id: str
    kind: str
    key: str
    value: bytes
    claim: Claim  # (id_key, vote_key): per user, see dedup.py
    trace: list[tuple[str, bytes]]  # the request's trace context (core/tracing.py), as record headers

    @property
    def headers(self) -> list[tuple[str, str | bytes]]:
        return [(H_EVENT_ID, self.feedback_id), *self.trace]


class FeedbackIntake:
    """Validates, authorizes, deduplicates and durably hands off feedback. Async API for front ends."""

    def __init__(
        self,
        config: FeedbackConfig,
        kafka: KafkaConfig,
        topics: TopicsConfig,
        auth: AuthConfig,
        producer: bus.Producer | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.config, self.kafka, self.topics = config, kafka, topics
        self.limits = limits or LimitsConfig()  # bounds shared with the policy (user_id)
        self.signer = auth.signer()
        self.user_limits = RateLimiter(config.per_user_rate, config.per_user_burst, "user")
        self.key_limits = RateLimiter(config.per_key_rate, config.per_key_burst, "caller")
        timeout_ms = int(config.send_timeout_s * 1000)
        self.producer = producer or bus.Producer(
            kafka,
            max_block_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
            linger_ms=LINGER_MS,
            batch_size=BATCH_BYTES,
            metrics_enabled=False,  # kafka-python's own sensors (we export Prometheus): ~10% of its send thread
            compression_type=COMPRESSION,
            dlq_topic=topics.dlq,
        )
        self.spool: DurableSpool | None = None
        self.claims: FeedbackClaims | None = None
        self.sender = ProducerSender(self.producer, timeout_s=config.send_timeout_s, source="feedback")
        # Group hand-off (module doc): requests waiting for the next flush, the task running
        # flushes, the flushes waiting for acks, and the one thread that makes the trips.
        self._queue: list[tuple[list[_Item], asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._handoff_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="feedback-handoff")

    def open(self) -> None:
        """Open the stores and start draining the spool (blocking; call with run_blocking)."""
        cfg = self.config
        self.claims = FeedbackClaims(cfg.dedup_file(), cfg.dedup_retention_s)
        self.spool = DurableSpool(
            cfg.spool_file(), name="feedback", max_records=cfg.spool_max_records, max_bytes=cfg.spool_max_mb << 20
        )
        self.spool.start(self.sender)

    def ensure_topics(self) -> None:
        """Create the feedback topic if missing; best effort (blocking)."""
        try:
            bus.ensure_topics(self.kafka, self.topics, timeout_s=self.config.send_timeout_s)
        except errors.FlywheelError as e:
            log.warning("could not check topics (feedback will spool until Kafka answers): %s", e)

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Try to empty the spool, then close stores and the producer (blocking)."""
        if self.spool is not None:
            self.spool.close(drain_timeout_s)
        self._handoff_pool.shutdown(wait=True)
        if self.claims is not None:
            self.claims.close()
        try:
            self.producer.close(timeout_s=2.0)
        except Exception as e:  # noqa: BLE001 - closing a producer of a dead broker may complain
            log.warning("closing the Kafka producer: %s", e)

    # ----------------------------------------------------------------- front-end API
    async def submit(self, req: feedback_pb2.FeedbackRequest, caller: Caller) -> feedback_pb2.FeedbackResponse:
        """One submission; raises its FlywheelError. The same rules as a batch of one, with less bookkeeping."""
        self._check_open()
        try:
            self.key_limits.take(caller.who, 1)
            item = self._item(0, req, caller, _timestamp())
        except errors.FlywheelError as e:
            _inc(REJECTED, (reason(e),))
            raise
        (mark,) = await self._enqueue([item])
        result = self._answer(item, mark)
        if isinstance(result, errors.FlywheelError):
            _inc(REJECTED, (reason(result),))
            raise result
        _inc(ACCEPTED, (item.kind, STATUS_LABELS[result.status]))
        return result

    async def submit_batch(
        self, reqs: list[feedback_pb2.FeedbackRequest], caller: Caller
    ) -> list[feedback_pb2.FeedbackResponse | errors.FlywheelError]:
        """Per item, in order: its response, or the error that refused it."""
        self._check_open()
        n = len(reqs)
        if not 1 <= n <= self.config.max_batch:
            REJECTED.labels("invalid_argument").inc()
            raise errors.InvalidArgument(f"a batch holds 1..{self.config.max_batch} items, got {n}: split it")
        try:
            self.key_limits.take(caller.who, n)
        except errors.ResourceExhausted as e:
            REJECTED.labels(reason(e)).inc(n)
            raise
        results: list[Any] = [None] * n
        now = _timestamp()
        items: list[_Item] = []
        first: dict[str, int] = {}  # id or vote key (dedup.py) -> index of the first item of the batch with it
        follows: list[tuple[int, int, bool]] = []  # (index, index of its first, True: same id / False: same vote)
        for i, req in enumerate(reqs):
            try:
                item = self._item(i, req, caller, now)
            except errors.FlywheelError as e:
                results[i] = e
                continue
            except Exception as e:  # noqa: BLE001 - one item's unexpected failure must not fail its batch
                failed = errors.FlywheelError(f"checking item {i} failed: {type(e).__name__}: {e}")
                failed.__cause__ = e  # logged with its traceback under the reference the caller sees
                results[i] = failed
                continue
            ids, votes = item.claim
            if ids in first or votes in first:
                follows.append((i, first[ids], True) if ids in first else (i, first[votes], False))
                continue
            first[ids] = first[votes] = i
            items.append(item)
        counts: list[tuple[str, str]] = []  # (kind, status) per acknowledged item, for the metric
        if items:
            marks = await self._enqueue(items)
            for it, mark in zip(items, marks, strict=True):
                result = results[it.index] = self._answer(it, mark)
                if not isinstance(result, errors.FlywheelError):
                    counts.append((it.kind, STATUS_LABELS[result.status]))
        for i, j, same_id in follows:
            result = results[i] = _follow(reqs[i], j, results[j], same_id)
            if isinstance(result, feedback_pb2.FeedbackResponse):
                counts.append((reqs[i].WhichOneof("value") or "unknown", STATUS_LABELS[result.status]))
        _count(ACCEPTED, counts)
        _count(REJECTED, [(reason(r),) for r in results if isinstance(r, errors.FlywheelError)])
        return results

    def _check_open(self) -> None:
        self._stores()

    def _stores(self) -> tuple[DurableSpool, FeedbackClaims]:
        """The spool and the claims, once `open()` made them."""
        if self.spool is None or self.claims is None:
            raise errors.Unavailable("the feedback service is still starting: retry in a moment", retry_after_s=1)
        return self.spool, self.claims

    def _item(self, index: int, req: feedback_pb2.FeedbackRequest, caller: Caller, now: Timestamp) -> _Item:
        """Steps 1-3 of the module doc for one request: its serialized event and its claims, or the
        FlywheelError that refuses it. Everything keys on the user in the caller's namespace; a
        session's request may leave user_id out (it is the session's user) and may name no other."""
        if caller.session_user is not None:
            req.user_id = caller.end_user(req.user_id)
        kind = validate(req, self.config, self.limits)
        if not req.feedback_token:
            raise errors.PermissionDenied(
                "feedback_token is missing: pass the feedback_token that came with the answer "
                "(for a preference, the pair's token from GeneratePair)"
            )
        subject = req.pair_id if kind == "preference" else req.interaction_id
        token_kind = "pair" if kind == "preference" else "answer"
        user = caller.scoped_user_id(req.user_id)
        verified = self.signer.verify(req.feedback_token, subject, user, kind=token_kind)
        self.user_limits.take(user, 1)
        event = build_event(req, kind, verified, self.config.rating_scale, now)
        claim = (id_key(user, req.feedback_id), vote_key(user, kind, subject))
        return _Item(index, req.feedback_id, kind, subject, event.SerializeToString(), claim, tracing.record_headers())

    @staticmethod
    def _answer(it: _Item, mark: Any) -> feedback_pb2.FeedbackResponse | errors.FlywheelError:
        """What the caller hears for an item, from its flush's mark (see _finish_flush)."""
        if mark == "seen":
            return feedback_pb2.FeedbackResponse(feedback_id=it.feedback_id, status=DUPLICATE_S)
        if mark == "voted":
            return feedback_pb2.FeedbackResponse(feedback_id=it.feedback_id, status=ALREADY_VOTED_S)
        if mark == "busy":
            return InFlight(
                f"feedback_id {it.feedback_id!r} is being submitted by another request right now: "
                "retry in a moment to learn its outcome",
                retry_after_s=1,
            )
        if mark == "vote_busy":
            return InFlight(
                f"this user's {it.kind} on {it.key!r} is being submitted under another feedback_id right now: "
                "retry in a moment to learn which one counts",
                retry_after_s=1,
            )
        if isinstance(mark, errors.FlywheelError):
            return mark
        return feedback_pb2.FeedbackResponse(feedback_id=it.feedback_id, status=mark)

    def _enqueue(self, items: list[_Item]) -> asyncio.Future[list[Any]]:
        """Join the next flush (see the module doc); the future gives one mark per item."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((items, waiter))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        return waiter

    async def _flush_loop(self) -> None:
        """Run flushes while requests wait: one hand-off-thread trip each, acks awaited concurrently."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # let requests that arrived in this loop iteration join the first flush
        while self._queue:
            if len(self._finishing) >= MAX_FLUSHES_IN_FLIGHT:  # let the group grow meanwhile
                await asyncio.wait(self._finishing, return_when=asyncio.FIRST_COMPLETED)
                continue
            batch, self._queue = self._queue, []
            items = [it for its, _ in batch for it in its]
            started = time.perf_counter()
            spool, _ = self._stores()
            direct = spool.depth() == 0
            try:
                marks, sent = await loop.run_in_executor(self._handoff_pool, self._reserve_and_send, items, direct)
            except BaseException as e:  # the sends' reservations were released there
                for _, w in batch:
                    if not w.done():
                        w.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            task = loop.create_task(self._finish_flush(batch, items, marks, sent, started))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _finish_flush(
        self,
        batch: list[tuple[list[_Item], asyncio.Future[list[Any]]]],
        items: list[_Item],
        marks: list[Any],
        sent: list[Any] | None,
        started: float,
    ) -> None:
        """Wait for the flush's acks (or spool it), record the ids, and answer every request in it."""
        fresh = [n for n, m in enumerate(marks) if m == "new"]
        try:
            _, claims = self._stores()
            if fresh:
                try:
                    outcomes = await self._hand_off([items[n] for n in fresh], sent)
                except BaseException:
                    claims.release([items[n].claim for n in fresh])
                    raise
                HANDOFF_SECONDS.observe(time.perf_counter() - started)
                done: list[Claim] = []
                failed: list[Claim] = []
                for n, outcome in zip(fresh, outcomes, strict=True):
                    marks[n] = outcome
                    (failed if isinstance(outcome, errors.FlywheelError) else done).append(items[n].claim)
                claims.commit(done)  # only now: every one of these is durable (see the module doc)
                claims.release(failed)
                if done:  # on disk before anyone hears ACCEPTED, so a retry after a crash is DUPLICATE
                    await run_blocking(claims.flush)
        except BaseException as e:
            for _, w in batch:
                if not w.done():
                    w.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        at = 0
        for its, w in batch:
            if not w.done():  # a cancelled caller's events are durable all the same; a retry is DUPLICATE
                w.set_result(marks[at : at + len(its)])
            at += len(its)

    def _reserve_and_send(self, items: list[_Item], direct: bool) -> tuple[list[str], list[Any] | None]:
        """Blocking: reserve the claims; queue the new events on the producer when `direct`."""
        _, claims = self._stores()
        marks = claims.reserve([it.claim for it in items])
        if not direct:
            return marks, None
        fresh = [it for it, m in zip(items, marks, strict=True) if m == "new"]
        out: list[Any] = []
        topic = self.topics.feedback
        send = self.producer.send_raw
        try:
            for it in fresh:
                try:
                    out.append(send(topic, it.key.encode(), it.value, it.headers))
                except bus.RecordRefused as e:  # this event alone: the others go on
                    out.append(e)
                except errors.FlywheelError as e:  # no connection, or no metadata within send_timeout_s
                    out.extend([e] * (len(fresh) - len(out)))
                    break
        except BaseException:
            claims.release([it.claim for it in fresh])
            raise
        return marks, out

    def _settle(self, items: list[_Item]) -> list[int | errors.FlywheelError | None]:
        """Blocking: send each event whose future failed with a permanent-looking error once more,
        alone (`Producer.deliver_alone`): ACCEPTED when it was only collateral of another record,
        its RecordRefused when the refusal is its own, None (spool it) when Kafka is away or past
        MAX_SETTLE_ALONE events or send_timeout_s (the spool's drain settles those, in order)."""
        out: list[int | errors.FlywheelError | None] = []
        topic = self.topics.feedback
        deadline = time.monotonic() + self.config.send_timeout_s
        for n, it in enumerate(items):
            if n >= MAX_SETTLE_ALONE or time.monotonic() >= deadline:
                out.append(None)
                continue
            try:
                self.producer.deliver_alone(topic, it.key.encode(), it.value, it.headers, self.config.send_timeout_s)
                out.append(ACCEPTED_S)
            except bus.RecordRefused as e:
                out.append(e)
            except errors.FlywheelError:
                out.append(None)
        return out

    async def _hand_off(self, items: list[_Item], sent: list[Any] | None) -> list[int | errors.FlywheelError]:
        """ACCEPTED once Kafka acked (acks=all); otherwise SPOOLED once on disk; or the spool's error.

        `sent` holds the producer futures (None: the spool had a backlog, so Kafka was away
        lately: queue behind it, which keeps order and spares each caller a send timeout).
        """
        outcomes: list[Any] = [None] * len(items)
        pending: dict[int, Any] = {}  # index -> kafka future still in flight when we gave up waiting
        to_spool = list(range(len(items)))
        if sent is not None:
            futures = [f for f in sent if not isinstance(f, errors.FlywheelError)]
            if futures:
                await _all_done(futures, self.config.send_timeout_s)
            to_spool, doubtful = [], []
            for i, f in enumerate(sent):
                if isinstance(f, bus.RecordRefused):
                    outcomes[i] = f
                    continue
                if not isinstance(f, errors.FlywheelError) and f.succeeded():
                    outcomes[i] = ACCEPTED_S
                    continue
                if not isinstance(f, errors.FlywheelError) and f.failed() and bus.produce_refusal(f.exception):
                    doubtful.append(i)  # its own refusal, or collateral of another event's: settled alone
                    continue
                to_spool.append(i)
                if not isinstance(f, errors.FlywheelError) and not f.is_done:
                    pending[i] = f
            if doubtful:
                settled = await run_blocking(self._settle, [items[i] for i in doubtful])
                for i, outcome in zip(doubtful, settled, strict=True):
                    if outcome is None:
                        to_spool.append(i)
                    else:
                        outcomes[i] = outcome
                to_spool.sort()
        if to_spool:
            topic = self.topics.feedback
            records = [(topic, items[i].key, items[i].value, items[i].headers) for i in to_spool]

            def adopt(seqs: list[int]) -> None:  # before the drain thread can see the records
                for i, seq in zip(to_spool, seqs, strict=True):
                    if i in pending:
                        self.sender.adopt(seq, pending[i])

            try:
                spool, _ = self._stores()
                await run_blocking(spool.append_many, records, adopt)
                for i in to_spool:
                    outcomes[i] = SPOOLED_S
            except errors.FlywheelError as e:
                e.reason = "spool_full" if isinstance(e, errors.ResourceExhausted) else None
                for i in to_spool:
                    outcomes[i] = e
        return outcomes


def _follow(
    req: feedback_pb2.FeedbackRequest, first: int, prior: Any, same_id: bool
) -> feedback_pb2.FeedbackResponse | errors.FlywheelError:
    """The result of a batch item that repeats item `first` of its batch: its id (DUPLICATE) or the
    same user's vote under another id (ALREADY_VOTED), once that item was acknowledged. When it was
    refused, a repeated id gets the same refusal; a second vote may count after all: retry it."""
    if isinstance(prior, feedback_pb2.FeedbackResponse):
        status = DUPLICATE_S if same_id else ALREADY_VOTED_S
        return feedback_pb2.FeedbackResponse(feedback_id=req.feedback_id, status=status)
    if same_id:
        return prior
    return InFlight(
        f"item {first} of this batch is this user's {req.WhichOneof('value')} on the same answer and was refused, "
        "so this one was not tried: send it again to have it counted"
    )


async def _all_done(futures: list[Any], timeout_s: float) -> None:
    """Wait until every kafka-python future is done, or `timeout_s`; one loop wake-up in all."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    total, done = len(futures), itertools.count(1)  # next() on a count is atomic: no lock per record

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def one_done(_: Any) -> None:  # runs on the producer's I/O thread (or here, if already done)
        if next(done) == total:
            loop.call_soon_threadsafe(wake)

    for f in futures:
        both = getattr(f, "_add_cb_eb", None)  # kafka-python 3: both under one lock acquire
        if both is not None:
            both(one_done, one_done)
        else:
            f.add_callback(one_done)
            f.add_errback(one_done)
    try:
        await asyncio.wait_for(waiter, timeout_s)
    except TimeoutError:
        pass
