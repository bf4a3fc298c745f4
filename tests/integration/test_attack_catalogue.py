"""A catalogue of bad inputs and attacks on the real policy and feedback services (gRPC and HTTP,
real Kafka): each gets its exact status and a message that names the problem, while another
caller's streamed answer, in flight when the attack is sent, finishes normally, and a good request
right after it succeeds. One row per attack; add a row for every new way in.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from flywheel.core.auth import AuthConfig
from flywheel.core.config import TopicsConfig
from flywheel.v1 import common_pb2, events_pb2, feedback_pb2, policy_pb2
from tests.integration.test_feedback_service import Service
from tests.integration.test_feedback_service import topics as topics  # noqa: F401 - module fixture
from tests.integration.test_policy_service import (
    ADMIN_TOKEN,
    HMAC_KEY,
    Running,
    fresh_topics,
    make_config,
    make_store,
    one_torch_thread,  # noqa: F401 - autouse fixture
    perturbed,
    slow_without_eos,
)
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

BYSTANDER_TOKENS = 120
OK, INVALID, DENIED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def policy(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("catalogue-policy")
    store = make_store(tmp / "store", slow_without_eos(tiny_starter()))  # answers run to their max tokens
    store.publish("policy", perturbed(tiny_starter(), 1), parent=0)  # v1: never gated
    config = make_config(kafka_bootstrap, fresh_topics(), tmp / "store", tmp / "state", max_new_tokens_cap=200)
    config.auth = AuthConfig(hmac_key=HMAC_KEY, admin_token=ADMIN_TOKEN)
    running = Running(config)
    yield running
    running.close()


@pytest.fixture(scope="module")
def feedback(kafka_bootstrap: str, topics: TopicsConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:  # noqa: F811
    svc = Service(
        kafka_bootstrap, topics.feedback, tmp_path_factory.mktemp("catalogue-feedback"), FLYWHEEL_HMAC_KEY=HMAC_KEY
    )
    yield svc
    svc.stop()


class Bystander:
    """Another caller's streamed answer: started (first token out) before an attack, it must finish
    with all its tokens and no error."""

    def __init__(self, policy: Running) -> None:
        self.tokens, self.final, self.error = 0, None, None
        self.first = threading.Event()
        request = policy_pb2.GenerateRequest(
            prompt="tell me a long story",
            user_id="bystander",
            params=common_pb2.SamplingParams(max_new_tokens=BYSTANDER_TOKENS),
        )
        self.thread = threading.Thread(target=self._read, args=(policy, request), daemon=True)
        self.thread.start()
        assert self.first.wait(60), "the bystander's answer did not start"

    def _read(self, policy: Running, request: policy_pb2.GenerateRequest) -> None:
        try:
            for msg in policy.stub.GenerateStream(request, timeout=120):
                self.tokens += 1
                self.first.set()
                if msg.HasField("final"):
                    self.final = msg.final
        except grpc.RpcError as e:
            self.error = e
            self.first.set()

    def finished_normally(self) -> bool:
        self.thread.join(120)
        assert self.error is None, self.error
        return self.final is not None and self.final.generated_tokens == BYSTANDER_TOKENS


@dataclasses.dataclass
class Ctx:
    """What an attack may use: the two services and real answers and pairs to give feedback on."""

    policy: Running
    feedback: Service

    def answer(self, user: str = "alice") -> policy_pb2.GenerateResponse:
        return self.policy.stub.Generate(gen("hi", user=user))

    def pair(self, user: str = "alice") -> policy_pb2.GeneratePairResponse:
        return self.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi", user=user)))

    def thumbs(self, user: str = "alice", **kw: Any) -> feedback_pb2.FeedbackRequest:
        a = self.answer(user)
        fields = {"feedback_id": uuid.uuid4().hex, "interaction_id": a.interaction_id, "user_id": user}
        return feedback_pb2.FeedbackRequest(**{**fields, "feedback_token": a.feedback_token, "thumbs": 1, **kw})

    def submit(self, req: feedback_pb2.FeedbackRequest) -> Any:
        return self.feedback.stub.Submit(req, timeout=30)


def gen(prompt: str, n: int = 2, user: str = "alice", **params: Any) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompt=prompt, user_id=user, params=common_pb2.SamplingParams(max_new_tokens=n, **params)
    )


def chat(*messages: tuple[str, str], prompt: str = "") -> policy_pb2.GenerateRequest:
    turns = [policy_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    return policy_pb2.GenerateRequest(prompt=prompt, messages=turns, user_id="alice")


def twice(ctx: Ctx, first: Callable[[Ctx], feedback_pb2.FeedbackRequest], change: dict[str, Any]) -> Any:
    """Submit a request, then the same with `change`: the second's outcome."""
    req = first(ctx)
    ctx.submit(req)
    again = feedback_pb2.FeedbackRequest()
    again.CopyFrom(req)
    for name, value in change.items():
        setattr(again, name, value)
    return ctx.submit(again)


