"""flywheel.client against the real services: a policy service (tiny model) and the feedback
service process on real ports, the real Kafka broker, API keys configured.

Every feedback helper is checked where it matters, on the feedback topic: the right kind, value,
user (in the key's namespace), answer and version. Retries are provoked for real: the feedback
service's per-user rate limit refuses a call with RESOURCE_EXHAUSTED and a retry-after hint, and
a real gRPC proxy in front of it forwards a Submit and then loses the answer (UNAVAILABLE), so the
client's retry reaches a service that already recorded it: the event is on the topic once.
The asyncio client, sessions and the demo panel (which talks through the client) run here too;
TLS is in test_client_tls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    InvalidArgument,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.brokers import free_port
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.loop.panel import Panel, PanelClient, PanelConfig, Persona
from flywheel.testing import wait_for
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc
from tests.integration import test_feedback_service as fs
from tests.integration.test_policy_service import Running, fresh_topics, make_config, make_store, one_torch_thread

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
_ = one_torch_thread  # the autouse fixture: one torch thread for the in-process policy

KEY_ENTRY = "app:client-test-key-0123456789"
API_KEY = KEY_ENTRY.split(":", 1)[1]
PROMPT, PROMPT2 = "how do I bake bread?", "where is my order?"
FAST = RetryPolicy(base_backoff_s=0.05, max_backoff_s=0.2)
K = events_pb2


@dataclasses.dataclass
class Stack:
    bootstrap: str
    topics: TopicsConfig
    policy: Running
    feedback: fs.Service

    def client(self, **kw: Any) -> Client:
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("retry", FAST)
        return Client(self.policy.grpc_addr, f"127.0.0.1:{self.feedback.grpc_port}", timeout_s=30, **kw)

    def events(self, ids: set[str], timeout_s: float = 30) -> dict[str, list[events_pb2.FeedbackEvent]]:
        """The feedback events with these feedback_ids, once all arrived (a list each: a second vote would show)."""
        got: dict[str, list[events_pb2.FeedbackEvent]] = {}

        def arrived() -> bool:
            got.clear()
            for _, event, _ in fs.read_topic(self.bootstrap, self.topics.feedback, 0, settle_s=1.0, timeout_s=5):
                if event.feedback_id in ids:
                    got.setdefault(event.feedback_id, []).append(event)
            return set(got) == ids

        wait_for(arrived, timeout_s, lambda: f"feedback events {sorted(ids - set(got))} on the topic", poll_s=0.2)
        return got


@contextlib.contextmanager
def running_stack(kafka_bootstrap: str, tmp: Path) -> Iterator[Stack]:
    """A policy (tiny model, in process) and the feedback service process, API key `app` configured."""
    topics = fresh_topics()
    bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), topics)
    make_store(tmp / "store")
    config = make_config(kafka_bootstrap, topics, tmp / "store", tmp / "state")
    config.auth = AuthConfig(hmac_key=fs.KEY, api_keys=[KEY_ENTRY])
    policy = Running(config)
    try:
        feedback = fs.Service(
            kafka_bootstrap,
            topics.feedback,
            tmp,
            FLYWHEEL_API_KEYS=KEY_ENTRY,
            FLYWHEEL_FEEDBACK_USER_RATE="0.5",  # a tiny per-user bucket: test_rate_limit_... runs into it
            FLYWHEEL_FEEDBACK_USER_BURST="6",
        )
        try:
            yield Stack(kafka_bootstrap, topics, policy, feedback)
        finally:
            feedback.stop(signal.SIGTERM)
    finally:
        policy.close()


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(kafka_bootstrap, tmp_path_factory.mktemp("client")) as s:
        yield s


def test_answers_and_every_feedback_helper_reach_the_topic(stack: Stack) -> None:
    with stack.client() as c:
        a = c.generate(PROMPT, "alice", max_new_tokens=8, logprobs=True)
        assert a.text and len(a.interaction_id) == 32 and a.policy_version == 0 and a.user_id == "alice"
        assert a.feedback_token and a.finish_reason in ("length", "eos_token", "stop_sequence")
        assert len(a.tokens) == a.generated_tokens > 0 and all(t.logprob <= 0 for t in a.tokens)

        chunks = list(c.stream(PROMPT, "alice", max_new_tokens=8))
        final = chunks[-1].answer
        assert final is not None and all(ch.answer is None for ch in chunks[:-1])
        assert "".join(ch.text for ch in chunks) == final.text == a.text  # greedy: the same answer
        assert final.interaction_id != a.interaction_id and final.user_id == "alice"

        chat = c.generate([{"role": "user", "content": PROMPT}], "alice", max_new_tokens=8)
        assert chat.text == a.text  # the starter's chat template renders one user turn as the raw prompt

        pair = c.generate_pair(PROMPT2, "alice", max_new_tokens=8, do_sample=True, temperature=1.0, seed=3)
        assert pair.pair_id and pair.a.interaction_id != pair.b.interaction_id and pair.feedback_token
        assert pair.a.policy_version == pair.b.policy_version == 0

        got = {
            "thumbs": c.thumbs(a, up=False, comment="too short"),
            "rating": c.rate(final, 3),
            "preference": c.prefer(pair, "b", comment="B reads better"),
            "demonstration": c.demonstrate(a, "Mix flour, water, salt and yeast; bake at 230 C."),
        }
        assert all(r.status == "accepted" and r.attempts == 1 and r.counted for r in got.values()), got
        again = c.thumbs(a, up=True)  # the same user's second thumbs on that answer: the first counts
        assert again.status == "already_voted" and not again.counted

    events = stack.events({r.feedback_id for r in got.values()})
    assert all(len(v) == 1 for v in events.values())
    ev = {kind: events[r.feedback_id][0] for kind, r in got.items()}
    assert all(e.user_id == "app:alice" and e.policy_version == 0 for e in ev.values())  # the key's namespace
    t, r, p, d = ev["thumbs"], ev["rating"], ev["preference"], ev["demonstration"]
    assert (t.kind, t.value, t.interaction_id, t.comment) == (K.FEEDBACK_KIND_THUMBS, -1, a.interaction_id, "too short")
    assert (r.kind, r.value, r.rating_scale, r.interaction_id) == (K.FEEDBACK_KIND_RATING, 3, 3, final.interaction_id)
    assert (p.kind, p.preference, p.pair_id, p.interaction_id) == (
        K.FEEDBACK_KIND_PREFERENCE,
        K.PREFERENCE_B,
        pair.pair_id,
        "",
    )
    assert d.kind == K.FEEDBACK_KIND_DEMONSTRATION and d.demonstration.startswith("Mix flour")


def test_own_feedback_id_and_errors_carry_the_servers_words(stack: Stack) -> None:
    with stack.client() as c:
        a = c.generate(PROMPT, "erin", max_new_tokens=4)
        first = c.thumbs(a, up=True, feedback_id="erin-vote-1")
        assert (first.feedback_id, first.status) == ("erin-vote-1", "accepted")
        assert c.thumbs(a, up=True, feedback_id="erin-vote-1").status == "duplicate"  # not a retry: said as is

        with pytest.raises(InvalidArgument) as bad:
            c.rate(a, 7)
        assert "rating must be an integer in 1..3" in bad.value.message and bad.value.feedback_id
        with pytest.raises(PermissionDenied) as denied:  # an answer served to erin, claimed by mallory
            c.thumbs(dataclasses.replace(a, user_id="mallory"), up=True)
        assert "issued for another user" in denied.value.message
        with pytest.raises(InvalidArgument) as big:
            c.generate(PROMPT, "erin", max_new_tokens=10_000)
        assert big.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in big.value.message
        with pytest.raises(TypeError, match="takes the Pair"):
            c.prefer(a, "A")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match='"A", "B" or "TIE"'):
            c.prefer(c.generate_pair(PROMPT, "erin", max_new_tokens=4), "C")  # type: ignore[arg-type]

    with stack.client(api_key=None) as anonymous, pytest.raises(Unauthenticated) as e:
        anonymous.generate(PROMPT, "erin")
    assert "an API key is required" in e.value.message
    with stack.client(api_key="not-a-key") as wrong, pytest.raises(Unauthenticated) as e:
        wrong.thumbs(a, up=True)
    assert "unknown API key" in e.value.message

    nobody = f"127.0.0.1:{free_port()}"
    with Client(nobody, nobody, retry=RetryPolicy(max_attempts=3, base_backoff_s=0.01)) as dead:
        with pytest.raises(Unavailable) as down:
            dead.generate(PROMPT, "erin")
    assert down.value.attempts == 3


def test_rate_limit_retry_honours_retry_after_and_keeps_the_feedback_id(stack: Stack) -> None:
    with stack.client() as c, stack.client(retry=NO_RETRY) as once:
        a = c.generate(PROMPT, "bob", max_new_tokens=4)
        refused = None
        for _ in range(20):  # bob's bucket holds 6: thumbs until the service refuses one
            try:
                once.thumbs(a, up=True)
            except RateLimited as e:
                refused = e
                break
        assert refused is not None, "the per-user rate limit never refused"
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.attempts == 1
        assert refused.retry_after_s is not None and refused.retry_after_s >= 1  # the server's hint, whole seconds
        assert refused.feedback_id and "rate" in refused.message

        receipt = c.rate(a, 2)  # refused too (the bucket is empty), then retried after the hint
    assert receipt.status == "accepted" and receipt.attempts >= 2
    (event,) = stack.events({receipt.feedback_id})[receipt.feedback_id]  # one event however many attempts
    assert (event.kind, event.value, event.user_id) == (K.FEEDBACK_KIND_RATING, 2, "app:bob")


class LossyProxy:
    """A real gRPC server in front of the feedback service: it forwards every Submit, and for the
    first `drop` of them loses the answer on the way back (UNAVAILABLE), like a connection cut
    after the request was sent. What the service answered each attempt is kept in `seen`."""

    def __init__(self, target: str, drop: int = 1) -> None:
        self.drop, self.seen = drop, []  # type: list[tuple[str, str]]
        self.channel = grpc.insecure_channel(target)
        self.stub = feedback_pb2_grpc.FeedbackStub(self.channel)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(
            self.submit,
            request_deserializer=feedback_pb2.FeedbackRequest.FromString,
            response_serializer=feedback_pb2.FeedbackResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("flywheel.v1.Feedback", {"Submit": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def submit(self, req: feedback_pb2.FeedbackRequest, context: grpc.ServicerContext) -> Any:
        auth = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        resp = self.stub.Submit(req, metadata=auth, timeout=10)
        self.seen.append((req.feedback_id, feedback_pb2.SubmitStatus.Name(resp.status)))
        if len(self.seen) <= self.drop:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the request was sent (test proxy)")
        return resp

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()


def test_a_retry_after_a_lost_answer_is_not_a_second_vote(stack: Stack) -> None:
    proxy = LossyProxy(f"127.0.0.1:{stack.feedback.grpc_port}")
    try:
        with stack.client() as c:
            a = c.generate(PROMPT2, "carol", max_new_tokens=4)
        with Client(stack.policy.grpc_addr, proxy.address, api_key=API_KEY, retry=FAST) as through:
            receipt = through.thumbs(a, up=True)
    finally:
        proxy.close()
    fid = receipt.feedback_id
    # the service recorded the first attempt, and told the retry (same feedback_id) it was a duplicate
    assert proxy.seen == [(fid, "SUBMIT_STATUS_ACCEPTED"), (fid, "SUBMIT_STATUS_DUPLICATE")]
    assert (receipt.status, receipt.attempts) == ("accepted", 2)  # the duplicate is the first attempt's success
    (event,) = stack.events({fid})[fid]
    assert event.value == 1 and event.user_id == "app:carol"


def test_sessions_pin_the_user(stack: Stack) -> None:
    with stack.client() as app:
        before = int(time.time())
        s = app.create_session("dave", ttl_s=600)
    assert s.session.startswith("fws1.") and s.user_id == "dave" and before + 590 <= s.expires_at <= before + 610
    with stack.client(api_key=s.session) as browser:
        a = browser.generate(PROMPT, "dave", max_new_tokens=4)
        receipt = browser.thumbs(a, up=True)
        with pytest.raises(PermissionDenied) as other:
            browser.generate(PROMPT, "eve", max_new_tokens=4)
        assert "this session is for user" in other.value.message
    (event,) = stack.events({receipt.feedback_id})[receipt.feedback_id]
    assert event.user_id == "app:dave"  # the session acts as its key, with the user pinned


def test_async_client(stack: Stack) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncClient(
            stack.policy.grpc_addr, f"127.0.0.1:{stack.feedback.grpc_port}", api_key=API_KEY, retry=FAST
        ) as c:
            a = await c.generate(PROMPT, "frank", max_new_tokens=8)
            chunks = [ch async for ch in c.stream(PROMPT, "frank", max_new_tokens=8)]
            final = chunks[-1].answer
            assert final is not None and "".join(ch.text for ch in chunks) == final.text == a.text
            pair = await c.generate_pair(PROMPT2, "frank", max_new_tokens=8)
            receipts = await asyncio.gather(
                c.thumbs(a, up=True), c.rate(final, 1), c.prefer(pair, "TIE"), c.demonstrate(a, "Preheat the oven.")
            )
            session = await c.create_session("frank")
            async with AsyncClient(stack.policy.grpc_addr, api_key="wrong") as bad:
                with pytest.raises(Unauthenticated) as refused:
                    await bad.generate(PROMPT, "frank")
            return a, final, pair, receipts, session, refused

    a, final, pair, receipts, session, refused = asyncio.run(main())
    assert all(r.status == "accepted" for r in receipts) and session.user_id == "frank"
    assert "unknown API key" in refused.value.message
    events = stack.events({r.feedback_id for r in receipts})
    t, r, p, d = (events[x.feedback_id][0] for x in receipts)
    assert (t.kind, t.value, t.interaction_id) == (K.FEEDBACK_KIND_THUMBS, 1, a.interaction_id)
    assert (r.kind, r.value, r.interaction_id) == (K.FEEDBACK_KIND_RATING, 1, final.interaction_id)
    assert (p.kind, p.preference, p.pair_id) == (K.FEEDBACK_KIND_PREFERENCE, K.PREFERENCE_TIE, pair.pair_id)
    assert (d.kind, d.demonstration) == (K.FEEDBACK_KIND_DEMONSTRATION, "Preheat the oven.")
    assert {e.user_id for v in events.values() for e in v} == {"app:frank"}


def test_the_demo_panel_gives_feedback_through_the_client(stack: Stack) -> None:
    strict = Persona("strict", {"polite": 1, "rude": -2, "concise": 1, "on_topic": 2, "closing": 0.5}, 0.0, 0.0)
    cfg = PanelConfig(prompts=[PROMPT], max_new_tokens=8)
    panel = PanelClient(Panel([strict]), cfg, stack.client())
    rng = random.Random(0)
    for kind in ("pair", "thumbs", "rating", "demonstration"):
        panel.cfg.mix = {kind: 1.0}
        panel.one(rng)
    panel.close()
    assert panel.events == 4 and panel.by_kind == dict.fromkeys(("pair", "thumbs", "rating", "demonstration"), 1)
    mine: list[events_pb2.FeedbackEvent] = []

    def arrived() -> bool:
        records = fs.read_topic(stack.bootstrap, stack.topics.feedback, 0, settle_s=1.0, timeout_s=5)
        mine[:] = [e for _, e, _ in records if e.user_id.startswith("app:strict-")]
        return len(mine) >= 4

    wait_for(arrived, 30, "the panel's 4 feedback events", poll_s=0.2)
    kinds = sorted(K.FeedbackKind.Name(e.kind) for e in mine)
    assert kinds == sorted(f"FEEDBACK_KIND_{k}" for k in ("PREFERENCE", "THUMBS", "RATING", "DEMONSTRATION"))
    assert all(e.policy_version == 0 and e.feedback_id for e in mine) and len({e.feedback_id for e in mine}) == 4


def test_retry_policy_waits() -> None:
    """The waits themselves (no service needed): the hint plus jitter, capped backoff, and when to stop."""
    policy, rng = RetryPolicy(max_attempts=4, base_backoff_s=0.5, max_backoff_s=2.0, jitter=0.5), random.Random(0)
    busy, down = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE
    assert policy.delay_s(1, grpc.StatusCode.INVALID_ARGUMENT, None, rng) is None  # never retried
    assert policy.delay_s(1, grpc.StatusCode.DEADLINE_EXCEEDED, None, rng) is None
    assert policy.delay_s(4, down, None, rng) is None  # the 4th attempt was the last
    waits = [policy.delay_s(n, down, None, rng) for n in (1, 2, 3) for _ in range(50)]
    assert all(w is not None for w in waits)
    assert 0.25 <= min(waits[:50]) and max(waits[:50]) <= 0.5  # base, shortened by up to half
    assert 1.0 <= min(waits[100:]) and max(waits[100:]) <= 2.0  # 0.5 * 4 = 2: the cap
    hinted = [policy.delay_s(1, busy, 3.0, rng) for _ in range(50)]
    assert all(h is not None and 3.0 <= h <= 3.25 for h in hinted)  # the server's hint, never less
    assert policy.delay_s(1, busy, 31.0, rng) is None  # longer than max_retry_after_s: raised at once
    with pytest.raises(ValueError, match="max_attempts = 0: use 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="base_backoff_s <= max_backoff_s"):
        RetryPolicy(base_backoff_s=3, max_backoff_s=1)
