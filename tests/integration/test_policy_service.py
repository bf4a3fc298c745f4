"""The policy service on a real Apache Kafka broker with real gRPC ports.

Generate / GenerateStream / GeneratePair with ids and verifiable feedback tokens, reflection,
interactions on flywheel.interactions (and through the spool when Kafka is away), every bad
input with its status, queue full, not loaded, deadlines, a cancelled stream freeing its slot,
and hot swaps under load: zero failed requests, the right version on every answer, a tampered
checkpoint refused while serving goes on, and a rollback. A GeneratePair candidate other than the
serving or configured version needs the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kafka import KafkaConsumer
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.limits import LimitsConfig
from flywheel.core.modelstore import ModelStore, ModelStoreConfig
from flywheel.core.server import ServerConfig
from flywheel.policy.config import EngineConfig
from flywheel.policy.interactions import InteractionPublisher
from flywheel.policy.server import build_server
from flywheel.policy.service import PolicyConfig, PolicyService, PolicyServiceConfig
from flywheel.policy.starter import model_config
from flywheel.testing import wait_for
from flywheel.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
HMAC_KEY = "policy-test-key-0123456789abcdef"
SIGNER = AuthConfig(hmac_key=HMAC_KEY).signer()
ADMIN_TOKEN = "policy-test-admin-0123456789"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
PROMPTS = ["how do I bake bread?", "where is my order?", "do you like coffee?", "hi", "I forgot my password"]


# ---------------------------------------------------------------------------- helpers (shared with test_policy_http)
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def fresh_topics() -> TopicsConfig:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    d = TopicsConfig()
    names = {f: prefix + getattr(d, f) for f in ("interactions", "feedback", "preferences", "policy_updates")}
    names |= {f: prefix + getattr(d, f) for f in ("reward_updates", "dlq")}
    return TopicsConfig(**names, partitions=1)


def copy_of(src: Path) -> Callable[[Path], None]:
    return lambda d: shutil.copytree(src, d, dirs_exist_ok=True)


def perturbed(src: Path, seed: int, scale: float = 0.3) -> Callable[[Path], None]:
    """A version whose greedy answers differ from src's."""

    def write(d: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(src)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(src).save_pretrained(d)

    return write


def slow_without_eos(src: Path) -> Callable[[Path], None]:
    """A random 6-layer model (a few ms per token) on src's tokenizer with <unk> as EOS, whose output
    row for <unk> is zero (logit 0) among logits of about +-16: neither greedy decoding nor sampling
    at temperature 1 ever picks it (p < e^-30), so every answer runs to max_new_tokens."""

    def write(d: Path) -> None:
        tok = AutoTokenizer.from_pretrained(src)
        tok.eos_token = "<unk>"
        torch.manual_seed(0)
        cfg = model_config(tok, 256, 6)
        cfg.eos_token_id = tok.unk_token_id
        cfg.tie_word_embeddings = False
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head.normal_(0.0, 1.0)  # the final norm's output has norm ~16 (sqrt of the width)
            head[tok.unk_token_id].zero_()
        model.generation_config.eos_token_id = tok.unk_token_id
        model.save_pretrained(d)
        tok.save_pretrained(d)

    return write


def make_store(root: Path, v0_writer: Callable[[Path], None] | None = None) -> ModelStore:
    store = ModelStore(root)
    store.publish("policy", v0_writer or copy_of(tiny_starter()), parent=None, version=0, extra={"starter": True})
    return store


def make_config(
    kafka_bootstrap: str, topics: TopicsConfig, store_root: Path, state: Path, **engine
) -> PolicyServiceConfig:
    limits = {"max_concurrent_sequences": 8, "max_tokens_per_step": 512, "max_input_tokens": 128}
    limits |= {"default_max_new_tokens": 16, "max_new_tokens_cap": 64} | engine
    return PolicyServiceConfig(
        engine=EngineConfig(device="cpu", **limits),
        policy=PolicyConfig(state_dir=str(state), request_timeout_s=60),
        kafka=KafkaConfig(bootstrap=kafka_bootstrap, session_timeout_ms=3000, request_timeout_ms=10_000),
        topics=topics,
        store=ModelStoreConfig(root=str(store_root)),
        auth=AuthConfig(hmac_key=HMAC_KEY),
        limits=LimitsConfig(max_prompt_chars=2000),
    )


class Running:
    """A PolicyService + ServiceServer on their own event loop in a thread, like the real process."""

    def __init__(self, config: PolicyServiceConfig, load: bool = True) -> None:
        self.service = PolicyService(config)
        self.server = build_server(self.service, ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start(handle_signals=False))
        if load:
            self.call(self.service.setup(self.server))
        self.grpc_addr = f"127.0.0.1:{self.server.grpc_port}"
        self.http = f"http://127.0.0.1:{self.server.http_port}"
        self.channel = grpc.insecure_channel(self.grpc_addr)
        self.stub = policy_pb2_grpc.PolicyStub(self.channel)

    def call(self, coro, timeout: float = 120):  # noqa: ANN001
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.call(self.server.stop(grace=0), 20)
        self.service.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def gen(prompt: str, n: int = 8, **params) -> policy_pb2.GenerateRequest:  # noqa: ANN003
    return policy_pb2.GenerateRequest(
        prompt=prompt, user_id="u1", params=common_pb2.SamplingParams(max_new_tokens=n, **params)
    )


def read_topic(bootstrap: str, topic: str, cls, want: int, timeout_s: float = 20.0) -> list:  # noqa: ANN001
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                got += [cls.FromString(r.value) for r in recs]
    finally:
        c.close()
    return got


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def policy(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("policy")
    store = make_store(tmp / "store")
    store.publish("policy", perturbed(tiny_starter(), 1), parent=0)  # v1: a candidate for GeneratePair
    topics = fresh_topics()
    config = make_config(kafka_bootstrap, topics, tmp / "store", tmp / "state")
    config.auth = AuthConfig(hmac_key=HMAC_KEY, admin_token=ADMIN_TOKEN)
    running = Running(config)
    running.topics = topics  # type: ignore[attr-defined]
    yield running
    running.close()


@pytest.fixture(scope="module")
def limited(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One slot, a queue of one, and a model that never says EOS: long answers on demand."""
    tmp = tmp_path_factory.mktemp("limited")
    make_store(tmp / "store", slow_without_eos(tiny_starter()))
    cfg = make_config(
        kafka_bootstrap, fresh_topics(), tmp / "store", tmp / "state",
        max_concurrent_sequences=1, max_queue=1, max_new_tokens_cap=240,
    )  # fmt: skip
    running = Running(cfg)
    yield running
    running.close()


# ---------------------------------------------------------------------------- tests
def test_generate_stream_pair_info_reflection(policy: Running, kafka_bootstrap: str) -> None:
    r = policy.stub.Generate(gen(PROMPTS[0], logprobs=True))
    assert r.text and r.policy_version == 0 and len(r.interaction_id) == 32
    assert r.finish_reason in ("length", "eos_token", "stop_sequence") and 0 < r.generated_tokens <= 8
    assert r.prompt_tokens > 0 and len(r.tokens) == r.generated_tokens and all(t.logprob <= 0 for t in r.tokens)
    assert SIGNER.verify(r.feedback_token, r.interaction_id, "u1").policy_version == 0
    assert policy.stub.Generate(gen(PROMPTS[0])).text == r.text  # greedy: reproducible

    chunks = list(policy.stub.GenerateStream(gen(PROMPTS[0])))
    final = chunks[-1].final
    assert final.interaction_id and final.interaction_id != r.interaction_id and final.policy_version == 0
    assert "".join(c.text for c in chunks) == final.text == r.text and final.generated_tokens == len(chunks)
    SIGNER.verify(final.feedback_token, final.interaction_id, "u1")

    chat = policy.stub.Generate(
        policy_pb2.GenerateRequest(messages=[policy_pb2.ChatMessage(role="user", content=PROMPTS[0])], user_id="u1",
                                   params=common_pb2.SamplingParams(max_new_tokens=8))
    )  # fmt: skip
    assert chat.text == r.text  # the starter's chat template renders one user turn as the raw prompt

    pair = policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen(PROMPTS[1], seed=7)))
    assert pair.pair_id and pair.a.interaction_id != pair.b.interaction_id
    assert pair.a.policy_version == pair.b.policy_version == 0
    assert SIGNER.verify(pair.feedback_token, pair.pair_id, "u1", kind="pair").policy_version == 0
    SIGNER.verify(pair.b.feedback_token, pair.b.interaction_id, "u1")
    cand_req = policy_pb2.GeneratePairRequest(request=gen(PROMPTS[1]), candidate_version=1)
    cand = policy.stub.GeneratePair(cand_req, metadata=ADMIN)  # another version: an admin action
    assert (cand.a.policy_version, cand.b.policy_version) == (0, 1)
    with pytest.raises(grpc.RpcError) as e:
        req9 = policy_pb2.GeneratePairRequest(request=gen(PROMPTS[1]), candidate_version=9)
        policy.stub.GeneratePair(req9, metadata=ADMIN)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "version 9" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # without the token: refused before the store is even asked
        policy.stub.GeneratePair(req9)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "needs the admin token" in e.value.details()

    info = policy.stub.GetInfo(policy_pb2.GetInfoRequest())
    assert info.policy_version == 0 and info.max_new_tokens == 64 and info.max_concurrent_sequences == 8
    assert info.device == "cpu" and info.last_swap_error == ""

    refl = reflection_pb2_grpc.ServerReflectionStub(policy.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"flywheel.v1.Policy", "grpc.health.v1.Health"} <= names

    # Every answer above is on flywheel.interactions, with its content.
    want = {r.interaction_id: r, final.interaction_id: final, pair.a.interaction_id: pair.a}
    want |= {pair.b.interaction_id: pair.b, cand.b.interaction_id: cand.b}
    got = {
        i.interaction_id: i for i in read_topic(kafka_bootstrap, policy.topics.interactions, events_pb2.Interaction, 9)
    }
    assert set(want) <= set(got)
    for iid, resp_ in want.items():
        it = got[iid]
        assert (it.response, it.policy_version, it.generated_tokens) == (
            resp_.text,
            resp_.policy_version,
            resp_.generated_tokens,
        )
        assert it.user_id == "u1" and it.model == "policy" and it.prompt in PROMPTS and it.created_at.seconds > 0
    assert got[pair.b.interaction_id].pair_id == pair.pair_id and got[pair.b.interaction_id].pair_side == "B"
    assert got[cand.b.interaction_id].policy_version == 1 and got[r.interaction_id].params.max_new_tokens == 8


def test_bad_inputs_answer_invalid_argument(policy: Running) -> None:
    long_prompt = "word " * 300  # 1500 chars: under max_prompt_chars, over 128 tokens
    cases = [
        (gen(""), "prompt is empty"),
        (gen("x" * 2500), "2500 characters, over the limit of 2000"),
        (gen(long_prompt), "over the limit of 128 input tokens"),
        (gen("hi", n=65), "over the limit of 64"),
        (gen("hi", top_p=1.5), "top_p"),
        (gen("hi", temperature=-1), "temperature"),
        (gen("hi", repetition_penalty=-2), "repetition_penalty"),
        (gen("hi", top_k=-1), "top_k"),
        (
            policy_pb2.GenerateRequest(prompt="hi", messages=[policy_pb2.ChatMessage(role="user", content="x")]),
            "not both",
        ),
        (policy_pb2.GenerateRequest(messages=[policy_pb2.ChatMessage(role="robot", content="x")]), "role"),
        (policy_pb2.GenerateRequest(prompt="hi", user_id="u" * 257), "user_id has 257 characters: use at most 256"),
        (gen("hi", temperature=1e-40, do_sample=True), "use 0 (greedy) or a value from 0.01 to 100"),
        (gen("hi", repetition_penalty=1e-45), "use a value from 0.01 to 100 (1 = off)"),
        (gen("hi", top_k=2**31 - 1), "top_k = 2147483647: use a value from 0 (off) to 1000000"),
        (gen("hi", stop=["s"] * 17), "17 stop sequences: send at most 16"),
        (
            policy_pb2.GenerateRequest(messages=[policy_pb2.ChatMessage(role="user", content="x")] * 257),
            "the chat has 257 messages, over the limit of 256",
        ),
    ]
    for req, why in cases:
        for call in (policy.stub.Generate, lambda r: list(policy.stub.GenerateStream(r))):
            with pytest.raises(grpc.RpcError) as e:
                call(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (why, e.value.details())
            assert why in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi"), candidate_version=-1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidate_version" in e.value.details()
    for pair_req, why in [
        (
            policy_pb2.GeneratePairRequest(request=gen("hi"), candidate_version=2**40),
            "candidate_version = 1099511627776",
        ),
        (policy_pb2.GeneratePairRequest(request=policy_pb2.GenerateRequest(prompt="hi", user_id="u" * 300)), "user_id"),
        (policy_pb2.GeneratePairRequest(request=gen("hi", temperature=1e-40)), "temperature"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            policy.stub.GeneratePair(pair_req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), e.value.details()


def test_candidate_version_needs_the_admin_token_unless_configured(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Any caller gets the serving version or the operator's pair_candidate_version as side B; any other
    version is PERMISSION_DENIED without the admin token, and nothing is loaded for the refused call."""
    store = make_store(tmp_path / "store")
    store.publish("policy", perturbed(tiny_starter(), 1), parent=0)  # v1: only the admin may pair against it
    store.publish("policy", perturbed(tiny_starter(), 2), parent=1)  # v2: the configured candidate
    config = make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store", tmp_path / "state")
    config.policy = dataclasses.replace(config.policy, pair_candidate_version=2)
    config.auth = AuthConfig(hmac_key=HMAC_KEY, admin_token=ADMIN_TOKEN, api_keys=["alice:alice-key-0123456789"])
    running = Running(config)
    alice = (("authorization", "Bearer alice-key-0123456789"),)

    def pair(version: int, metadata: tuple) -> policy_pb2.GeneratePairResponse:
        req = policy_pb2.GeneratePairRequest(request=gen(PROMPTS[1]), candidate_version=version)
        return running.stub.GeneratePair(req, metadata=metadata)

    try:
        assert running.service.candidate_loaded is None
        for metadata in (alice, (("authorization", "Bearer alice-key-0123456789x"),), ()):
            with pytest.raises(grpc.RpcError) as e:
                pair(1, metadata)
            if metadata == alice:  # a caller's key: known, but not allowed to load version 1
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert e.value.details() == (
                    "candidate_version = 1 needs the admin token (`authorization: Bearer <FLYWHEEL_AUTH_ADMIN_TOKEN>`): "
                    "without it, send 0, the serving version (0) or the configured candidate "
                    "(policy.pair_candidate_version = 2)"
                )
            else:  # an unknown key, or none, is not even a caller
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert running.service.candidate_loaded is None  # refused before anything was loaded
        with pytest.raises(grpc.RpcError) as e:
            pair(-1, alice)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidate_version = -1" in e.value.details()

        for version in (0, 2):  # the configured candidate, by default or by name: anyone
            r = pair(version, alice)
            assert (r.a.policy_version, r.b.policy_version) == (0, 2)
        assert running.service.candidate_loaded == 2
        r = pair(1, ADMIN)
        assert (r.a.policy_version, r.b.policy_version) == (0, 1) and running.service.candidate_loaded == 1
    finally:
        running.close()


def test_every_http_route_checks_the_same_bounds(policy: Running) -> None:
    """The TGI and OpenAI routes reach the one validation: unusable values are 422 naming the field."""

    async def post(path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.post(policy.http + path, json=body, headers=headers or {}) as resp:
                return resp.status, await resp.json()

    tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 4}}
    chat = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("/generate", tgi | {"parameters": {"top_k": 2**63}}, None, "top_k = 9223372036854775808"),
        ("/generate", tgi | {"parameters": {"temperature": 1e-40}}, None, "temperature = 1e-40"),
        ("/generate", tgi | {"parameters": {"repetition_penalty": 1e-45}}, None, "repetition_penalty = 1e-45"),
        ("/generate_stream", tgi | {"parameters": {"top_k": 2**63}}, None, "top_k"),
        ("/generate", tgi, {"x-flywheel-user-id": "u" * 300}, "user_id has 300 characters: use at most 256"),
        ("/v1/chat/completions", chat | {"user": "u" * 300}, None, "user_id has 300 characters"),
        ("/v1/chat/completions", chat | {"top_k": 2**63}, None, "top_k"),
        ("/v1/completions", {"prompt": "hi", "temperature": 1e-40}, None, "temperature = 1e-40"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "x"}] * 257}, None, "257 messages"),
    ]
    for path, body, headers, why in cases:
        status, answer = asyncio.run(post(path, body, headers))
        assert status == 422 and why in answer["error"], (path, status, answer)
    status, answer = asyncio.run(post("/generate", tgi))
    assert status == 200 and answer["generated_text"] is not None


