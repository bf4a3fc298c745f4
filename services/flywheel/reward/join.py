"""The preference join: interactions + feedback -> PreferencePairs, in a durable sqlite store
(store.py).

What each kind of feedback becomes (docs/ARCHITECTURE.md, 'The preference join'):
- preference on a GeneratePair pair_id: one pair, chosen = the preferred side, weight 1. A TIE
  gives two pairs of weight 0.5, one each way (their BT losses pull the two scores together;
  source "tie", left out of the held-out accuracy).
- thumbs / rating on an interaction: a pointwise label (up = 1, down = 0; rating r on 1..S ->
  (r-1)/(S-1)) for the binary loss, and pairs against earlier labels of the same kind on other
  answers to the same prompt (up > down; higher rating > lower, margin from the gap), with a
  lower weight than a direct choice.
- demonstration: a pair (demonstration > the model's answer) and a supervised example row.

Feedback that arrives before its interaction(s) waits `orphan_wait_s`, then is dropped and
counted (`flywheel_reward_feedback_dropped{reason="orphaned"}`). Effects are keyed by primary
keys ((user_id, feedback_id), interaction_id, pair_id), so a redelivered record changes nothing;
pair ids are a hash of their sources (user and feedback id), so the same feedback always yields
the same pair ids, and one user's feedback_id never shadows another's.

One vote per user: a user's first feedback of a kind on an answer (a preference: on a pair)
counts; a later one under another feedback_id is stored as `repeated_vote` and makes no label and
no pair (`flywheel_reward_feedback_duplicates{reason="repeated_vote"}`). The feedback service
already answers such a repeat ALREADY_VOTED without publishing it (feedback/dedup.py); this
catches one that reaches the topic by another route, so the preference data counts it once.
Feedback without a user_id names no vote and is not held to it. "First" is by arrival here.

The join works a poll at a time (`handle_batch`, fed by `BatchConsumer` in batch_consumer.py):
every record of the poll is applied in one sqlite transaction (one fsync, not one per record);
the new pairs are stored with published=0, then all of them are sent to flywheel.preferences at
once (acks=all) and awaited together; they are marked published; only then does the consumer
commit the poll's offsets. A crash anywhere in between loses nothing: an uncommitted
transaction is redone from the redelivered records, and stored pairs not yet marked are sent
again by the next flush (also at start) as the same stored bytes under the same key, so a copy
on the topic is an identical one and the dataset holds each pair once.
The held-out split is a hash of the pair's source feedback ids (so both halves of a tie, and
every pair that uses a held-out label, land on the same side).

Tracing (core/tracing.py): each record is applied under a CONSUMER span that is a child of the
trace context in its headers (the answer's trace for an interaction, the feedback request's for
feedback, which a client sends with the answer's traceparent). A record that makes pairs gets a
`join pair` span below it, linked to the context of every interaction and feedback the pairs
came from that this process saw lately (an in-memory, bounded map: a restart forgets it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from flywheel.core import bus, tracing
from flywheel.reward.config import JoinConfig
from flywheel.reward.store import JoinWrites, PreferenceStore, StoredInteraction, subject_of
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)
K = events_pb2  # enum values: K.FEEDBACK_KIND_THUMBS, K.PREFERENCE_A, ...

PAIRS_BUILT = Counter("flywheel_reward_pairs_built", "Preference pairs built by the join.", ["source"])
FEEDBACK_JOINED = Counter("flywheel_reward_feedback_joined", "Feedback events joined.", ["kind"])
FEEDBACK_DUPLICATE = Counter(
    "flywheel_reward_feedback_duplicates",
    "Feedback ignored, by reason: redelivered (the same user_id and feedback_id again) or repeated_vote "
    "(the user's second feedback of a kind on the same answer or pair, under another feedback_id).",
    ["reason"],
)
FEEDBACK_DROPPED = Counter("flywheel_reward_feedback_dropped", "Feedback not joined, by reason.", ["reason"])
PENDING = Gauge("flywheel_reward_feedback_pending", "Feedback waiting for its interaction.")
JOIN_LAG = Histogram(
    "flywheel_reward_join_lag_seconds",
    "From feedback accepted (its created_at) to its pairs stored.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
# Live evaluation that users' feedback gives for free, per policy version.
THUMBS = Counter("flywheel_live_thumbs", "Thumbs by policy version.", ["policy_version", "thumb"])
RATINGS = Counter(
    "flywheel_live_ratings", "Ratings by policy version (normalized to 0..1 in the sum).", ["policy_version", "stat"]
)
OUTCOMES = Counter("flywheel_live_pairwise", "Pairwise outcomes by policy version.", ["policy_version", "outcome"])
THUMBS_UP_RATE = Gauge("flywheel_live_thumbs_up_rate", "Share of thumbs up.", ["policy_version"])
MEAN_RATING = Gauge("flywheel_live_mean_rating", "Mean rating normalized to 0..1.", ["policy_version"])
WIN_RATE = Gauge("flywheel_live_win_rate", "Pairwise win rate (ties count half).", ["policy_version"])

MAX_PARTNERS = 32  # pairs inferred per new thumbs/rating label, against the most recent others
TRACED_SOURCES = 10_000  # span contexts of recent interactions and feedback kept for the pair spans' links
SERVICE = "reward"  # the tracer: the reward service runs the join


def _h(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def pair_id_of(source: str, chosen_key: str, rejected_key: str, feedback_ids: Sequence[str]) -> str:
    """Deterministic pair id: the same feedback on the same answers always gives the same id.
    `feedback_ids`: `feedback_ref`s, so two users' feedback under one client-chosen id differ."""
    return "p-" + _h(source, chosen_key, rejected_key, *sorted(feedback_ids))[:32]