def other_users_token(ctx: Ctx) -> feedback_pb2.FeedbackRequest:
    req = ctx.thumbs("alice")
    req.user_id = "mallory"  # alice's answer and token, mallory's name
    return req


def another_answers_token(ctx: Ctx) -> feedback_pb2.FeedbackRequest:
    req = ctx.thumbs("alice")
    req.feedback_token = ctx.answer("alice").feedback_token
    return req


def pair_token_on_an_answer(ctx: Ctx) -> feedback_pb2.FeedbackRequest:
    """A pair's token passed off as an answer's: thumbs on 'interaction' pair_id."""
    p = ctx.pair()
    return feedback_pb2.FeedbackRequest(
        feedback_id=uuid.uuid4().hex, interaction_id=p.pair_id, feedback_token=p.feedback_token,
        user_id="alice", thumbs=1,
    )  # fmt: skip


def answer_token_on_a_pair(ctx: Ctx) -> feedback_pb2.FeedbackRequest:
    """An answer's token passed off as a pair's: a preference on 'pair' interaction_id."""
    a = ctx.answer()
    return feedback_pb2.FeedbackRequest(
        feedback_id=uuid.uuid4().hex, pair_id=a.interaction_id, feedback_token=a.feedback_token,
        user_id="alice", preference=events_pb2.PREFERENCE_A,
    )  # fmt: skip


def preference(ctx: Ctx, value: int) -> feedback_pb2.FeedbackRequest:
    p = ctx.pair()
    return feedback_pb2.FeedbackRequest(
        feedback_id=uuid.uuid4().hex, pair_id=p.pair_id, feedback_token=p.feedback_token, user_id="alice",
        preference=value,
    )  # fmt: skip


def session(ctx: Ctx, user: str = "alice") -> tuple[tuple[str, str]]:
    """gRPC metadata with a session for `user` (minted with no key: none are configured here)."""
    s = ctx.feedback.stub.CreateSession(feedback_pb2.CreateSessionRequest(user_id=user), timeout=30)
    return (("authorization", f"Bearer {s.session}"),)


def tampered(ctx: Ctx) -> tuple[tuple[str, str]]:
    """A session for alice whose payload names mallory, under alice's signature."""
    (meta,) = session(ctx)
    head, payload, sig = meta[1].removeprefix("Bearer ").split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["u"] = "mallory"
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    return (("authorization", f"Bearer {head}.{body}.{sig}"),)


def as_session(ctx: Ctx, req: feedback_pb2.FeedbackRequest, user: str = "alice") -> Any:
    return ctx.feedback.stub.Submit(req, metadata=session(ctx, user), timeout=30)