def test_queue_full_deadline_and_cancelled_stream(limited: Running) -> None:
    stub = limited.stub
    # A deadline is honoured: the sequence is dropped from the engine, not run to its end.
    cancelled = counter("flywheel_policy_requests_total", outcome="cancelled")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gen(PROMPTS[0], n=240), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 1
    wait_for(lambda: counter("flywheel_policy_requests_total", outcome="cancelled") > cancelled, 1, "the drop")
    wait_for(lambda: limited.service.engine.info().running == 0, 1, "the slot to be free")

    # A cancelled stream frees its slot at once (long before its 240 tokens are done).
    cancelled = counter("flywheel_policy_requests_total", outcome="cancelled")
    stream = stub.GenerateStream(gen(PROMPTS[0], n=240))
    next(stream)
    stream.cancel()
    wait_for(lambda: counter("flywheel_policy_requests_total", outcome="cancelled") > cancelled, 1, "the cancel")
    wait_for(lambda: limited.service.engine.info().running == 0, 1, "the slot to be free")

    # One running, one waiting, the third is refused.
    first = stub.Generate.future(gen(PROMPTS[0], n=240))
    wait_for(lambda: limited.service.engine.info().running == 1, 5, "the first request to run")
    second = stub.Generate.future(gen(PROMPTS[1], n=240))
    wait_for(lambda: limited.service.engine.info().waiting == 1, 5, "the second request to wait")
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(gen(PROMPTS[2], n=4))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
    assert first.result(30).generated_tokens == 240 and second.result(30).generated_tokens == 240


