"""Sessions end to end: the policy (in this process) and the feedback service (a child process) on
real ports, the real Kafka broker, real HTTP and gRPC clients.

An application mints a session for "alice" with its API key (HTTP POST /sessions and gRPC
CreateSession); the session then works on every route of both services, always as app's alice:
naming no user gives alice, naming another is 403 / PERMISSION_DENIED before any work, the answers'
tokens bind "app:alice" (so the application's own key can give feedback for her too), and the
events on the topic carry that user. An expired session (ttl 1 s, then the time passes) and a
tampered one are 401 / UNAUTHENTICATED with the reason; a session makes no admin calls, asks for no
unconfigured candidate and mints no sessions.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig
from flywheel.core.server import ServerConfig
from flywheel.policy.server import build_server
from flywheel.policy.service import PolicyService, PolicyServiceConfig
from flywheel.v1 import feedback_pb2, policy_pb2, policy_pb2_grpc
from tests.integration.test_feedback_service import Service
from tests.integration.test_feedback_service import read_topic as read_feedback
from tests.integration.test_policy_service import (
    HMAC_KEY,
    PROMPTS,
    Running,
    fresh_topics,
    gen,
    make_config,
    make_store,
    one_torch_thread,  # noqa: F401 - autouse fixture
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
APP_KEY = "app-key-0123456789"
KEYS = f"app:{APP_KEY}"
ADMIN_TOKEN = "sessions-admin-0123456789"
APP = (("authorization", f"Bearer {APP_KEY}"),)
ORIGIN = "http://app.example.test:3000"
SIGNER = AuthConfig(hmac_key=HMAC_KEY).signer()
S = feedback_pb2


class Policy(Running):
    """test_policy_service.Running with this module's ServerConfig (CORS origins)."""

    def __init__(self, config: PolicyServiceConfig, server_config: ServerConfig) -> None:
        self.service = PolicyService(config)
        self.server = build_server(self.service, server_config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start(handle_signals=False))
        self.call(self.service.setup(self.server))
        self.grpc_addr = f"127.0.0.1:{self.server.grpc_port}"
        self.http = f"http://127.0.0.1:{self.server.http_port}"
        self.channel = grpc.insecure_channel(self.grpc_addr)
        self.stub = policy_pb2_grpc.PolicyStub(self.channel)


