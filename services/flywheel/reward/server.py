"""gRPC `Reward` (a thin servicer) and the assembly of the reward service's parts.

RewardServicer only converts protobuf to (prompts, responses) and back; `RewardService.score`
checks the call against `ScoreConfig`'s limits (items per call, characters per text: more is
INVALID_ARGUMENT; calls at once: more is RESOURCE_EXHAUSTED) and hands it to the scorer, which
does the batching and the version bookkeeping off the event loop (`run_blocking`), one call at
a time. `RewardCallers` admits callers by the usual API keys and lets only the trainer's
service token (or the admin token) count in the normalization statistics GetInfo reports.

RewardService wires: the join consumer (interactions + feedback + preferences -> sqlite ->
flywheel.preferences, a poll at a time), the online trainer thread (-> model store -> flywheel.reward.updates),
and the scorer's update consumer (flywheel.reward.updates -> verify signature, uri and sha256 -> hot swap;
a refusal is counted by reason and the current version keeps scoring). Run one
trainer per deployment (`TrainConfig.enabled` on one replica): every replica scores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import Counter

from flywheel.core import bus, errors
from flywheel.core.auth import AuthConfig, Authenticator, bearer_token
from flywheel.core.config import KafkaConfig, TopicsConfig, load_bundle, section
from flywheel.core.modelstore import ModelStore, ModelStoreConfig
from flywheel.core.server import ServiceServer, run_blocking
from flywheel.reward.batch_consumer import BatchConsumer
from flywheel.reward.config import JoinConfig, RewardModelConfig, ScoreConfig, TrainConfig
from flywheel.reward.join import PreferenceJoin
from flywheel.reward.model import SWAPS, Scorer
from flywheel.reward.starter import ensure_starter
from flywheel.reward.store import PreferenceStore
from flywheel.reward.trainer import OnlineTrainer
from flywheel.v1 import events_pb2, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
UPDATES_REFUSED = Counter(
    "flywheel_reward_updates_refused",
    "Reward-model announcements refused while the scoring version went on, by reason: unsigned, unknown_key, "
    "bad_signature, outside_store, bad_uri, tampered (files), missing, unreadable, load_failed, invalid.",
    ["reason"],
)
SCORE_CALLS = Counter(
    "flywheel_reward_score_calls",
    "Score/ScoreBatch calls by whether their scores count in the normalization statistics "
    "(counted: the trainer's service token or the admin token; not_counted: any other caller).",
    ["stats"],
)


def check_items(items: list[Any], limits: ScoreConfig) -> tuple[list[str], list[str]]:
    """(prompts, responses) of ScoreRequest-like items, or InvalidArgument naming the item and the limit."""
    if not items:
        raise errors.InvalidArgument("ScoreBatch needs at least one item")
    if len(items) > limits.max_batch_items:
        raise errors.InvalidArgument(
            f"ScoreBatch has {len(items)} items; at most {limits.max_batch_items} per call "
            "(reward_score.max_batch_items): split it"
        )
    for i, it in enumerate(items):
        for name in ("prompt", "response"):
            text = getattr(it, name)
            if len(text) > limits.max_text_chars:
                raise errors.InvalidArgument(
                    f"item {i}: {name} has {len(text)} characters; at most {limits.max_text_chars} "
                    "(reward_score.max_text_chars): shorten it"
                )
            if not text.strip():
                raise errors.InvalidArgument(f"item {i}: {name} is empty; score a non-empty {name}")
    return [it.prompt for it in items], [it.response for it in items]


class RewardCallers:
    """Who may call the reward service, and whose scores count in the normalization statistics.

    Callers pass the usual API keys (auth.api_keys; an unknown key is refused when keys are set).
    Only the trainer's `auth.service_token` and the admin token make a call's scores count: the
    trainer normalizes its rewards with GetInfo's mean/std, so anyone else's traffic (however
    extreme its texts) is scored alike but must not move that scale.
    """

    def __init__(self, config: AuthConfig) -> None:
        self._auth = Authenticator(config)
        self._service = config.service_token.encode()
        if not self._service:
            log.warning(
                "FLYWHEEL_AUTH_SERVICE_TOKEN is not set: no Score call moves the normalization statistics, so "
                "GetInfo reports each reward version's held-out statistics. Set it (the same value on the trainer) "
                "to normalize with the trainer's own scores."
            )

    def counted(self, metadata: Any) -> bool:
        """Whether the caller's scores count in the statistics; Unauthenticated for a caller the keys refuse."""
        token = bearer_token(metadata)
        if token is not None and self._service and hmac.compare_digest(token.encode(), self._service):
            return True
        return self._auth.caller(metadata).is_admin


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, service: RewardService) -> None:
        self.service = service
        self.scorer = service.scorer

    def _counted(self, context: grpc.aio.ServicerContext) -> bool:
        counted = self.service.callers.counted(context.invocation_metadata())
        SCORE_CALLS.labels("counted" if counted else "not_counted").inc()
        return counted

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> Any:
        scores, version = await self.service.score([request], record_stats=self._counted(context))
        return reward_pb2.ScoreResponse(score=scores[0], reward_version=version)

    async def ScoreBatch(self, request: reward_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext) -> Any:
        scores, version = await self.service.score(list(request.items), record_stats=self._counted(context))
        return reward_pb2.ScoreBatchResponse(scores=scores, reward_version=version)

    async def GetInfo(self, request: reward_pb2.RewardInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        self.service.callers.counted(context.invocation_metadata())  # refuses a caller the API keys refuse
        if not self.scorer.ready:
            raise errors.Unavailable("the reward model is not loaded yet; retry shortly")
        m = self.scorer.metrics
        mean, std = self.scorer.stats()
        return reward_pb2.RewardInfo(
            model=self.service.config.model.name,
            reward_version=self.scorer.version or 0,
            heldout_accuracy=m.get("heldout_accuracy", -1.0),
            pairs_trained=int(m.get("pairs_trained", 0)),
            pairs_heldout=int(m.get("pairs_heldout", 0)),
            score_mean=mean,
            score_std=std,
            training_steps=int(m.get("training_steps", 0)),
            online_accuracy=m.get("online_accuracy", -1.0),
            online_pairs=int(m.get("online_pairs", 0)),
        )


@dataclasses.dataclass
class RewardServiceConfig:
    """Every concern of the reward service, each from its own YAML section."""

    join: JoinConfig = section(JoinConfig, "reward_join")
    model: RewardModelConfig = section(RewardModelConfig, "reward_model")
    train: TrainConfig = section(TrainConfig, "reward_train")
    score: ScoreConfig = section(ScoreConfig, "reward_score")
    kafka: KafkaConfig = section(KafkaConfig, "kafka")
    topics: TopicsConfig = section(TopicsConfig, "topics")
    store: ModelStoreConfig = section(ModelStoreConfig, "model_store")
    auth: AuthConfig = section(AuthConfig, "auth")

    @classmethod
    def from_env(cls, path: str | None = None) -> RewardServiceConfig:
        """Defaults < YAML sections (reward_join, reward_model, ...; kafka, topics, model_store, auth) < env."""
        return load_bundle(cls, path)


class RewardService:
    """The reward service's background parts; `start()` blocks until the scorer has a model."""

    def __init__(self, config: RewardServiceConfig) -> None:
        self.config = config
        self.store: ModelStore = config.store.store()
        self.scorer = Scorer(config.model.max_length, config.model.device, config.score.chunk_size)
        self.callers = RewardCallers(config.auth)
        self.dataset = PreferenceStore(Path(config.join.state_dir).expanduser() / "join.sqlite")
        self.producer = bus.Producer(config.kafka)
        self.join = PreferenceJoin(config.join, self.dataset, self._publish_pairs)
        self.trainer: OnlineTrainer | None = None
        self._consumers: list[bus.Consumer] = []
        self._stop = threading.Event()
        self._expiry: threading.Thread | None = None
        self.scoring = 0  # Score/ScoreBatch calls taken and not finished (at most score.max_concurrent)
        self._one_at_a_time: asyncio.Lock | None = None  # made on the event loop that scores

    async def score(self, items: list[Any], record_stats: bool = False) -> tuple[list[float], int]:
        """Scores of ScoreRequest-like `items` and the one version that produced them; `record_stats`:
        they count in the normalization statistics (the trainer's calls, see RewardCallers).

        InvalidArgument past the per-call limits; ResourceExhausted (with a retry hint) when
        `score.max_concurrent` calls are already taken. Taken calls run one at a time, waiting
        their turn on the event loop rather than in a thread. A call whose caller goes away
        while it waits leaves at once; one already on the model keeps its place until it ends,
        so the count is the work really in progress.
        """
        limits = self.config.score
        prompts, responses = check_items(items, limits)
        if self.scoring >= limits.max_concurrent:
            raise errors.ResourceExhausted(
                f"the reward service is scoring its limit of {limits.max_concurrent} calls at once "
                f"(reward_score.max_concurrent): retry in {errors.retry_after_header(limits.retry_after_s)} s, "
                "or on another replica",
                retry_after_s=limits.retry_after_s,
                reason="overloaded",
            )
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        turn, on_model = self._one_at_a_time, asyncio.Event()

        async def in_turn() -> tuple[list[float], int]:
            async with turn:
                on_model.set()
                return await run_blocking(self.scorer.score, prompts, responses, record_stats=record_stats)

        self.scoring += 1
        task = asyncio.ensure_future(in_turn())
        task.add_done_callback(self._scored)
        try:
            return await asyncio.shield(task)  # the caller going away does not stop the model mid-batch
        except asyncio.CancelledError:
            if not on_model.is_set():
                task.cancel()
            raise

    def _scored(self, task: asyncio.Future[Any]) -> None:
        self.scoring -= 1
        if not task.cancelled():
            task.exception()  # retrieved: a caller that went away does not leave it unobserved

    # Kafka effects that must be acknowledged before the caller goes on.
    def _publish_pairs(self, pairs: list[events_pb2.PreferencePair]) -> None:
        """Send every pair, then one flush (no linger) and every ack checked, all within publish_timeout_s."""
        topic, timeout_s = self.config.topics.preferences, self.config.join.publish_timeout_s
        deadline = time.monotonic() + timeout_s
        futures = [self.producer.send(topic, p.pair_id, p) for p in pairs]
        self.producer.flush(timeout_s)
        places = []
        for p, f in zip(pairs, futures, strict=True):
            md = self.producer.wait_ack(f, topic, max(0.0, deadline - time.monotonic()))
            places.append((p.pair_id, md.partition, md.offset))
        self.dataset.set_pair_offsets(places)  # each version's manifest names the offsets it trained on

    def _join_batch(self, records: list[bus.Record]) -> None:
        """The join, then the places of the pairs read from flywheel.preferences (others' pairs)."""
        self.join.handle_batch(records)
        self.dataset.set_pair_offsets(
            [
                (r.value.pair_id, r.partition, r.offset)
                for r in records
                if isinstance(r.value, events_pb2.PreferencePair)
            ]
        )

    def _join_one(self, record: bus.Record) -> None:
        self._join_batch([record])

    def _announce(self, update: events_pb2.ModelUpdate) -> None:
        self.producer.send_sync(self.config.topics.reward_updates, update.model, update)

    def _on_update(self, record: bus.Record) -> None:
        """Latest announcement wins; an older one only when it says rollback (history replays at start)."""
        u: events_pb2.ModelUpdate = record.value
        cur = self.scorer.version
        if u.model != self.config.model.name or u.version == cur:
            return
        if cur is not None and u.version < cur and u.reason != "rollback":
            return
        try:  # signature, uri and files; Kafka and the store are not trusted (flywheel.core.signing)
            path = self.store.from_update(u)
        except (errors.FlywheelError, OSError) as e:
            self._refuse_update(u, e)
            return
        try:
            self.scorer.load(path, u.version, dict(u.metrics))
        except errors.FailedPrecondition:  # the scorer logged it and counted the swap
            UPDATES_REFUSED.labels("load_failed").inc()

    def _refuse_update(self, u: events_pb2.ModelUpdate, e: Exception) -> None:
        if isinstance(e, errors.FlywheelError):
            why, reason = e.message, e.reason or ("missing" if isinstance(e, errors.NotFound) else "invalid")
        else:
            why, reason = f"checkpoint unreadable: {type(e).__name__}: {e}", "unreadable"
        self.scorer.last_error = f"version {u.version}: {why}; still scoring with version {self.scorer.version}"
        SWAPS.labels("refused").inc()  # counted once the error is readable
        UPDATES_REFUSED.labels(reason).inc()
        log.error("reward update %s v%d refused (%s): %s", u.model, u.version, reason, self.scorer.last_error)

    def _wait_for_kafka(self) -> None:
        """Kafka may start after this service, or be away when it restarts: wait for it (logged
        once, backing off to 30 s) instead of exiting into a crash loop."""
        delay, said = 1.0, False
        while True:
            try:
                bus.ensure_topics(self.config.kafka, self.config.topics)
                if said:
                    log.info("Kafka is reachable: starting")
                return
            except errors.Unavailable as e:
                if not said:
                    log.warning("Kafka unreachable at start (%s): waiting for it", e.message)
                    said = True
                if self._stop.wait(delay):
                    raise
                delay = min(2 * delay, 30.0)

    def start(self) -> None:
        cfg = self.config
        self._wait_for_kafka()
        ensure_starter(self.store, cfg.model)
        latest = self.store.latest(cfg.model.name)
        assert latest is not None
        self.scorer.load(self.store.verify(latest.model, latest.version), latest.version, latest.metrics)
        updates = bus.Consumer(
            cfg.kafka,
            f"{cfg.join.group}-scorer-{uuid.uuid4().hex[:8]}",
            {cfg.topics.reward_updates: events_pb2.ModelUpdate},
            self._on_update,
            dlq_topic=None,
            auto_offset_reset="earliest",
        )
        join = BatchConsumer(  # a poll at a time: one transaction, one flush of its pairs, then the commit
            cfg.kafka,
            cfg.join.group,
            {
                cfg.topics.interactions: events_pb2.Interaction,
                cfg.topics.feedback: events_pb2.FeedbackEvent,
                cfg.topics.preferences: events_pb2.PreferencePair,
            },
            self._join_one,
            batch_handler=self._join_batch,
            batch_size=cfg.join.batch_records,
            dlq_topic=cfg.topics.dlq,
            producer=self.producer,
        )
        self._consumers = [updates, join]
        for c in self._consumers:
            c.start()
        self.join.flush()  # pairs stored but not acknowledged before a crash
        if cfg.train.enabled:
            self.trainer = OnlineTrainer(
                cfg.train, cfg.model, self.store, self.dataset, self._announce, cfg.topics.preferences
            )
            self.trainer.start()
        self._expiry = threading.Thread(target=self._expire_loop, name="reward-join-expiry", daemon=True)
        self._expiry.start()

    def _expire_loop(self) -> None:
        period = min(5.0, max(0.2, self.config.join.orphan_wait_s / 4))
        while not self._stop.wait(period):
            try:
                self.join.expire()
            except Exception:
                log.exception("orphan expiry failed; retrying")

    async def setup(self, server: ServiceServer) -> None:
        """ServiceServer.run_forever's setup: start everything, then report SERVING."""
        await run_blocking(self.start)
        for c in self._consumers:
            server.watch(f"the consumer loop of group {c.group}", functools.partial(_error_of, c))
        if self.trainer is not None:
            server.watch("the reward trainer", functools.partial(_error_of, self.trainer))
        await server.set_serving(True)

    def stop(self) -> None:
        self._stop.set()
        if self.trainer is not None:
            self.trainer.stop()
        for c in self._consumers:
            c.stop()
        self.producer.close()
        self.dataset.close()


def _error_of(part: bus.Consumer | OnlineTrainer) -> BaseException | None:
    """What stopped a background part (for ServiceServer.watch), or None while it runs."""
    return part.error


def build_server(service: RewardService, server_config: Any) -> ServiceServer:
    server = ServiceServer(server_config, name="reward")
    server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, RewardServicer(service))
    return server