def test_not_loaded_is_unavailable(kafka_bootstrap: str, tmp_path: Path) -> None:
    running = Running(make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store", tmp_path / "s"), load=False)
    try:
        for call in (running.stub.Generate, running.stub.GetInfo):
            with pytest.raises(grpc.RpcError) as e:
                call(gen("hi") if call is running.stub.Generate else policy_pb2.GetInfoRequest())
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "not loaded" in e.value.details()
    finally:
        running.close()


def test_interactions_spool_while_kafka_is_away(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = fresh_topics().interactions
    bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), TopicsConfig(interactions=topic, partitions=1))
    away = KafkaConfig(bootstrap="127.0.0.1:1", request_timeout_ms=1000)
    pub = InteractionPublisher(away, topic, tmp_path / "spool.sqlite", send_timeout_s=1.0)
    pub.start()
    t0 = time.monotonic()
    for i in range(5):
        assert pub.publish(events_pb2.Interaction(interaction_id=f"i{i}", response=f"r{i}"))
    assert time.monotonic() - t0 < 0.05  # publishing never waits for Kafka
    wait_for(lambda: pub.spool.depth() == 5, 15, "5 interactions in the spool")
    pub.close(drain_timeout_s=0)
    back = InteractionPublisher(KafkaConfig(bootstrap=kafka_bootstrap), topic, tmp_path / "spool.sqlite")
    back.start()
    try:
        wait_for(lambda: back.spool.depth() == 0, 20, "the spool to drain")
        got = read_topic(kafka_bootstrap, topic, events_pb2.Interaction, 5)
        assert [i.interaction_id for i in got] == [f"i{i}" for i in range(5)]  # in order
    finally:
        back.close()