# (name, call, expected gRPC status, a phrase the message must hold). A call returning a
# FeedbackResponse is checked for the SubmitStatus named by the phrase instead.
GRPC: list[tuple[str, Callable[[Ctx], Any], grpc.StatusCode, str]] = [
    # --- policy: Generate and GenerateStream
    ("empty prompt", lambda c: c.policy.stub.Generate(gen("")), INVALID, "prompt is empty"),
    ("prompt over max_prompt_chars", lambda c: c.policy.stub.Generate(gen("x" * 2500)), INVALID, "2500 characters"),
    ("prompt over max_input_tokens", lambda c: c.policy.stub.Generate(gen("word " * 300)), INVALID, "128 input tokens"),
    ("max_new_tokens over the cap", lambda c: c.policy.stub.Generate(gen("hi", n=201)), INVALID, "over the limit of 200"),
    ("temperature 1e-40", lambda c: c.policy.stub.Generate(gen("hi", temperature=1e-40, do_sample=True)), INVALID, "temperature"),
    ("temperature NaN", lambda c: c.policy.stub.Generate(gen("hi", temperature=float("nan"))), INVALID, "temperature"),
    ("temperature +inf", lambda c: c.policy.stub.Generate(gen("hi", temperature=float("inf"))), INVALID, "temperature"),
    ("temperature negative", lambda c: c.policy.stub.Generate(gen("hi", temperature=-1)), INVALID, "temperature"),
    ("temperature 1e6", lambda c: c.policy.stub.Generate(gen("hi", temperature=1e6)), INVALID, "temperature"),
    ("top_p 1.5", lambda c: c.policy.stub.Generate(gen("hi", top_p=1.5)), INVALID, "top_p"),
    ("top_p NaN", lambda c: c.policy.stub.Generate(gen("hi", top_p=float("nan"))), INVALID, "top_p"),
    ("top_p negative", lambda c: c.policy.stub.Generate(gen("hi", top_p=-0.5)), INVALID, "top_p"),
    ("top_k negative", lambda c: c.policy.stub.Generate(gen("hi", top_k=-1)), INVALID, "top_k"),
    ("top_k 2^31-1", lambda c: c.policy.stub.Generate(gen("hi", top_k=2**31 - 1)), INVALID, "top_k = 2147483647"),
    ("repetition_penalty 1e-45", lambda c: c.policy.stub.Generate(gen("hi", repetition_penalty=1e-45)), INVALID, "repetition_penalty"),
    ("repetition_penalty NaN", lambda c: c.policy.stub.Generate(gen("hi", repetition_penalty=float("nan"))), INVALID, "repetition_penalty"),
    ("repetition_penalty -inf", lambda c: c.policy.stub.Generate(gen("hi", repetition_penalty=float("-inf"))), INVALID, "repetition_penalty"),
    ("seed over 2^63-1", lambda c: c.policy.stub.Generate(gen("hi", seed=2**64 - 1)), INVALID, "seed"),
    ("17 stop strings", lambda c: c.policy.stub.Generate(gen("hi", stop=["s"] * 17)), INVALID, "17 stop sequences"),
    ("a 257-character stop string", lambda c: c.policy.stub.Generate(gen("hi", stop=["s" * 257])), INVALID, "stop"),
    ("a user_id of a megabyte to Generate", lambda c: c.policy.stub.Generate(gen("hi", user="u" * (1 << 20))), INVALID, "user_id has 1048576 characters"),
    ("prompt and messages", lambda c: c.policy.stub.Generate(chat(("user", "x"), prompt="hi")), INVALID, "not both"),
    ("unknown chat role", lambda c: c.policy.stub.Generate(chat(("robot", "x"))), INVALID, "role"),
    ("257 chat turns", lambda c: c.policy.stub.Generate(chat(*[("user", "x")] * 257)), INVALID, "257 messages"),
    ("chat over max_prompt_chars", lambda c: c.policy.stub.Generate(chat(*[("user", "x" * 500)] * 5)), INVALID, "characters"),
    ("bad sampling in a stream", lambda c: list(c.policy.stub.GenerateStream(gen("hi", top_p=2.0))), INVALID, "top_p"),
    # --- policy: GeneratePair
    ("candidate_version -1", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi"), candidate_version=-1)), INVALID, "candidate_version"),
    ("candidate_version 2^40", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi"), candidate_version=2**40)), INVALID, "candidate_version = 1099511627776"),
    ("ungated candidate without the admin token", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi"), candidate_version=1)), DENIED, "needs the admin token"),
    ("a pair with a bad request", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi", temperature=-3))), INVALID, "temperature"),
    # --- feedback: tokens
    ("no feedback token", lambda c: c.submit(c.thumbs(feedback_token="")), DENIED, "feedback_token is missing"),
    ("a forged token", lambda c: c.submit(c.thumbs(feedback_token="forged")), DENIED, "malformed feedback token"),
    ("a token of 10,000 characters", lambda c: c.submit(c.thumbs(feedback_token="A" * 10_000)), DENIED, "feedback token"),
    ("another user's token", lambda c: c.submit(other_users_token(c)), DENIED, "issued for another user"),
    ("another answer's token", lambda c: c.submit(another_answers_token(c)), DENIED, "issued for another answer"),
    ("a pair's token on an answer", lambda c: c.submit(pair_token_on_an_answer(c)), DENIED, "feedback token is a pair's"),
    ("an answer's token on a pair", lambda c: c.submit(answer_token_on_a_pair(c)), DENIED, "feedback token is an answer's"),
    # --- feedback: shape
    ("no feedback_id", lambda c: c.submit(c.thumbs(feedback_id="")), INVALID, "feedback_id is required"),
    ("feedback_id of 10,000 characters", lambda c: c.submit(c.thumbs(feedback_id="f" * 10_000)), INVALID, "feedback_id has 10000 characters"),
    ("no user_id", lambda c: c.submit(c.thumbs(user_id="")), INVALID, "user_id is required"),
    ("a user_id of a megabyte with feedback", lambda c: c.submit(c.thumbs(user_id="u" * (1 << 20))), INVALID, "user_id has 1048576 characters"),
    ("thumbs 0", lambda c: c.submit(c.thumbs(thumbs=0)), INVALID, "thumbs must be +1 (up) or -1 (down), got 0"),
    ("thumbs 2", lambda c: c.submit(c.thumbs(thumbs=2)), INVALID, "got 2"),
    ("rating 0", lambda c: c.submit(c.thumbs(rating=0)), INVALID, "rating must be an integer in 1..3, got 0"),
    ("rating 2^31-1", lambda c: c.submit(c.thumbs(rating=2**31 - 1)), INVALID, "rating must be"),
    ("rating -1", lambda c: c.submit(c.thumbs(rating=-1)), INVALID, "rating must be"),
    ("empty demonstration", lambda c: c.submit(c.thumbs(demonstration="")), INVALID, "demonstration is empty"),
    ("demonstration of a megabyte", lambda c: c.submit(c.thumbs(demonstration="d" * (1 << 20))), INVALID, "demonstration has"),
    ("comment of a megabyte", lambda c: c.submit(c.thumbs(comment="c" * (1 << 20))), INVALID, "comment has"),
    ("interaction_id and pair_id", lambda c: c.submit(c.thumbs(pair_id="p-1")), INVALID, "not both"),
    ("thumbs on a pair", lambda c: c.submit(feedback_pb2.FeedbackRequest(feedback_id="x", pair_id="p", feedback_token="t", user_id="a", thumbs=1)), INVALID, "about one answer"),
    ("preference on an answer", lambda c: c.submit(c.thumbs(preference=1)), INVALID, "about a pair"),
    ("preference UNSPECIFIED", lambda c: c.submit(preference(c, 0)), INVALID, "preference must be A, B or TIE"),
    ("preference enum 7", lambda c: c.submit(preference(c, 7)), INVALID, "preference must be A, B or TIE"),
    ("no value at all", lambda c: c.submit(feedback_pb2.FeedbackRequest(feedback_id="x", interaction_id="i", feedback_token="t", user_id="a")), INVALID, "no feedback value"),
    ("101 items in a batch", lambda c: c.feedback.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(items=[c.thumbs()] * 101)), INVALID, "1..100 items, got 101"),
    ("an empty batch", lambda c: c.feedback.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest()), INVALID, "got 0"),
    # --- sessions (core/sessions.py): a browser's credential, pinned to one user
    ("a session naming another user to Generate", lambda c: c.policy.stub.Generate(gen("hi", user="mallory"), metadata=session(c)), DENIED, "this session is for user 'alice', not 'mallory'"),
    ("a session naming another user to a stream", lambda c: list(c.policy.stub.GenerateStream(gen("hi", user="mallory"), metadata=session(c))), DENIED, "this session is for user 'alice'"),
    ("a session naming another user to a pair", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi", user="bob")), metadata=session(c)), DENIED, "this session is for user 'alice'"),
    ("a session giving feedback as another user", lambda c: as_session(c, c.thumbs("mallory")), DENIED, "this session is for user 'alice', not 'mallory'"),
    ("a session using another user's token", lambda c: as_session(c, c.thumbs("alice", user_id=""), user="mallory"), DENIED, "issued for another user"),
    ("a forged session", lambda c: c.policy.stub.Generate(gen("hi"), metadata=(("authorization", "Bearer fws1.forged"),)), UNAUTH, "malformed session"),
    ("a session with its user changed", lambda c: c.policy.stub.Generate(gen("hi", user=""), metadata=tampered(c)), UNAUTH, "session signature is invalid"),
    ("a session minting a session", lambda c: c.feedback.stub.CreateSession(feedback_pb2.CreateSessionRequest(user_id="eve"), metadata=session(c)), DENIED, "a session cannot mint sessions"),
    ("a session asking for an ungated candidate", lambda c: c.policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("hi", user=""), candidate_version=1), metadata=session(c)), DENIED, "needs the admin token"),
    ("a session living 25 hours", lambda c: c.feedback.stub.CreateSession(feedback_pb2.CreateSessionRequest(user_id="eve", ttl_s=90000)), INVALID, "ttl_s = 90000: use 1..86400 seconds"),
    ("a session for a megabyte user_id", lambda c: c.feedback.stub.CreateSession(feedback_pb2.CreateSessionRequest(user_id="u" * (1 << 20))), INVALID, "user_id has 1048576 characters"),
    # --- feedback: stuffing (answered, recorded once)
    ("the same feedback_id again", lambda c: twice(c, Ctx.thumbs, {}), OK, "SUBMIT_STATUS_DUPLICATE"),
    ("a second vote on one answer", lambda c: twice(c, Ctx.thumbs, {"feedback_id": uuid.uuid4().hex, "thumbs": -1}), OK, "SUBMIT_STATUS_ALREADY_VOTED"),
    ("a second preference on one pair", lambda c: twice(c, lambda c: preference(c, 1), {"feedback_id": uuid.uuid4().hex, "preference": 2}), OK, "SUBMIT_STATUS_ALREADY_VOTED"),
]  # fmt: skip

# (name, service, path, raw body, content type, expected HTTP status, a phrase of the error).
HTTP: list[tuple[str, str, str, bytes, str, int, str]] = [
    ("TGI: invalid UTF-8", "policy", "/generate", b'{"inputs": "caf\xe9"}', "application/json", 400, ""),
    ("TGI: 5,000-digit integer", "policy", "/generate", b'{"inputs": "hi", "parameters": {"top_k": ' + b"7" * 5000 + b"}}", "application/json", 400, ""),
    ("TGI: nested 100,000 deep", "policy", "/generate", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, ""),
    ("TGI: top_k 2^63", "policy", "/generate", b'{"inputs": "hi", "parameters": {"top_k": 9223372036854775808}}', "application/json", 422, "top_k"),
    ("TGI: temperature 1e-40", "policy", "/generate", b'{"inputs": "hi", "parameters": {"temperature": 1e-40}}', "application/json", 422, "temperature"),
    ("OpenAI: text/plain", "policy", "/v1/chat/completions", b'{"messages": []}', "text/plain", 415, ""),
    ("OpenAI: 300 chat turns", "policy", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}] * 300}).encode(), "application/json", 422, "300 messages"),
    ("feedback: truncated JSON", "feedback", "/feedback", b'{"feedback_id": "x", "thum', "application/json", 400, ""),
    ("feedback: unknown field", "feedback", "/feedback", b'{"feedback_id": "x", "stars": 5}', "application/json", 422, "unknown field"),
    ("sessions: unknown field", "feedback", "/sessions", b'{"user": "alice"}', "application/json", 422, "unknown field(s) 'user'"),
    ("sessions: ttl_s as a string", "feedback", "/sessions", b'{"user_id": "alice", "ttl_s": "60"}', "application/json", 422, "ttl_s must be an integer"),
    ("sessions: no user", "feedback", "/sessions", b'{"ttl_s": 60}', "application/json", 422, "user_id must be a non-empty string"),
    ("pair: candidate_version as a string", "policy", "/generate_pair", b'{"inputs": "hi", "candidate_version": "1"}', "application/json", 422, "candidate_version"),
    ("pair: streamed", "policy", "/generate_pair", b'{"inputs": "hi", "stream": true}', "application/json", 422, "unknown field(s) 'stream'"),
    ("feedback: forged token", "feedback", "/feedback", b'{"feedback_id": "x", "interaction_id": "i", "user_id": "u", "thumbs": 1, "feedback_token": "forged"}', "application/json", 403, "malformed feedback token"),
]  # fmt: skip