def feedback_ref(user_id: str, feedback_id: str) -> str:
    """One user's feedback id, unambiguously (length-prefixed); the bare id for feedback without a user."""
    return f"{len(user_id)}:{user_id}:{feedback_id}" if user_id else feedback_id


def is_heldout(key: str, percent: int) -> bool:
    return int(_h("split", key)[:8], 16) % 100 < percent


class PreferenceJoin:
    """Applies interactions and feedback to the store and publishes the pairs they make.

    `publish(pairs)` must return only once Kafka acknowledged every pair (or raise); None keeps
    pairs local (tests, or a store without a broker).
    """

    def __init__(
        self,
        config: JoinConfig,
        store: PreferenceStore,
        publish: Callable[[list[events_pb2.PreferencePair]], None] | None = None,
    ) -> None:
        self.config, self.store, self.publish = config, store, publish
        self._live: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._flushing = threading.Lock()  # one flush at a time: two would both send the same rows
        self._sources: OrderedDict[str, trace.SpanContext] = OrderedDict()  # event id -> its record's context
        PENDING.set(store.pending_count())

    # ------------------------------------------------------------------ entry points
    def handle_batch(self, records: Sequence[bus.Record]) -> None:
        """BatchConsumer handler: when it returns, every record's effect is durable and its pairs acknowledged.

        One transaction for the whole poll, then one flush (all pairs sent, then all awaited).
        An exception rolls the whole poll back; the consumer then redoes it record by record.
        """
        with self.store.transaction() as tx:
            for r in records:
                self._traced_apply(tx, r)
        PENDING.set(self.store.pending_count())
        self.flush()

    def handle(self, record: bus.Record) -> None:
        """bus.Consumer handler (one record): the effect is durable and the pairs acknowledged when it returns."""
        self.handle_batch([record])

    def _traced_apply(self, tx: JoinWrites, r: bus.Record) -> None:
        """`_apply` under a span that continues the record's trace (see the module doc)."""
        context = tracing.context_of(r.headers)
        with tracing.span(
            SERVICE,
            f"join {r.topic}",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.destination.name": r.topic, "messaging.kafka.offset": r.offset},
        ) as span:
            if not span.is_recording():
                self._apply(tx, r.value)
                return
            self._remember(r.value, trace.get_current_span(context).get_span_context())
            pairs = self._apply(tx, r.value)
            if pairs:
                links = self._links(pairs)
                with tracing.span(SERVICE, "join pair", links=links) as pair_span:
                    pair_span.set_attribute("flywheel.pair_ids", [p.pair_id for p in pairs])

    def _remember(self, msg: object, context: trace.SpanContext) -> None:
        if not context.is_valid:
            return
        if isinstance(msg, events_pb2.Interaction):
            ids = [msg.interaction_id]
        elif isinstance(msg, events_pb2.FeedbackEvent):
            ids = [msg.feedback_id]
        else:
            return
        for i in ids:
            self._sources[i] = context
            self._sources.move_to_end(i)
        while len(self._sources) > TRACED_SOURCES:
            self._sources.popitem(last=False)

    def _links(self, pairs: list[events_pb2.PreferencePair]) -> list[trace.Link]:
        """Links to the records the pairs came from: both interactions and the feedback."""
        seen: dict[str, trace.SpanContext] = {}
        for p in pairs:
            for i in (p.chosen_interaction_id, p.rejected_interaction_id, *p.source_feedback_ids):
                ctx = self._sources.get(i)
                if ctx is not None:
                    seen[i] = ctx
        return [trace.Link(ctx, {"flywheel.source_id": i}) for i, ctx in seen.items()]

    def _apply(self, tx: JoinWrites, msg: object) -> list[events_pb2.PreferencePair]:
        if isinstance(msg, events_pb2.Interaction):
            return self._interaction(tx, msg)
        if isinstance(msg, events_pb2.FeedbackEvent):
            return self._feedback(tx, msg)
        if isinstance(msg, events_pb2.PreferencePair):
            self._pair(tx, msg)
        return []

    def on_interaction(self, it: events_pb2.Interaction) -> list[events_pb2.PreferencePair]:
        """Store an interaction; join the feedback that was waiting for it."""
        with self.store.transaction() as tx:
            pairs = self._interaction(tx, it)
        PENDING.set(self.store.pending_count())
        return pairs

    def on_feedback(self, fb: events_pb2.FeedbackEvent) -> list[events_pb2.PreferencePair]:
        """Store a feedback event once (by user_id and feedback_id) and join it if its interactions
        are here, unless it repeats its user's vote (see the module doc)."""
        with self.store.transaction() as tx:
            pairs = self._feedback(tx, fb)
        PENDING.set(self.store.pending_count())
        return pairs

    def on_pair(self, pair: events_pb2.PreferencePair) -> None:
        """A pair from flywheel.preferences (ours come back and are ignored; others join the dataset)."""
        with self.store.transaction() as tx:
            self._pair(tx, pair)

    def _interaction(self, tx: JoinWrites, it: events_pb2.Interaction) -> list[events_pb2.PreferencePair]:
        if not it.interaction_id:
            FEEDBACK_DROPPED.labels("invalid_interaction").inc()
            return []
        if not tx.insert_interaction(it):
            return []
        pairs = []
        for fb in tx.pending_feedback_for(it.interaction_id, it.pair_id):
            pairs += self._join(tx, fb)
        return pairs

    def _feedback(self, tx: JoinWrites, fb: events_pb2.FeedbackEvent) -> list[events_pb2.PreferencePair]:
        if not fb.feedback_id:
            FEEDBACK_DROPPED.labels("invalid").inc()
            log.warning("feedback without feedback_id dropped: %s", fb)
            return []
        if not tx.insert_feedback(fb):
            FEEDBACK_DUPLICATE.labels("redelivered").inc()
            return []
        if not tx.claim_vote(fb):  # first wins: this user already gave this kind of feedback on it
            tx.set_feedback_status(fb, "repeated_vote")
            FEEDBACK_DUPLICATE.labels("repeated_vote").inc()
            log.info("feedback %s ignored: user %r already voted on %s", fb.feedback_id, fb.user_id, subject_of(fb))
            return []
        return self._join(tx, fb)

    def _pair(self, tx: JoinWrites, pair: events_pb2.PreferencePair) -> None:
        if not pair.pair_id or not pair.chosen or not pair.rejected:
            return
        key = ",".join(sorted(pair.source_feedback_ids)) or pair.pair_id
        self._insert_pair(tx, pair, published=True, split_keys=[key])

    def expire(self, now: float | None = None) -> int:
        """Drop feedback that waited longer than `orphan_wait_s` for its interaction."""
        cutoff = (now if now is not None else time.time()) - self.config.orphan_wait_s
        with self.store.transaction() as tx:
            n = tx.expire_pending(cutoff)
        if n:
            FEEDBACK_DROPPED.labels("orphaned").inc(n)
            log.warning(
                "dropped %d feedback event(s) whose interaction never arrived within %.0fs",
                n,
                self.config.orphan_wait_s,
            )
            PENDING.set(self.store.pending_count())
        return n

    def flush(self) -> int:
        """Publish every stored pair Kafka has not acknowledged yet (in one call); mark them published.

        The stored bytes are what is sent, so a pair sent again after a crash is an identical copy.
        """
        if self.publish is None:
            return 0
        with self._flushing:
            rows = self.store.unpublished_pairs()
            if not rows:
                return 0
            self.publish([pair for _, pair in rows])
            with self.store.transaction() as tx:
                tx.mark_published([seq for seq, _ in rows])
            return len(rows)

    # ------------------------------------------------------------------ the join
    def _join(self, tx: JoinWrites, fb: events_pb2.FeedbackEvent) -> list[events_pb2.PreferencePair]:
        """Make fb's pairs if its interactions are here; otherwise leave it pending."""
        kind = fb.kind
        if kind == K.FEEDBACK_KIND_PREFERENCE:
            if not fb.pair_id or fb.preference not in (K.PREFERENCE_A, K.PREFERENCE_B, K.PREFERENCE_TIE):
                # An open enum: a forged record may carry any number; only A, B and TIE mean something.
                return self._invalid(tx, fb, "a preference needs pair_id and A, B or TIE")
            sides = tx.pair_sides(fb.pair_id)
            if "A" not in sides or "B" not in sides:
                return []
            pairs = self._preference_pairs(fb, sides["A"], sides["B"])
        elif kind in (K.FEEDBACK_KIND_THUMBS, K.FEEDBACK_KIND_RATING, K.FEEDBACK_KIND_DEMONSTRATION):
            if not fb.interaction_id:
                return self._invalid(tx, fb, "thumbs, rating and demonstration need interaction_id")
            it = tx.interaction(fb.interaction_id)
            if it is None:
                return []
            if kind == K.FEEDBACK_KIND_DEMONSTRATION:
                pairs = self._demonstration(tx, fb, it)
            else:
                pointwise = self._pointwise(tx, fb, it)
                if pointwise is None:
                    return self._invalid(tx, fb, "thumbs must be +1/-1 and a rating 1..rating_scale (scale >= 2)")
                pairs = pointwise
        else:
            return self._invalid(tx, fb, f"unknown feedback kind {kind}")
        split_keys = {p.pair_id: list(p.source_feedback_ids) for p in pairs}
        stored = [p for p in pairs if self._insert_pair(tx, p, False, split_keys[p.pair_id])]
        tx.set_feedback_status(fb, "joined")
        FEEDBACK_JOINED.labels(K.FeedbackKind.Name(kind)).inc()
        if fb.HasField("created_at"):
            JOIN_LAG.observe(max(0.0, time.time() - fb.created_at.ToNanoseconds() / 1e9))
        return stored

    def _invalid(self, tx: JoinWrites, fb: events_pb2.FeedbackEvent, why: str) -> list[events_pb2.PreferencePair]:
        tx.set_feedback_status(fb, "invalid")
        FEEDBACK_DROPPED.labels("invalid").inc()
        log.warning("feedback %s dropped: %s", fb.feedback_id, why)
        return []

    def _make(
        self,
        sources: list[tuple[str, str]],
        source: str,
        prompt: str,
        chosen: tuple[str, str],
        rejected: tuple[str, str],
        weight: float,
        margin: float = 0.0,
    ) -> events_pb2.PreferencePair:
        """sources: (user_id, feedback_id) of each feedback the pair comes from; chosen/rejected:
        (interaction_id, text). The pair's id hashes the users too; source_feedback_ids are the ids."""
        refs = [feedback_ref(user, fid) for user, fid in sources]
        fb_ids = [fid for _, fid in sources]
        p = events_pb2.PreferencePair(
            pair_id=pair_id_of(source, chosen[0] or chosen[1], rejected[0] or rejected[1], refs),
            prompt=prompt,
            chosen=chosen[1],
            rejected=rejected[1],
            weight=weight,
            margin=margin,
            chosen_interaction_id=chosen[0],
            rejected_interaction_id=rejected[0],
            source_feedback_ids=sorted(fb_ids),
            source=source,
        )
        p.created_at.GetCurrentTime()
        return p

    def _preference_pairs(
        self, fb: events_pb2.FeedbackEvent, a: StoredInteraction, b: StoredInteraction
    ) -> list[events_pb2.PreferencePair]:
        ia, prompt, ra, va = a.interaction_id, a.prompt, a.response, a.policy_version
        ib, rb, vb = b.interaction_id, b.response, b.policy_version
        ids = [(fb.user_id, fb.feedback_id)]
        if fb.preference == K.PREFERENCE_TIE:
            self._outcome(va, "tie")
            self._outcome(vb, "tie")
            return [
                self._make(ids, "tie", prompt, (ia, ra), (ib, rb), 0.5),
                self._make(ids, "tie", prompt, (ib, rb), (ia, ra), 0.5),
            ]
        win, lose = (a, b) if fb.preference == K.PREFERENCE_A else (b, a)
        self._outcome(win.policy_version, "win")
        self._outcome(lose.policy_version, "loss")
        return [
            self._make(
                ids, "preference", prompt, (win.interaction_id, win.response), (lose.interaction_id, lose.response), 1.0
            )
        ]

    def _pointwise(
        self, tx: JoinWrites, fb: events_pb2.FeedbackEvent, it: StoredInteraction
    ) -> list[events_pb2.PreferencePair] | None:
        iid, prompt, response, version = it.interaction_id, it.prompt, it.response, it.policy_version
        if fb.kind == K.FEEDBACK_KIND_THUMBS:
            if fb.value not in (1, -1):
                return None
            label, kind, weight = (1.0 if fb.value > 0 else 0.0), "thumbs", self.config.thumbs_pair_weight
            THUMBS.labels(str(version), "up" if fb.value > 0 else "down").inc()
            self._live_update(str(version), "thumbs", label)
        else:
            if fb.rating_scale < 2 or not 1 <= fb.value <= fb.rating_scale:
                return None
            label, kind, weight = (fb.value - 1) / (fb.rating_scale - 1), "rating", self.config.rating_pair_weight
            RATINGS.labels(str(version), "count").inc()
            RATINGS.labels(str(version), "sum").inc(label)
            self._live_update(str(version), "rating", label)
        split = "heldout" if is_heldout(fb.feedback_id, self.config.heldout_percent) else "train"
        partners = tx.label_partners(prompt, kind, iid, response, label, MAX_PARTNERS)
        tx.insert_label(fb, it, kind, label, split)
        pairs = []
        for other in partners:
            mine, theirs = (iid, response), (other.interaction_id, other.response)
            chosen, rejected = (mine, theirs) if label > other.label else (theirs, mine)
            margin = self.config.rating_margin * abs(label - other.label) if kind == "rating" else 0.0
            pairs.append(
                self._make(
                    [(fb.user_id, fb.feedback_id), (other.user_id, other.feedback_id)],
                    kind,
                    prompt,
                    chosen,
                    rejected,
                    weight,
                    margin,
                )
            )
        return pairs

    def _demonstration(
        self, tx: JoinWrites, fb: events_pb2.FeedbackEvent, it: StoredInteraction
    ) -> list[events_pb2.PreferencePair]:
        iid, prompt, response = it.interaction_id, it.prompt, it.response
        if not fb.demonstration.strip():
            return self._invalid(tx, fb, "a demonstration needs its text")
        tx.insert_demonstration(fb, it, fb.demonstration)
        if fb.demonstration == response:
            return []  # the user wrote the answer it already gave: nothing to prefer
        return [
            self._make(
                [(fb.user_id, fb.feedback_id)],
                "demonstration",
                prompt,
                ("", fb.demonstration),
                (iid, response),
                self.config.demonstration_weight,
            )
        ]

    def _insert_pair(
        self, tx: JoinWrites, p: events_pb2.PreferencePair, published: bool, split_keys: list[str]
    ) -> bool:
        held = any(is_heldout(k, self.config.heldout_percent) for k in split_keys)
        stored = tx.insert_pair(p, "heldout" if held else "train", published)
        if stored:
            PAIRS_BUILT.labels(p.source or "external").inc()
        return stored

    # ------------------------------------------------------------------ live evaluation
    def _outcome(self, version: int, outcome: str) -> None:
        OUTCOMES.labels(str(version), outcome).inc()
        self._live_update(str(version), "pairwise", {"win": 1.0, "tie": 0.5, "loss": 0.0}[outcome])

    def _live_update(self, version: str, what: str, value: float) -> None:
        s = self._live[version]
        s[what + "_n"] += 1
        s[what + "_sum"] += value
        gauge = {"thumbs": THUMBS_UP_RATE, "rating": MEAN_RATING, "pairwise": WIN_RATE}[what]
        gauge.labels(version).set(s[what + "_sum"] / s[what + "_n"])

    def live_stats(self) -> dict[str, dict[str, float]]:
        live: dict[str, dict[str, float]] = json.loads(json.dumps(self._live))
        return live
