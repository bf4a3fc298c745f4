"""The services behind the feedback page, in one process: what tests/browser/test_page.py drives
and tools/page_screenshots.py photographs.

A real policy (the model given), the feedback service that serves the page, and optionally the
reward service's preference join, all on a real broker with real ports, each with the CORS
origins the page needs (the page is on the feedback service's port, the policy on its own).
Every server runs on one asyncio loop in a thread, as each runs in its own process in production;
HTTP ports are picked up front so that each server's allowed origins can name the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import shutil
import threading
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.brokers import free_port
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.limits import LimitsConfig
from flywheel.core.modelstore import ModelStore, ModelStoreConfig
from flywheel.core.server import ServerConfig, ServiceServer

HMAC_KEY = "page-stack-hmac-key-0123456789abcdef"
HOST = "127.0.0.1"


def fresh_topics() -> TopicsConfig:
    """Topic names with a prefix of their own, one partition (so order is checkable)."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    d = TopicsConfig()
    fields = ("interactions", "feedback", "preferences", "policy_updates", "reward_updates", "dlq")
    return TopicsConfig(**{f: prefix + getattr(d, f) for f in fields}, partitions=1)


class Loop:
    """An asyncio loop in a daemon thread; `call` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="page-stack", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120) -> Any:
        return self.submit(coro).result(timeout_s)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclasses.dataclass
class Policy:
    service: Any
    server: ServiceServer
    url: str


@dataclasses.dataclass
class Feedback:
    intake: Any
    server: ServiceServer
    url: str

    @property
    def page(self) -> str:
        return self.url + "/"


class PageStack:
    """Start with `policy()`, `feedback()`, `reward_join()` (each returns once it serves, or at once with
    wait=False: `ready()` then waits for all, so slow starts overlap; but start services that load a
    model one at a time: transformers' loading is not thread-safe); `close()` stops all in reverse order."""

    def __init__(self, bootstrap: str, workdir: Path, model_dir: Path, topics: TopicsConfig | None = None) -> None:
        self.kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=3000, request_timeout_ms=10_000)
        self.topics = topics or fresh_topics()
        self.workdir = Path(workdir)
        self.store_root = self.workdir / "models"
        self.loop = Loop()
        self._stops: list[tuple[ServiceServer | None, Callable[[], Any]]] = []
        self._starting: list[concurrent.futures.Future[Any]] = []
        bus.ensure_topics(self.kafka, self.topics)
        store = ModelStore(self.store_root)
        if not store.list_versions("policy"):
            store.publish(
                "policy",
                lambda d: shutil.copytree(
                    model_dir, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json")
                ),
                parent=None,
                version=0,
                extra={"starter": True},
            )

    @staticmethod
    def port() -> int:
        return free_port(HOST)

    def _server(self, http_port: int, origins: list[str]) -> ServerConfig:
        return ServerConfig(host=HOST, grpc_port=0, http_port=http_port, grace_s=1, cors_origins=origins)

    def policy(
        self, http_port: int, origins: list[str], token_ttl_s: int = 3600, wait: bool = True, **engine: Any
    ) -> Policy:
        """A policy service serving version 0 of the store; feedback tokens live token_ttl_s."""
        from flywheel.policy.config import EngineConfig
        from flywheel.policy.server import build_server
        from flywheel.policy.service import PolicyConfig, PolicyService, PolicyServiceConfig

        limits = {"max_concurrent_sequences": 8, "max_input_tokens": 128, "default_max_new_tokens": 48} | engine
        state = self.workdir / f"policy-{http_port}"
        config = PolicyServiceConfig(
            engine=EngineConfig(device="cpu", **limits),
            policy=PolicyConfig(state_dir=str(state), request_timeout_s=60),
            kafka=self.kafka,
            topics=self.topics,
            store=ModelStoreConfig(root=str(self.store_root)),
            auth=AuthConfig(hmac_key=HMAC_KEY, token_ttl_s=token_ttl_s),
            limits=LimitsConfig(max_prompt_chars=2000),
        )
        service = PolicyService(config)
        server = build_server(service, self._server(http_port, origins))

        async def start() -> None:
            await server.start(handle_signals=False)
            await service.setup(server)

        self._start(start(), wait)
        self._stops.append((server, service.stop))
        return Policy(service, server, f"http://{HOST}:{http_port}")

    def feedback(
        self, http_port: int, policy_url: str, origins: list[str], wait: bool = True, **settings: Any
    ) -> Feedback:
        """A feedback service whose page streams from `policy_url`."""
        from flywheel.feedback.config import FeedbackConfig
        from flywheel.feedback.server import build_server, open_and_serve

        config = FeedbackConfig(
            state_dir=str(self.workdir / f"feedback-{http_port}"), page_policy_url=policy_url, **settings
        )
        auth = AuthConfig(hmac_key=HMAC_KEY)
        server, intake = build_server(self._server(http_port, origins), config, self.kafka, self.topics, auth)

        async def start() -> None:
            await server.start(handle_signals=False)
            await open_and_serve(server, intake)

        self._start(start(), wait)
        self._stops.append((server, intake.close))
        return Feedback(intake, server, f"http://{HOST}:{http_port}")

    def reward_join(self, base_model: Path, wait: bool = True) -> Any:
        """The reward service with training off: its join turns interactions and feedback into pairs."""
        from flywheel.reward.config import JoinConfig, RewardModelConfig, TrainConfig
        from flywheel.reward.server import RewardService, RewardServiceConfig, build_server

        cfg = RewardServiceConfig(
            join=JoinConfig(state_dir=str(self.workdir / "reward"), group=f"page-{uuid.uuid4().hex[:6]}"),
            model=RewardModelConfig(base_model=str(base_model), max_length=64, device="cpu"),
            train=TrainConfig(enabled=False),
            kafka=self.kafka,
            topics=self.topics,
            store=ModelStoreConfig(root=str(self.workdir / "reward-models")),
        )
        service = RewardService(cfg)
        server = build_server(service, ServerConfig(host=HOST, grpc_port=0, http_port=0, grace_s=1))

        async def start() -> None:
            await server.start(handle_signals=False)
            await service.setup(server)

        self._start(start(), wait)
        self._stops.append((server, service.stop))
        return service

    def _start(self, coro: Coroutine[Any, Any, Any], wait: bool) -> None:
        self._starting.append(self.loop.submit(coro))
        if wait:
            self.ready()

    def ready(self, timeout_s: float = 120) -> None:
        """Wait until everything started so far serves (the first failure raised)."""
        starting, self._starting = self._starting, []
        for f in starting:
            f.result(timeout_s)

    def on_close(self, stop: Callable[[], Any]) -> None:
        """Call `stop` on close (before what was started earlier)."""
        self._stops.append((None, stop))

    def close(self) -> None:
        for server, stop in reversed(self._stops):
            if server is not None:
                with contextlib.suppress(Exception):
                    self.loop.call(server.stop(grace=0), 20)
            with contextlib.suppress(Exception):
                stop()
        self.loop.close()