@pytest.mark.parametrize("swap_worker", [True, False], ids=["worker-process", "threads"])
def test_hot_swap_under_load_tampered_refused_and_rollback(
    kafka_bootstrap: str, tmp_path: Path, swap_worker: bool
) -> None:
    store = make_store(tmp_path / "store")
    topics = fresh_topics()
    config = make_config(kafka_bootstrap, topics, tmp_path / "store", tmp_path / "state", swap_worker=swap_worker)
    running = Running(config)
    swapper = running.service.swapper
    kafka = KafkaConfig(bootstrap=kafka_bootstrap)
    answers: list[tuple[str, int, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(i: int) -> None:
        stub = policy_pb2_grpc.PolicyStub(running.channel)
        while not stop.is_set():
            p = PROMPTS[i % len(PROMPTS)]
            try:
                r = stub.Generate(gen(p, n=6))
                answers.append((p, r.policy_version, r.text))
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")
            i += 1

    def announce(version: int, reason: str = "gate") -> None:
        with bus.Producer(kafka) as prod:
            prod.send_sync(topics.policy_updates, "policy", store.to_update(store.get("policy", version), reason))

    def serving(v: int) -> Callable[[], bool]:
        return lambda: any(a[1] == v for a in answers[-4:])

    clients = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    try:
        for c in clients:
            c.start()
        # Announcements are fetched with the short wait that a broker without fetch wake-ups needs.
        worker = swapper.worker
        if swap_worker:  # consumed, verified and read in a process of its own, at a lower priority
            assert worker is not None and worker.pid is not None and worker.pid != os.getpid()
            assert worker.settings.fetch_wait_ms == 50
            want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + config.engine.swap_nice)
            wait_for(lambda: os.getpriority(os.PRIO_PROCESS, worker.pid) == want, 10, "the nice worker")
        else:
            assert worker is None and swapper.consumer is not None
            assert swapper.consumer.consumer.config["fetch_max_wait_ms"] == 50
        v1 = store.publish("policy", perturbed(tiny_starter(), 1), parent=0).version
        lags, lag_sum = (
            counter("flywheel_policy_swap_lag_seconds_count"),
            counter("flywheel_policy_swap_lag_seconds_sum"),
        )
        announced = time.time()
        announce(v1)
        wait_for(serving(1), 30, "answers from version 1")
        # The switch observed its lag from the announcement record's timestamp (the same clock here),
        # and that lag lies within what this test saw.
        assert counter("flywheel_policy_swap_lag_seconds_count") == lags + 1
        assert 0 < counter("flywheel_policy_swap_lag_seconds_sum") - lag_sum < time.time() - announced + 0.01
        # A tampered checkpoint: refused, reported, version 1 keeps serving.
        v2 = store.publish("policy", perturbed(tiny_starter(), 2), parent=1)
        weights = v2.path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same size: only the sha256 can tell
        weights.write_bytes(bytes(data))
        refused = counter("flywheel_policy_swaps_total", outcome="refused")
        announce(v2.version)
        wait_for(lambda: counter("flywheel_policy_swaps_total", outcome="refused") > refused, 30, "the refusal")
        info = running.stub.GetInfo(policy_pb2.GetInfoRequest())
        assert (
            info.policy_version == 1
            and "version 2 refused" in info.last_swap_error
            and "sha256" in info.last_swap_error
        )
        n = len(answers)
        wait_for(lambda: len(answers) > n + 8, 10, "answers after the refusal")
        assert all(a[1] == 1 for a in answers[n:])
        # An older version announced: rollback.
        announce(0, "rollback")
        wait_for(serving(0), 30, "answers from version 0 after the rollback")
        assert running.stub.GetInfo(policy_pb2.GetInfoRequest()).last_swap_error == ""
        # The updates consumer's counters and lag are the service's metrics, from the worker's process too.
        group = {"topic": topics.policy_updates, "group": swapper.group}
        wait_for(lambda: counter("flywheel_bus_consumed_total", **group) >= 3, 10, "3 updates consumed on /metrics")
        lag = group | {"partition": "0"}
        wait_for(lambda: REGISTRY.get_sample_value("flywheel_bus_consumer_lag", lag) == 0, 10, "no lag on /metrics")
        if worker is not None:  # a worker that dies is started again and the next announcement still applies
            consumed = counter("flywheel_bus_consumed_total", **group)
            os.kill(worker.pid, signal.SIGKILL)
            wait_for(lambda: worker.restarts == 1, 10, "the swap worker restarted")
            announce(v1)
            wait_for(serving(1), 30, "answers from version 1 after the worker restarted")
            # the new worker counts from 0: the exported total goes on from where it was
            wait_for(lambda: counter("flywheel_bus_consumed_total", **group) > consumed, 10, "the count going on")
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        running.close()
    assert not failures, failures[:3]
    texts: dict[tuple[str, int], set[str]] = {}
    for p, v, t in answers:
        texts.setdefault((p, v), set()).add(t)
    assert {v for _, v, _ in answers} == {0, 1}
    assert all(len(t) == 1 for t in texts.values()), "an answer reported a version that did not produce it"
    assert any(texts[(p, 0)] != texts.get((p, 1), texts[(p, 0)]) for p in PROMPTS if (p, 0) in texts)