def test_the_catalogue_holds_at_least_sixty_attacks() -> None:
    assert len(GRPC) + len(HTTP) >= 60 and len({name for name, *_ in GRPC + HTTP}) == len(GRPC) + len(HTTP)


def good_request_succeeds(ctx: Ctx) -> None:
    assert ctx.answer("after").generated_tokens == 2
    assert ctx.submit(ctx.thumbs("after")).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED


@pytest.mark.parametrize(("name", "call", "code", "phrase"), GRPC, ids=[row[0] for row in GRPC])
def test_grpc_attack(
    policy: Running, feedback: Service, name: str, call: Callable[[Ctx], Any], code: grpc.StatusCode, phrase: str
) -> None:
    ctx = Ctx(policy, feedback)
    bystander = Bystander(policy)
    if code == OK:
        status = call(ctx).status
        assert feedback_pb2.SubmitStatus.Name(status) == phrase, (name, status)
    else:
        with pytest.raises(grpc.RpcError) as e:
            call(ctx)
        assert e.value.code() == code, (name, e.value.code(), e.value.details())
        assert phrase in e.value.details(), (name, e.value.details())
        assert "Traceback" not in e.value.details() and ".py" not in e.value.details()
    assert bystander.finished_normally(), name
    good_request_succeeds(ctx)


