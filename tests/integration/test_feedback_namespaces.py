"""API keys give each caller a namespace of end users: the policy and the feedback service, real
servers on real ports, on the real Apache Kafka broker.

Key b's answer for its user "bob" carries a token that only key b can use for feedback: key a,
sending the same token for its own "bob", is PERMISSION_DENIED; the events carry "b:bob"; key a's
bob spending his rate limit leaves b's bob his own. A second vote is ALREADY_VOTED here too.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig
from flywheel.v1 import events_pb2, feedback_pb2, policy_pb2
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
    read_topic,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
KEYS = "a:key-a-0123456789,b:key-b-0123456789"
A = (("authorization", "Bearer key-a-0123456789"),)
B = (("authorization", "Bearer key-b-0123456789"),)
SIGNER = AuthConfig(hmac_key=HMAC_KEY).signer()
S = feedback_pb2


class Both:
    """The policy (in this process) and the feedback service (a child), with the same keys."""

    def __init__(self, kafka_bootstrap: str, tmp: Path) -> None:
        self.topics = fresh_topics()
        bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), self.topics)
        make_store(tmp / "store")
        config = make_config(kafka_bootstrap, self.topics, tmp / "store", tmp / "state")
        config.auth = AuthConfig(hmac_key=HMAC_KEY, api_keys=KEYS.split(","))
        self.policy = Running(config)
        self.feedback = Service(
            kafka_bootstrap,
            self.topics.feedback,
            tmp,
            FLYWHEEL_HMAC_KEY=HMAC_KEY,
            FLYWHEEL_API_KEYS=KEYS,
            FLYWHEEL_FEEDBACK_USER_RATE="0.01",
            FLYWHEEL_FEEDBACK_USER_BURST="3",
        )

    def close(self) -> None:
        try:
            assert self.feedback.stop(signal.SIGTERM) == 0
        finally:
            self.policy.close()


@pytest.fixture(scope="module")
def both(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    running = Both(kafka_bootstrap, tmp_path_factory.mktemp("namespaces"))
    yield running
    running.close()


def thumbs(fid: str, user: str, iid: str, tok: str, **kw: int) -> feedback_pb2.FeedbackRequest:
    return S.FeedbackRequest(
        feedback_id=fid, interaction_id=iid, user_id=user, feedback_token=tok, **({"thumbs": 1} | kw)
    )


def refused(call, *args, **kw) -> grpc.RpcError:  # noqa: ANN001, ANN002, ANN003
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value


def test_a_token_from_key_b_is_refused_under_key_a(both: Both, kafka_bootstrap: str) -> None:
    bob = gen(PROMPTS[0])
    bob.user_id = "bob"
    answer = both.policy.stub.Generate(bob, metadata=B)
    iid, tok = answer.interaction_id, answer.feedback_token
    assert SIGNER.verify(tok, iid, "b:bob").user_id == "b:bob"  # bound to b's bob, not to any "bob"

    e = refused(both.feedback.stub.Submit, thumbs("f1", "bob", iid, tok), metadata=A)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.details() == "feedback token was issued for another user, not user_id 'a:bob'"
    assert refused(both.feedback.stub.Submit, thumbs("f1", "bob", iid, tok)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert both.feedback.stub.Submit(thumbs("f1", "bob", iid, tok), metadata=B).status == S.SUBMIT_STATUS_ACCEPTED
    second = thumbs("f2", "bob", iid, tok, thumbs=-1)
    assert both.feedback.stub.Submit(second, metadata=B).status == S.SUBMIT_STATUS_ALREADY_VOTED

    (interaction,) = read_topic(kafka_bootstrap, both.topics.interactions, events_pb2.Interaction, 1)
    assert (interaction.interaction_id, interaction.user_id) == (iid, "b:bob")
    got = read_feedback(kafka_bootstrap, both.topics.feedback, n=1)
    assert [(e.feedback_id, e.user_id, e.value) for _, e, _ in got] == [("f1", "b:bob", 1)]


def test_pairs_and_http_routes_bind_the_key_too(both: Both) -> None:
    req = policy_pb2.GeneratePairRequest(request=gen(PROMPTS[1], seed=3))
    req.request.user_id = "carl"
    pair = both.policy.stub.GeneratePair(req, metadata=B)

    def pref(fid: str, side: int) -> feedback_pb2.FeedbackRequest:
        return S.FeedbackRequest(
            feedback_id=fid, pair_id=pair.pair_id, user_id="carl", feedback_token=pair.feedback_token, preference=side
        )

    assert refused(both.feedback.stub.Submit, pref("p1", 1), metadata=A).code() == grpc.StatusCode.PERMISSION_DENIED
    assert both.feedback.stub.Submit(pref("p1", 1), metadata=B).status == S.SUBMIT_STATUS_ACCEPTED
    assert both.feedback.stub.Submit(pref("p2", 2), metadata=B).status == S.SUBMIT_STATUS_ALREADY_VOTED

    async def tgi(headers: dict[str, str]) -> tuple[int, dict, dict]:
        async with aiohttp.ClientSession() as http:
            body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 4}}
            async with http.post(both.policy.http + "/generate", json=body, headers=headers) as resp:
                return resp.status, await resp.json(), dict(resp.headers)

    status, answer, _ = asyncio.run(tgi({"authorization": "Bearer key-b-0123456789", "x-flywheel-user-id": "dora"}))
    assert status == 200
    body = {"feedback_id": "h1", "interaction_id": answer["interaction_id"], "user_id": "dora", "thumbs": 1}
    body["feedback_token"] = answer["feedback_token"]
    status, err, _ = both.feedback.http("POST", "/feedback", body, headers={"Authorization": "Bearer key-a-0123456789"})
    assert (status, err["error_type"]) == (403, "permission_denied") and "not user_id 'a:dora'" in err["error"]
    assert both.feedback.http("POST", "/feedback", body, headers={"Authorization": "Bearer key-b-0123456789"})[:2] == (
        200,
        {"feedback_id": "h1", "status": "accepted"},
    )


def test_one_keys_burst_does_not_rate_limit_anothers_same_named_user(both: Both) -> None:
    def mine(n: int, ns: str) -> feedback_pb2.FeedbackRequest:
        return thumbs(f"{ns}{n}", "eve", f"{ns}-answer-{n}", SIGNER.issue(f"{ns}-answer-{n}", 0, f"{ns}:eve"))

    for n in range(3):  # burst 3
        assert both.feedback.stub.Submit(mine(n, "a"), metadata=A).status == S.SUBMIT_STATUS_ACCEPTED
    e = refused(both.feedback.stub.Submit, mine(3, "a"), metadata=A)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit for user 'a:eve'" in e.details()
    assert both.feedback.stub.Submit(mine(0, "b"), metadata=B).status == S.SUBMIT_STATUS_ACCEPTED
