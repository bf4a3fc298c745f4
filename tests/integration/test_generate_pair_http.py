"""`POST /generate_pair` on the policy's HTTP port: GeneratePair over HTTP, through the same
PolicyService.pair as gRPC. The answer's shape and tokens, its interactions on the topic, TGI's
validation and error bodies, the same messages as gRPC for the same mistakes, and the candidate
rule (another version needs the admin token; with it, a candidate from the store answers side B)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import requests

from flywheel.core.auth import AuthConfig
from flywheel.v1 import events_pb2, policy_pb2
from tests.integration.test_policy_service import (
    ADMIN_TOKEN,
    HMAC_KEY,
    PROMPTS,
    SIGNER,
    Running,
    fresh_topics,
    gen,
    make_config,
    make_store,
    one_torch_thread,  # noqa: F401 - autouse fixture
    perturbed,
    read_topic,
)
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def policy(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("pair_http")
    store = make_store(tmp / "store")
    store.publish("policy", perturbed(tiny_starter(), 1), parent=0)  # v1: a candidate
    topics = fresh_topics()
    config = make_config(kafka_bootstrap, topics, tmp / "store", tmp / "state")
    config.auth = AuthConfig(hmac_key=HMAC_KEY, admin_token=ADMIN_TOKEN)
    running = Running(config)
    running.topics = topics  # type: ignore[attr-defined]
    yield running
    running.close()


def pair(policy: Running, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(f"{policy.http}/generate_pair", json=body, headers=headers, timeout=60)


def test_a_pair_over_http(policy: Running, kafka_bootstrap: str) -> None:
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 8, "seed": 7}}
    r = pair(policy, body, **{"x-flywheel-user-id": "u9"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"pair_id", "feedback_token", "a", "b"}
    assert SIGNER.verify(got["feedback_token"], got["pair_id"], "u9", kind="pair").policy_version == 0
    for side in ("a", "b"):
        s = got[side]
        assert {"generated_text", "interaction_id", "policy_version", "finish_reason"} <= set(s)
        assert s["policy_version"] == 0 and s["finish_reason"] in ("length", "eos_token", "stop_sequence")
        SIGNER.verify(s["feedback_token"], s["interaction_id"], "u9")  # each answer can be rated on its own
    assert got["a"]["interaction_id"] != got["b"]["interaction_id"]

    topic = policy.topics.interactions  # type: ignore[attr-defined]
    sides = {
        (i.pair_id, i.pair_side, i.interaction_id, i.user_id)
        for i in read_topic(kafka_bootstrap, topic, events_pb2.Interaction, 2)
    }
    ids = got["pair_id"], got["a"]["interaction_id"], got["b"]["interaction_id"]
    assert sides == {(ids[0], "A", ids[1], "u9"), (ids[0], "B", ids[2], "u9")}

    # The candidate rule: another version needs the admin token; with it, side B is that version.
    r = pair(policy, body | {"candidate_version": 1})
    assert r.status_code == 403 and r.json()["error_type"] == "permission_denied"
    assert "candidate_version = 1 needs the admin token" in r.json()["error"]
    r = pair(policy, body | {"candidate_version": 1}, **ADMIN)
    assert r.status_code == 200 and (r.json()["a"]["policy_version"], r.json()["b"]["policy_version"]) == (0, 1)
    assert pair(policy, body | {"candidate_version": 0}).status_code == 200  # the serving one: anyone


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"parameters": {}}, "`inputs` must be a string"),
        ({"inputs": " "}, "`inputs` cannot be empty"),
        ({"inputs": "hi", "stream": True}, "unknown field(s) 'stream' in the request: the fields are inputs, param"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "`top_p` must be > 0.0 and < 1.0"),
        ({"inputs": "hi", "parameters": {"bogus": 1}}, "unknown field(s) 'bogus' in parameters"),
        ({"inputs": "hi", "candidate_version": "1"}, '`candidate_version` must be an integer, got "1"'),
        ({"inputs": "hi", "candidate_version": True}, "`candidate_version` must be an integer"),
        ({"inputs": "hi", "candidate_version": -1}, "candidate_version = -1: use a model-store version"),
    ],
)
def test_bad_bodies_are_422_with_the_fix(policy: Running, body: dict[str, Any], why: str) -> None:
    r = pair(policy, body)
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert why in r.json()["error"], r.json()


def test_the_same_mistakes_get_the_same_messages_as_grpc(policy: Running) -> None:
    """Past the JSON's shape, both go through PolicyService.pair: the words are the same."""
    cases = [
        ({"max_new_tokens": 10_000}, gen(PROMPTS[0], 10_000)),
        ({"temperature": 200.0}, gen(PROMPTS[0], 8, temperature=200.0)),  # a float32 value exactly
    ]
    for params, msg in cases:
        with pytest.raises(grpc.RpcError) as e:
            policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=msg))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        r = pair(policy, {"inputs": PROMPTS[0], "parameters": params}, **{"x-flywheel-user-id": "u1"})
        assert r.status_code == 422 and r.json()["error"] == e.value.details(), (r.json(), e.value.details())
    long_user = "u" * 300
    r = pair(policy, {"inputs": "hi"}, **{"x-flywheel-user-id": long_user})
    assert r.status_code == 422 and "user_id has 300 characters" in r.json()["error"]