def test_a_batch_keeps_its_good_items_around_a_bad_one(policy: Running, feedback: Service) -> None:
    ctx = Ctx(policy, feedback)
    bystander = Bystander(policy)
    good = [ctx.thumbs(f"batch-{i}") for i in range(3)]
    items = [good[0], good[1], ctx.thumbs("batch-3", rating=9), good[2]]  # rating replaces thumbs: out of range
    out = feedback.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(items=items), timeout=30)
    assert [r.error_code or "OK" for r in out.results] == ["OK", "OK", "INVALID_ARGUMENT", "OK"]
    assert "rating must be an integer in 1..3, got 9" in out.results[2].error
    assert bystander.finished_normally()


@pytest.mark.parametrize(
    ("name", "service", "path", "raw", "ctype", "status", "phrase"), HTTP, ids=[r[0] for r in HTTP]
)
def test_http_attack(
    policy: Running,
    feedback: Service,
    name: str,
    service: str,
    path: str,
    raw: bytes,
    ctype: str,
    status: int,
    phrase: str,
) -> None:
    base = policy.http if service == "policy" else f"http://127.0.0.1:{feedback.http_port}"
    bystander = Bystander(policy)
    request = urllib.request.Request(base + path, data=raw, method="POST", headers={"Content-Type": ctype})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(e.value.read())
    assert e.value.code == status, (name, e.value.code, body)
    assert set(body) == {"error", "error_type"} and phrase in body["error"], (name, body)
    assert bystander.finished_normally(), name
    good_request_succeeds(Ctx(policy, feedback))