class Stack:
    """The policy and the feedback service with the same API key, admin token, hmac key and origin."""

    def __init__(self, kafka_bootstrap: str, tmp: Path) -> None:
        self.bootstrap = kafka_bootstrap
        self.topics = fresh_topics()
        bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), self.topics)
        make_store(tmp / "store")
        config = make_config(kafka_bootstrap, self.topics, tmp / "store", tmp / "state")
        config.auth = AuthConfig(hmac_key=HMAC_KEY, api_keys=[KEYS], admin_token=ADMIN_TOKEN)
        server = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1, cors_origins=[ORIGIN])
        self.policy = Policy(config, server)
        env = {"FLYWHEEL_HMAC_KEY": HMAC_KEY, "FLYWHEEL_API_KEYS": KEYS, "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN}
        self.feedback = Service(kafka_bootstrap, self.topics.feedback, tmp, FLYWHEEL_SERVER_CORS_ORIGINS=ORIGIN, **env)

    @property
    def feedback_http(self) -> str:
        return f"http://127.0.0.1:{self.feedback.http_port}"

    def close(self) -> None:
        try:
            assert self.feedback.stop(signal.SIGTERM) == 0
        finally:
            self.policy.close()

    def mint(self, user: str, ttl_s: int | None = None) -> str:
        body: dict[str, Any] = {"user_id": user} | ({} if ttl_s is None else {"ttl_s": ttl_s})
        status, got, _ = self.feedback.http("POST", "/sessions", body, headers={"Authorization": f"Bearer {APP_KEY}"})
        assert status == 200, got
        return str(got["session"])

    def generate(self, session: str, **headers: str) -> requests.Response:
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
        return requests.post(f"{self.policy.http}/generate", json=body, headers=bearer(session) | headers, timeout=60)


def bearer(session: str) -> dict[str, str]:
    return {"authorization": f"Bearer {session}"}


def md(session: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {session}"),)


def refused(call: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap, tmp_path_factory.mktemp("sessions"))
    yield s
    s.close()


def test_minting_over_http_and_grpc(stack: Stack) -> None:
    before = int(time.time())
    status, got, _ = stack.feedback.http(
        "POST", "/sessions", {"user_id": "alice", "ttl_s": 600}, headers={"Authorization": f"Bearer {APP_KEY}"}
    )
    assert status == 200 and got["user_id"] == "alice" and got["session"].startswith("fws1.")
    assert before + 600 <= got["expires_at"] <= int(time.time()) + 600
    s = stack.feedback.stub.CreateSession(S.CreateSessionRequest(user_id="alice"), metadata=APP)
    assert s.session.startswith("fws1.") and s.user_id == "alice" and s.expires_at >= before + 3600  # the default

    no_key = stack.feedback.http("POST", "/sessions", {"user_id": "alice"})
    assert no_key[0] == 401 and "API key is required" in no_key[1]["error"]
    assert refused(stack.feedback.stub.CreateSession, S.CreateSessionRequest(user_id="alice")).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    app = {"Authorization": f"Bearer {APP_KEY}"}
    for body, why in (
        ({"user_id": "alice", "ttl_s": 90000}, "ttl_s = 90000: use 1..86400 seconds"),
        ({"user_id": "alice", "ttl_s": "60"}, "ttl_s must be an integer"),
        ({"user_id": ""}, "user_id must be a non-empty string"),
        ({"user_id": "a" * 1000}, "user_id has 1000 characters"),
        ({"user": "alice"}, "unknown field(s) 'user': the fields are user_id, ttl_s"),
    ):
        status, err, _ = stack.feedback.http("POST", "/sessions", body, headers=app)
        assert (status, err["error_type"]) == (422, "validation") and why in err["error"], err
    e = refused(stack.feedback.stub.CreateSession, S.CreateSessionRequest(user_id="alice", ttl_s=-5), metadata=APP)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_s = -5" in e.details()
    # A session never mints another (a browser could renew itself forever), nor does the admin.
    status, err, _ = stack.feedback.http("POST", "/sessions", {"user_id": "alice"}, headers=bearer(s.session))
    assert status == 403 and "a session cannot mint sessions" in err["error"]
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    e = refused(stack.feedback.stub.CreateSession, S.CreateSessionRequest(user_id="alice"), metadata=admin)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_session_acts_as_its_user_on_every_policy_route(stack: Stack) -> None:
    session = stack.feedback.stub.CreateSession(S.CreateSessionRequest(user_id="alice"), metadata=APP).session
    policy = stack.policy
    # TGI /generate: no user named -> alice; alice named -> alice; bob -> 403 before any work.
    for headers in ({}, {"x-flywheel-user-id": "alice"}):
        r = stack.generate(session, **headers)
        assert r.status_code == 200, r.text
        SIGNER.verify(r.json()["feedback_token"], r.json()["interaction_id"], "app:alice")
    r = stack.generate(session, **{"x-flywheel-user-id": "bob"})
    assert r.status_code == 403 and r.json() == {
        "error": "this session is for user 'alice', not 'bob': leave the user id out (the session's user is used) "
        "or mint a session for that user",
        "error_type": "permission_denied",
    }
    # TGI /generate_stream: the last event's token binds alice.
    r = requests.post(
        f"{policy.http}/generate_stream", json={"inputs": PROMPTS[1]}, headers=bearer(session), timeout=60
    )
    last = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:")][-1]
    SIGNER.verify(last["feedback_token"], last["interaction_id"], "app:alice")
    for route in ("/generate_stream", "/generate_pair", "/"):  # refused before a stream's headers leave
        r = requests.post(
            policy.http + route, json={"inputs": "hi"}, headers=bearer(session) | {"x-flywheel-user-id": "bob"}
        )
        assert r.status_code == 403 and "this session is for user 'alice'" in r.json()["error"], route
    r = requests.post(f"{policy.http}/generate_pair", json={"inputs": PROMPTS[1]}, headers=bearer(session), timeout=60)
    assert r.status_code == 200 and SIGNER.verify(
        r.json()["feedback_token"], r.json()["pair_id"], "app:alice", kind="pair"
    )
    # OpenAI: `user` is a user named too.
    body = {"model": "policy", "prompt": PROMPTS[2], "max_tokens": 4}
    ok = requests.post(f"{policy.http}/v1/completions", json=body | {"user": "alice"}, headers=bearer(session))
    assert ok.status_code == 200 and SIGNER.verify(
        ok.json()["feedback_token"], ok.json()["interaction_id"], "app:alice"
    )
    bad = requests.post(f"{policy.http}/v1/completions", json=body | {"user": "bob"}, headers=bearer(session))
    assert bad.status_code == 403 and "this session is for user 'alice'" in bad.json()["error"]
    chat = {"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "user": "bob"}
    assert requests.post(f"{policy.http}/v1/chat/completions", json=chat, headers=bearer(session)).status_code == 403
    # gRPC Generate / GenerateStream / GeneratePair.
    anyone = gen(PROMPTS[3], 4)
    anyone.user_id = ""
    answer = policy.stub.Generate(anyone, metadata=md(session))
    SIGNER.verify(answer.feedback_token, answer.interaction_id, "app:alice")
    bob = gen(PROMPTS[3], 4)
    bob.user_id = "bob"
    for call in (policy.stub.Generate, lambda r, metadata: list(policy.stub.GenerateStream(r, metadata=metadata))):
        e = refused(call, bob, metadata=md(session))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "this session is for user 'alice'" in e.details()
    pair = policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=anyone), metadata=md(session))
    SIGNER.verify(pair.feedback_token, pair.pair_id, "app:alice", kind="pair")
    e = refused(policy.stub.GeneratePair, policy_pb2.GeneratePairRequest(request=bob), metadata=md(session))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


def test_feedback_with_a_session_lands_as_the_sessions_user(stack: Stack, kafka_bootstrap: str) -> None:
    session = stack.mint("erin")
    answers = [stack.generate(session).json() for _ in range(4)]
    fb = stack.feedback

    def thumbs(fid: str, a: dict[str, Any], user: str = "") -> feedback_pb2.FeedbackRequest:
        return S.FeedbackRequest(
            feedback_id=fid,
            interaction_id=a["interaction_id"],
            feedback_token=a["feedback_token"],
            user_id=user,
            thumbs=1,
        )

    assert fb.stub.Submit(thumbs("g1", answers[0]), metadata=md(session)).status == S.SUBMIT_STATUS_ACCEPTED
    batch = fb.stub.SubmitBatch(S.SubmitBatchRequest(items=[thumbs("g2", answers[1], "erin")]), metadata=md(session))
    assert [r.response.status for r in batch.results] == [S.SUBMIT_STATUS_ACCEPTED]
    e = refused(fb.stub.Submit, thumbs("g3", answers[2], "bob"), metadata=md(session))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "this session is for user 'erin'" in e.details()
    batch = fb.stub.SubmitBatch(S.SubmitBatchRequest(items=[thumbs("g3", answers[2], "bob")]), metadata=md(session))
    assert batch.results[0].error_code == "PERMISSION_DENIED"
    body = {"feedback_id": "h1", "interaction_id": answers[2]["interaction_id"], "thumbs": -1}
    body["feedback_token"] = answers[2]["feedback_token"]
    assert fb.http("POST", "/feedback", body, headers=bearer(session))[:2] == (
        200,
        {"feedback_id": "h1", "status": "accepted"},
    )
    status, err, _ = fb.http(
        "POST", "/feedback", body | {"feedback_id": "h2", "user_id": "bob"}, headers=bearer(session)
    )
    assert status == 403 and "this session is for user 'erin'" in err["error"]
    # The token binds app's erin: the application's own key may give feedback for her as well.
    assert fb.stub.Submit(thumbs("k1", answers[3], "erin"), metadata=APP).status == S.SUBMIT_STATUS_ACCEPTED

    got = read_feedback(kafka_bootstrap, stack.topics.feedback, n=4)
    mine = [(e.feedback_id, e.user_id, e.value) for _, e, _ in got if e.user_id.endswith(":erin")]
    assert mine == [("g1", "app:erin", 1), ("g2", "app:erin", 1), ("h1", "app:erin", -1), ("k1", "app:erin", 1)]


def test_expired_and_tampered_sessions_are_refused_with_the_reason(stack: Stack) -> None:
    short = stack.mint("frank", ttl_s=1)
    assert stack.generate(short).status_code == 200
    time.sleep(2.2)  # the point of this test: the session's second passes
    r = stack.generate(short)
    assert r.status_code == 401 and r.json()["error"].startswith("session expired ")
    e = refused(stack.feedback.stub.Submit, S.FeedbackRequest(feedback_id="x", thumbs=1), metadata=md(short))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "session expired" in e.details()

    good = stack.mint("frank")
    head, payload, sig = good.split(".")
    tampered = f"{head}.{payload}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    r = stack.generate(tampered)
    assert r.status_code == 401 and "session signature is invalid" in r.json()["error"]
    e = refused(stack.policy.stub.Generate, gen(PROMPTS[0], 4), metadata=md(tampered))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "signature is invalid" in e.details()
    r = stack.generate("fws1.not-a-session")
    assert r.status_code == 401 and "malformed session" in r.json()["error"]


def test_a_session_makes_no_admin_calls(stack: Stack) -> None:
    session = stack.mint("gina")
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}, "candidate_version": 7}
    r = requests.post(f"{stack.policy.http}/generate_pair", json=body, headers=bearer(session), timeout=60)
    assert r.status_code == 403 and "needs the admin token" in r.json()["error"]
    req = policy_pb2.GeneratePairRequest(request=gen(PROMPTS[0], 4), candidate_version=7)
    req.request.user_id = ""
    e = refused(stack.policy.stub.GeneratePair, req, metadata=md(session))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "needs the admin token" in e.details()
    # The admin token passes the rule (version 7 is not in the store: refused for that, not for rights).
    e = refused(stack.policy.stub.GeneratePair, req, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
    assert e.code() != grpc.StatusCode.PERMISSION_DENIED
