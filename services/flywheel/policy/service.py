"""The policy service's parts and what every answer gets on its way out.

Front ends (server.py: gRPC; http.py: TGI and OpenAI routes) turn the wire format into a
`GenerationRequest` and call `PolicyService.generate`, `.stream` or `.pair`. This module gives
each answer its interaction_id, feedback_token (TokenSigner over interaction_id, version and
user) and the one version that produced it, enforces the deadline (a cancelled engine call
frees its slot), and hands the Interaction to the publisher (fire-and-forget). It also owns
start-up: the starter policy (version 0) is built if missing (waited for where the model store is
read-only: the trainer builds and signs it), the version named by the last announcement on
flywheel.policy.updates is loaded, and the hot-swap consumer starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, ClassVar

from flywheel.core import bus, errors
from flywheel.core.auth import AuthConfig, Authenticator, Caller
from flywheel.core.config import KafkaConfig, TopicsConfig, load_bundle, require, section, setting
from flywheel.core.limits import LimitsConfig, check_user_id
from flywheel.core.modelstore import ModelStore, ModelStoreConfig
from flywheel.core.server import ServiceServer, run_blocking
from flywheel.policy.config import EngineConfig
from flywheel.policy.engine import Engine
from flywheel.policy.interactions import InteractionPublisher
from flywheel.policy.kvbatch import LoadedModel
from flywheel.policy.metrics import METRICS
from flywheel.policy.requests import SEED_MAX, GenerationRequest, Result, TokenEvent, validate_request
from flywheel.policy.starter import STEPS as STARTER_STEPS
from flywheel.policy.swap import Swapper
from flywheel.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

MAX_VERSION = 2**31 - 1  # model-store versions a GeneratePair may name


@dataclasses.dataclass
class PolicyConfig:
    """Service-level settings of the policy (the engine has its own EngineConfig)."""

    SECTION: ClassVar[str] = "policy"

    model_name: str = setting("policy", "Model name in the model store and in Interaction.model.")
    pair_candidate_version: int = setting(
        0,
        "GeneratePair answers side B with this model-store version (0: two samples of the serving version); "
        "a request's candidate_version overrides it. Any caller may name this version or the serving one; "
        "any other needs the admin token.",
        alias="FLYWHEEL_POLICY_PAIR_CANDIDATE",
    )
    request_timeout_s: float = setting(120.0, "Longest a request may take when the caller sets no deadline.")
    state_dir: str = setting(".flywheel/policy", "Directory of the interactions spool.")
    spool_max_records: int = setting(100_000, "Interactions the spool keeps while Kafka is away.")
    spool_max_mb: int = setting(256, "Spool capacity in MiB.")
    publish_queue: int = setting(10_000, "Interactions waiting in memory for the publisher thread.")
    send_timeout_s: float = setting(
        5.0,
        "Wait this long for Kafka's ack before an interaction goes to the spool.",
    )
    updates_group: str = setting(
        "flywheel-policy",
        "Prefix of the update consumer's group (one group per replica).",
        alias="FLYWHEEL_POLICY_GROUP",
    )
    starter_steps: int = setting(STARTER_STEPS, "Training steps of the starter policy when it must be built.")

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.pair_candidate_version >= 0, n, "pair_candidate_version", self.pair_candidate_version, "use >= 0")
        require(self.request_timeout_s > 0, n, "request_timeout_s", self.request_timeout_s, "use a positive time")
        for name in ("spool_max_records", "spool_max_mb", "publish_queue", "starter_steps"):
            require(getattr(self, name) >= 1, n, name, getattr(self, name), "use 1 or more")


@dataclasses.dataclass
class PolicyServiceConfig:
    """Every concern of the policy service, each from its own YAML section."""

    engine: EngineConfig = section(EngineConfig, "policy_engine")
    policy: PolicyConfig = section(PolicyConfig, "policy")
    kafka: KafkaConfig = section(KafkaConfig, "kafka")
    topics: TopicsConfig = section(TopicsConfig, "topics")
    store: ModelStoreConfig = section(ModelStoreConfig, "model_store")
    auth: AuthConfig = section(AuthConfig, "auth")
    limits: LimitsConfig = section(LimitsConfig, "limits")

    @classmethod
    def from_env(cls, path: str | None = None) -> PolicyServiceConfig:
        """Defaults < YAML sections (policy_engine, policy, kafka, topics, model_store, auth, limits) < env."""
        return load_bundle(cls, path)


@dataclasses.dataclass
class Served:
    """A finished answer with what the caller needs to give feedback on it."""

    result: Result
    interaction_id: str
    feedback_token: str
    user_id: str


@dataclasses.dataclass
class ServedPair:
    pair_id: str
    a: Served
    b: Served
    feedback_token: str  # over pair_id with the version of side A


def new_id() -> str:
    return uuid.uuid4().hex


def ensure_starter(store: ModelStore, steps: int = STARTER_STEPS, progress: bool = True) -> int:
    """Version 0 of "policy" in `store`, built (with a progress bar) and published if missing.

    Safe when processes race: an flock makes the second wait instead of building twice, and
    publish refuses a second version 0 anyway. Returns 0.
    """
    from flywheel.policy.starter import build_starter

    name = "policy"
    with contextlib.suppress(errors.NotFound):
        store.get(name, 0)
        return 0
    lock_dir = store.model_dir(name)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".starter.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with contextlib.suppress(errors.NotFound):
            store.get(name, 0)
            return 0
        log.info("building the starter policy (version 0) in %s", store.root)
        try:
            store.publish(
                name,
                lambda d: build_starter(d, steps=steps, progress=progress),
                parent=None,
                version=0,
                extra={"starter": True},
            )
        except errors.FailedPrecondition:  # published by a process that did not take the lock
            pass
    return 0


STARTER_WAIT_LOG_S = 60.0  # how often a replica waiting for the starter says so again


def starter_ready(store: ModelStore, steps: int, stopped: threading.Event, poll_s: float = 2.0) -> None:
    """Version 0 of "policy" is in `store`: built here when this process may write the store, else
    waited for (the chart mounts the store read-only on the policy; the trainer's init container
    builds and signs the starter with `flywheel models init`, and only it holds the signing key)."""
    if os.access(store.root, os.W_OK):
        ensure_starter(store, steps)
    else:
        wait_for_starter(store, stopped, poll_s)


def wait_for_starter(store: ModelStore, stopped: threading.Event, poll_s: float = 2.0, name: str = "policy") -> None:
    """Return once version 0 of `name` is in `store` (published whole: a rename); errors.Unavailable
    when `stopped` is set first. Says every STARTER_WAIT_LOG_S why it is waiting."""
    said = -math.inf
    while True:
        with contextlib.suppress(errors.NotFound):
            store.get(name, 0)
            return
        if time.monotonic() - said >= STARTER_WAIT_LOG_S:
            said = time.monotonic()
            log.warning(
                "waiting for the starter %s (version 0) in %s: this replica cannot write the model store (mounted "
                "read-only), so the trainer builds and signs it (`flywheel models init`, its init container)",
                name,
                store.root,
            )
        if stopped.wait(poll_s):
            raise errors.Unavailable(f"stopped while waiting for the starter {name} (version 0) in {store.root}")


class PolicyService:
    """Engine, model store, interactions publisher and hot-swap consumer of one replica."""

    def __init__(self, config: PolicyServiceConfig) -> None:
        self.config = config
        self.engine = Engine(config.engine, limits=config.limits)
        self.store = config.store.store()
        self.signer = config.auth.signer()
        self.auth = Authenticator(config.auth)
        p = config.policy
        self.interactions = InteractionPublisher(
            config.kafka,
            config.topics.interactions,
            Path(p.state_dir).expanduser() / "interactions.sqlite",
            max_queue=p.publish_queue,
            spool_max_records=p.spool_max_records,
            spool_max_bytes=p.spool_max_mb << 20,
            send_timeout_s=p.send_timeout_s,
            dlq_topic=config.topics.dlq,
        )
        self.swapper = Swapper(
            self.engine, self.store, config.kafka, config.topics.policy_updates, p.model_name, p.updates_group
        )
        self._candidate: Candidate | None = None
        self._variant: LoadedModel | None = None  # an adapter candidate on the serving weights
        self._candidate_lock: asyncio.Lock | None = None
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Blocking: topics, starter, the version to serve, then the consumers."""
        cfg = self.config
        self.engine.start()
        self.interactions.start()
        target, kafka_ok = None, True
        try:
            bus.ensure_topics(cfg.kafka, cfg.topics)
            target = self.swapper.initial_target()
        except errors.FlywheelError as e:
            kafka_ok = False
            log.warning("Kafka unreachable at start (%s): serving; updates are followed once it is back", e.message)
        if target is not None and self.swapper.apply(target):
            pass
        elif cfg.engine.model:
            self.engine.load_version(cfg.engine.model, 0)
        else:
            if cfg.policy.model_name == "policy":
                starter_ready(self.store, cfg.policy.starter_steps, self._stopped)
            name = cfg.policy.model_name
            latest = self.store.latest(name, promoted_only=True) or self.store.get(name, 0)
            self.swapper.load_from_store(latest.version)  # an adapter version on its base
        if kafka_ok:
            self.swapper.start()
        else:
            threading.Thread(target=self._follow_updates_later, name="policy-updates-retry", daemon=True).start()

    def _follow_updates_later(self) -> None:
        """Kafka was away at start: keep trying, then catch up with the last announcement."""
        while not self._stopped.wait(5.0):
            try:
                bus.ensure_topics(self.config.kafka, self.config.topics)
                target = self.swapper.initial_target()
                if target is not None:
                    self.swapper.apply(target)
                self.swapper.start()
                return
            except Exception as e:  # noqa: BLE001 - still away
                log.debug("Kafka still unreachable: %s", e)

    async def setup(self, server: ServiceServer) -> None:
        """ServiceServer.run_forever's setup: load, then report SERVING."""
        await run_blocking(self.start)
        server.watch("the updates consumer", lambda: self.swapper.error)
        await server.set_serving(True)

    def stop(self) -> None:
        self._stopped.set()
        self.swapper.stop()
        self.engine.stop()
        if self._candidate is not None:
            self._candidate.close()
            self._candidate = None
        self._variant = None
        self.interactions.close()

    def info(self) -> dict[str, Any]:
        info = dataclasses.asdict(self.engine.info())
        info["last_swap_error"] = self.swapper.last_error or info["last_swap_error"]
        info["spooled_interactions"] = self.interactions.depth()
        info["model_name"] = self.config.policy.model_name
        return info

    # ------------------------------------------------------------------ requests
    def check_capacity(self) -> None:
        """ResourceExhausted if the engine's queue is full (`Engine.check_capacity`): the first thing a route does."""
        self.engine.check_capacity()

    def check(self, req: GenerationRequest, user_id: str, caller: Caller | None = None) -> None:
        """Every field of a request against the limits, before anything is tokenized, queued or loaded
        (the engine checks the request again, for its direct callers); a session `caller` refuses
        another user here (Caller.scoped_user_id), before any work. A full queue refuses first."""
        self.engine.check_capacity()
        check_user_id(user_id, self.config.limits)
        if caller is not None:
            caller.scoped_user_id(user_id)
        e = self.config.engine
        validate_request(req, self.config.limits, e.default_max_new_tokens, e.max_new_tokens_cap)

    def timeout(self, caller_s: float | None) -> float:
        cap = self.config.policy.request_timeout_s
        return cap if caller_s is None else max(0.0, min(cap, caller_s))

    async def generate(
        self, req: GenerationRequest, user_id: str, timeout_s: float | None = None, *, caller: Caller
    ) -> Served:
        """One whole answer within the deadline (the caller's, capped by request_timeout_s). `caller`
        is required on every route: its namespace is part of the user id the token binds (`_finish`)."""
        self.check(req, user_id, caller)
        result = await self.engine.generate(req, self.timeout(timeout_s))
        return self._finish(req, result, new_id(), user_id, caller)

    async def stream(
        self,
        req: GenerationRequest,
        user_id: str,
        timeout_s: float | None = None,
        interaction_id: str | None = None,
        *,
        caller: Caller,
    ) -> AsyncGenerator[tuple[TokenEvent, Served | None], None]:
        """Token events as they come; the last one comes with its Served. Closing it frees the slot."""
        self.check(req, user_id, caller)
        iid = interaction_id or new_id()
        events = self.engine.stream(req, self.timeout(timeout_s))
        async with contextlib.aclosing(events):
            async for ev in events:
                if ev.result is not None:
                    yield ev, self._finish(req, ev.result, iid, user_id, caller)
                    return
                yield ev, None

    async def pair(
        self,
        req: GenerationRequest,
        user_id: str,
        candidate_version: int = 0,
        timeout_s: float | None = None,
        *,
        caller: Caller,
    ) -> ServedPair:
        """Two answers to one prompt: two samples of the serving version, or serving (A) vs a candidate (B).
        `caller` is required: every route must say who asks, for check_candidate."""
        self.check(req, user_id, caller)
        self.check_candidate(candidate_version, caller)
        version = candidate_version or self.config.policy.pair_candidate_version
        serving = self.engine.info().version
        engine_b, on = self.engine, None
        req_a, req_b = dataclasses.replace(req), dataclasses.replace(req)
        if version and version != serving:
            engine_b, on = await self._side_b(version)
        else:  # two samples of one version: they must be able to differ
            if req.temperature == 0 and not req.do_sample:
                req_a.do_sample = req_b.do_sample = True
            if req.seed is not None:
                req_b.seed = (req.seed + 1) % (SEED_MAX + 1)
        limit = self.timeout(timeout_s)
        tasks = [
            asyncio.ensure_future(self.engine.generate(req_a, limit)),
            asyncio.ensure_future(engine_b.generate(req_b, limit, on=on)),
        ]
        try:
            ra, rb = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()  # one side failed (or we were cancelled): free the other's slot
        pair_id = new_id()
        a = self._finish(req_a, ra, new_id(), user_id, caller, (pair_id, "A"))
        b = self._finish(req_b, rb, new_id(), user_id, caller, (pair_id, "B"))
        token = self.signer.issue(pair_id, ra.version, caller.scoped_user_id(user_id), kind="pair")
        return ServedPair(pair_id, a, b, token)

    def check_candidate(self, candidate_version: int, caller: Caller) -> None:
        """InvalidArgument for a number that is no version; PermissionDenied for a version that only the
        admin may load. Loading one (a third weight copy, unless an adapter) answers from a model nobody
        gated, so a caller without the admin token gets the serving version (0) or the operator's
        pair_candidate_version only. Checked before anything is loaded."""
        if not 0 <= candidate_version <= MAX_VERSION:
            raise errors.InvalidArgument(
                f"candidate_version = {candidate_version}: use a model-store version from 1 to {MAX_VERSION}, "
                "or 0 for the serving one"
            )
        configured, serving = self.config.policy.pair_candidate_version, self.engine.info().version
        if caller.is_admin or candidate_version in (0, configured, serving):
            return
        raise errors.PermissionDenied(
            f"candidate_version = {candidate_version} needs the admin token (`authorization: Bearer "
            f"<FLYWHEEL_AUTH_ADMIN_TOKEN>`): without it, send 0, the serving version ({serving}) or the configured "
            f"candidate (policy.pair_candidate_version = {configured})"
        )

    @property
    def candidate_loaded(self) -> int | None:
        """The candidate version GeneratePair holds (an adapter on the serving weights, or a second engine's)."""
        if self._variant is not None:
            return self._variant.version
        return self._candidate.version if self._candidate is not None else None

    async def _side_b(self, version: int) -> tuple[Engine, LoadedModel | None]:
        """Where side B of a pair against `version` runs: an adapter version on the serving engine itself,
        pinned to it (`Swapper.variant`: no copy of the weights, nothing else to start); a whole-weights
        version on a second engine (one cached; a third weight copy). An adapter's base must be the one
        served, at every pair (FailedPrecondition naming both bases otherwise)."""
        if self._candidate_lock is None:
            self._candidate_lock = asyncio.Lock()
        async with self._candidate_lock:
            serving = self.engine.serving_model
            whole = serving.base or serving if serving is not None else None
            cached = self._variant
            if cached is not None and cached.version == version and cached.base is whole:
                return self.engine, cached
            manifest = await run_blocking(self.store.get, self.config.policy.model_name, version)
            if manifest.base is not None:  # one candidate at a time: a second engine goes
                self._variant = await run_blocking(self.swapper.variant, version)
                old, self._candidate = self._candidate, None
                if old is not None:
                    await run_blocking(old.close)
                return self.engine, self._variant
            self._variant = None
            return await self._candidate_engine(version), None

    async def _candidate_engine(self, version: int) -> Engine:
        """The second engine for whole-weights `version` (caller holds `_candidate_lock`)."""
        cached = self._candidate
        if cached is not None and cached.version == version:
            return cached.engine
        engine = Engine(self.config.engine, limits=self.config.limits)
        try:
            engine.start()
            await run_blocking(self.swapper.load_into, engine, version)
        except BaseException:
            await run_blocking(engine.stop)
            raise
        finally:
            serving = self.engine.info().version
            if serving is not None:
                METRICS.version.set(serving)  # the gauge is process-wide: keep it on the serving version
        candidate = Candidate(version, engine)
        old, self._candidate = self._candidate, candidate
        if old is not None:
            await run_blocking(old.close)
        return candidate.engine

    # ------------------------------------------------------------------ answers
    def _finish(
        self,
        req: GenerationRequest,
        result: Result,
        iid: str,
        user_id: str,
        caller: Caller,
        pair: tuple[str, str] | None = None,
    ) -> Served:
        """Sign the answer's token and publish its Interaction, both for the user in the caller's
        namespace (Caller.scoped_user_id); Served keeps the user_id the caller sent."""
        scoped = caller.scoped_user_id(user_id)
        token = self.signer.issue(iid, result.version, scoped)
        it = events_pb2.Interaction(
            interaction_id=iid,
            pair_id=pair[0] if pair else "",
            pair_side=pair[1] if pair else "",
            prompt=result.prompt_text,
            response=result.text,
            policy_version=result.version,
            params=sampling_proto(req, result.seed),
            prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens,
            finish_reason=result.finish_reason,
            user_id=scoped,
            model=self.config.policy.model_name,
        )
        it.created_at.GetCurrentTime()
        self.interactions.publish(it)
        return Served(result, iid, token, user_id)


@dataclasses.dataclass
class Candidate:
    """GeneratePair's second engine, for a whole-weights candidate: the store `version` it serves."""

    version: int
    engine: Engine

    def close(self) -> None:
        self.engine.stop()


def sampling_proto(req: GenerationRequest, seed: int | None = None) -> common_pb2.SamplingParams:
    """The SamplingParams an answer was generated with (the seed actually used)."""
    p = common_pb2.SamplingParams(
        max_new_tokens=req.max_new_tokens or 0,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
        stop=req.stop,
        do_sample=req.do_sample,
        logprobs=req.logprobs,
    )
    s = req.seed if req.seed is not None else seed
    if s is not None:
        p.seed = s
    return p
