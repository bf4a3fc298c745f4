"""Malformed input against the real services: every JSON route of the policy (TGI, OpenAI and
/generate_pair) and of the feedback service (/feedback, /sessions) answers a precise 4xx, never a 5xx, and serves the next good request; an
unknown enum number in a SubmitBatch fails its item only; random bodies (hypothesis) never get a
5xx. The policy runs in-process with the tiny model, the feedback service as its own process.
"""

from __future__ import annotations

import collections
import gzip
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.core.config import TopicsConfig
from flywheel.v1 import events_pb2, feedback_pb2
from tests.integration.test_feedback_service import Service, token
from tests.integration.test_feedback_service import topics as topics  # noqa: F401 - module fixture
from tests.integration.test_policy_service import (
    Running,
    fresh_topics,
    make_config,
    make_store,
    one_torch_thread,  # noqa: F401 - autouse fixture
)
from tests.unit.test_fuzz_validators import mutated_json, objects, off_by_some

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

JSON = {"Content-Type": "application/json"}
FEEDBACK_LIMIT_MB = 1


@pytest.fixture(scope="module")
def policy(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("robust-policy")
    make_store(tmp / "store")
    running = Running(make_config(kafka_bootstrap, fresh_topics(), tmp / "store", tmp / "state"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def feedback(kafka_bootstrap: str, topics: TopicsConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:  # noqa: F811
    svc = Service(
        kafka_bootstrap,
        topics.feedback,
        tmp_path_factory.mktemp("robust-feedback"),
        FLYWHEEL_SERVER_MAX_HTTP_BODY_MB=str(FEEDBACK_LIMIT_MB),
    )
    yield svc
    assert svc.stop(signal.SIGTERM) == 0
    log = Path(svc.log.name).read_text()
    # No input made the service fail inside (aiohttp itself logs the corrupt gzip it refused).
    assert "failed (reference" not in log, log[-3000:]


def good_feedback() -> dict[str, Any]:
    iid, user = f"i-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    return {"feedback_id": uuid.uuid4().hex, "interaction_id": iid, "user_id": user, "thumbs": 1} | {
        "feedback_token": token(iid, user)
    }


# Route -> a good body (tiny: one new token). Streams are read to their end.
POLICY_ROUTES = {
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/generate_pair": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
}
FEEDBACK_ROUTES = ("/feedback", "/sessions")
BOMB = gzip.compress(b" " * (40 << 20))  # 40 MiB of JSON whitespace in 40 KiB: over any body limit once inflated

# (what, body bytes, extra headers (None: drop Content-Type), expected status). Each runs on every route.
MALFORMED: list[tuple[str, bytes, dict[str, str] | None, int]] = [
    ("no content-type", b'{"inputs": "hi"}', None, 415),
    ("text/plain", b'{"inputs": "hi"}', {"Content-Type": "text/plain"}, 415),
    ("form", b"inputs=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("unknown charset", b"{}", {"Content-Type": "application/json; charset=klingon"}, 415),
    ("latin-1 charset", b'{"inputs": "caf\xe9"}', {"Content-Type": "application/json; charset=iso-8859-1"}, 415),
    ("invalid utf-8", b'{"inputs": "caf\xe9"}', JSON, 400),
    ("overlong utf-8", b'{"inputs": "\xc0\xaf"}', JSON, 400),
    ("utf-16", '{"inputs": "hi"}'.encode("utf-16"), JSON, 400),
    ("empty", b"", JSON, 400),
    ("truncated", b'{"inputs": "hi", "parameters": {"max_new_tok', JSON, 400),
    ("trailing data", b'{"inputs": "hi"} {}', JSON, 400),
    ("single quotes", b"{'inputs': 'hi'}", JSON, 400),
    ("NaN", b'{"inputs": "hi", "x": NaN}', JSON, 400),
    ("Infinity", b'{"inputs": "hi", "x": -Infinity}', JSON, 400),
    ("1e999", b'{"inputs": "hi", "x": 1e999}', JSON, 400),
    ("5,000-digit integer", b'{"inputs": "hi", "x": ' + b"7" * 5000 + b"}", JSON, 400),
    ("nested 33 deep", b'{"a":' * 33 + b"1" + b"}" * 33, JSON, 400),
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, JSON, 400),
    ("lone surrogate", b'{"inputs": "\\ud800"}', JSON, 400),
    ("corrupt gzip", b"not gzip at all", {**JSON, "Content-Encoding": "gzip"}, 400),
    ("gzip bomb", BOMB, {**JSON, "Content-Encoding": "gzip"}, 413),
    ("top-level list", b'["hi"]', JSON, 422),
    ("top-level string", b'"hi"', JSON, 422),
    ("top-level null", b"null", JSON, 422),
]
# A field of the wrong type, per route: 422 naming the field.
WRONG_TYPE = {
    "/generate": ({"inputs": ["hi"]}, "`inputs` must be a string"),
    "/generate_stream": ({"inputs": "hi", "parameters": {"top_k": "ten"}}, "`top_k` must be an integer"),
    "/": ({"inputs": "hi", "parameters": []}, "`parameters` must be a JSON object"),
    "/v1/completions": ({"prompt": "hi", "stream_options": 1}, "`stream_options` must be an object"),
    "/v1/chat/completions": ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role must be"),
    "/generate_pair": ({"inputs": "hi", "candidate_version": 2**70}, "candidate_version = 1180591620717411303424"),
    "/feedback": ({"feedback_id": {"a": 1}}, "feedback_id must be a string, got an object"),
    "/sessions": ({"user_id": "u", "ttl_s": "1h"}, "ttl_s must be an integer number of seconds"),
}


def post(session: requests.Session, url: str, raw: bytes, headers: dict[str, str] | None) -> requests.Response:
    return session.post(url, data=raw, headers=headers or {}, timeout=30)  # bytes alone: no Content-Type


def assert_refused(r: requests.Response, status: int, what: str) -> None:
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error"], body
    assert "Traceback" not in body["error"] and ".py" not in body["error"], body


def good_body(route: str) -> dict[str, Any]:
    if route == "/feedback":
        return good_feedback()
    if route == "/sessions":
        return {"user_id": f"u-{uuid.uuid4().hex[:8]}", "ttl_s": 60}
    return POLICY_ROUTES[route]


def assert_good(session: requests.Session, base: str, route: str) -> None:
    r = session.post(base + route, json=good_body(route), timeout=30)
    assert r.status_code == 200, (route, r.status_code, r.text[:300])
    if route == "/feedback":
        assert r.json()["status"] == "accepted"
    elif route == "/sessions":
        assert r.json()["session"].startswith("fws1.")
    elif "stream" in route:
        assert b"feedback_token" in r.content and b'"error"' not in r.content, r.content[-300:]
    else:
        assert "feedback_token" in r.text


@pytest.mark.parametrize("route", [*POLICY_ROUTES, *FEEDBACK_ROUTES])
def test_malformed_bodies_are_4xx_and_the_next_request_is_served(
    route: str, policy: Running, feedback: Service
) -> None:
    base = f"http://127.0.0.1:{feedback.http_port}" if route in FEEDBACK_ROUTES else policy.http
    cases = [*MALFORMED, ("wrong field type", json.dumps(WRONG_TYPE[route][0]).encode(), JSON, 422)]
    if route == "/feedback":  # its limit is 1 MiB here: a plain body over it, announced or chunked
        big = b'{"comment": "' + b"x" * (FEEDBACK_LIMIT_MB << 20) + b'"}'
        cases.append(("over the limit", big, JSON, 413))
    with requests.Session() as session:
        for what, raw, headers, status in cases:
            r = post(session, base + route, raw, headers)
            assert_refused(r, status, what)
            assert_good(session, base, route)
    r = requests.post(base + route, json=WRONG_TYPE[route][0], timeout=30)
    assert WRONG_TYPE[route][1] in r.json()["error"], r.json()


def test_chunked_body_over_the_limit_is_413(feedback: Service) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"comment": "'
        for _ in range(FEEDBACK_LIMIT_MB * 16 + 1):
            yield b"x" * (64 << 10)
        yield b'"}'

    base = f"http://127.0.0.1:{feedback.http_port}"
    r = requests.post(base + "/feedback", data=chunks(), headers=JSON, timeout=30)
    assert_refused(r, 413, "chunked")
    assert "over the limit of 1048576 bytes" in r.json()["error"]
    with requests.Session() as session:
        assert_good(session, base, "/feedback")


def test_submit_batch_refuses_only_the_unknown_enum_item(feedback: Service) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"

    def pair(fid: str, preference: int) -> feedback_pb2.FeedbackRequest:
        pid = f"pair-{fid}"
        return feedback_pb2.FeedbackRequest(
            feedback_id=fid,
            pair_id=pid,
            user_id=user,
            feedback_token=token(pid, user, kind="pair"),
            preference=preference,
        )

    ok1, odd, ok2 = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    items = [pair(ok1, events_pb2.PREFERENCE_A), pair(odd, 7), pair(ok2, events_pb2.PREFERENCE_TIE)]
    out = feedback.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(items=items), timeout=20)
    got = [(r.response.feedback_id, r.response.status, r.error_code) for r in out.results]
    assert got == [
        (ok1, feedback_pb2.SUBMIT_STATUS_ACCEPTED, ""),
        (odd, feedback_pb2.SUBMIT_STATUS_UNSPECIFIED, "INVALID_ARGUMENT"),
        (ok2, feedback_pb2.SUBMIT_STATUS_ACCEPTED, ""),
    ]
    assert out.results[1].error == (
        "preference must be A, B or TIE, got 7, which is not a Preference value: "
        "send PREFERENCE_A (1), PREFERENCE_B (2) or PREFERENCE_TIE (3)"
    )
    with pytest.raises(grpc.RpcError) as e:  # the same item alone: INVALID_ARGUMENT, not INTERNAL
        feedback.stub.Submit(pair(uuid.uuid4().hex, 99), timeout=20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 99, which is not" in e.value.details()


# ---------------------------------------------------------------------------- random bodies, real servers

LIVE = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FEEDBACK_BODIES = st.one_of(
    st.binary(max_size=200),
    mutated_json(),
    objects(("feedback_id", "interaction_id", "pair_id", "feedback_token", "user_id", "thumbs", "rating")).map(
        lambda v: json.dumps(v).encode()
    ),
    off_by_some(good_feedback(), ["feedback_id", "thumbs", "rating", "preference", "comment", "user_id"]).map(
        lambda v: json.dumps(v).encode()
    ),
    st.text(max_size=40).map(lambda c: json.dumps(good_feedback() | {"comment": c}).encode()),
)


def test_random_bodies_never_get_a_5xx_from_feedback(feedback: Service) -> None:
    base = f"http://127.0.0.1:{feedback.http_port}/feedback"
    session = requests.Session()
    seen: collections.Counter[int] = collections.Counter()

    @LIVE
    @given(FEEDBACK_BODIES)
    def never_5xx(raw: bytes) -> None:
        r = session.post(base, data=raw, headers=JSON, timeout=30)
        seen[r.status_code] += 1
        assert r.status_code < 500, (raw[:200], r.status_code, r.text[:300])

    with session:
        never_5xx()
        assert sum(seen.values()) >= 100 and seen[400] and seen[422] and seen[200], seen  # every layer reached
        assert_good(session, f"http://127.0.0.1:{feedback.http_port}", "/feedback")


SESSION_BODIES = st.one_of(
    st.binary(max_size=100),
    mutated_json(),
    objects(("user_id", "ttl_s")).map(lambda v: json.dumps(v).encode()),
    off_by_some({"user_id": "u-1", "ttl_s": 60}, ["user_id", "ttl_s"]).map(lambda v: json.dumps(v).encode()),
)


def test_random_bodies_never_get_a_5xx_from_sessions(feedback: Service) -> None:
    base = f"http://127.0.0.1:{feedback.http_port}"
    session = requests.Session()
    seen: collections.Counter[int] = collections.Counter()

    @LIVE
    @given(SESSION_BODIES)
    def never_5xx(raw: bytes) -> None:
        r = session.post(base + "/sessions", data=raw, headers=JSON, timeout=30)
        seen[r.status_code] += 1
        assert r.status_code < 500, (raw[:200], r.status_code, r.text[:300])

    with session:
        never_5xx()
        assert sum(seen.values()) >= 100 and seen[400] and seen[422], seen
        assert_good(session, base, "/sessions")


POLICY_BODIES = st.tuples(
    st.sampled_from([r for r in POLICY_ROUTES if r != "/generate_pair"]),  # pairs: PAIR_BODIES
    st.one_of(
        st.binary(max_size=100),
        mutated_json(),
        off_by_some(POLICY_ROUTES["/generate"], ["inputs", "parameters", "stream"]).map(
            lambda v: json.dumps(v).encode()
        ),
        off_by_some({"max_new_tokens": 1}, ["temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"]).map(
            lambda p: json.dumps({"inputs": "hi", "parameters": p}).encode()
        ),
        off_by_some(POLICY_ROUTES["/v1/chat/completions"], ["messages", "temperature", "top_k", "stop", "n"]).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
)


PAIR_BODIES = st.one_of(
    st.binary(max_size=100),
    mutated_json(),
    off_by_some(
        {"inputs": "hi", "parameters": {"max_new_tokens": 1}, "candidate_version": 0},
        ["inputs", "parameters", "candidate_version"],
    ).map(lambda v: json.dumps(v).encode()),
    off_by_some({"max_new_tokens": 1}, ["temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"]).map(
        lambda p: json.dumps({"inputs": "hi", "parameters": p}).encode()
    ),
    st.integers(0, 2**64 - 1).map(  # valid ones too: the answer path is reached
        lambda seed: json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 1, "seed": seed}}).encode()
    ),
)


def test_random_bodies_never_get_a_5xx_from_policy(policy: Running) -> None:
    session = requests.Session()
    seen: collections.Counter[int] = collections.Counter()

    @LIVE
    @given(POLICY_BODIES)
    def never_5xx(case: tuple[str, bytes]) -> None:
        route, raw = case
        r = session.post(policy.http + route, data=raw, headers=JSON, timeout=60)
        seen[r.status_code] += 1
        assert r.status_code < 500, (route, raw[:200], r.status_code, r.text[:300])
        if r.status_code == 200 and r.headers.get("Content-Type", "").startswith("text/event-stream"):
            assert b'"error_type":"internal"' not in r.content, r.content[-300:]

    with session:
        never_5xx()
        assert sum(seen.values()) >= 100 and seen[400] and seen[422] and seen[200], seen
        for route in POLICY_ROUTES:
            assert_good(session, policy.http, route)


def test_random_pair_bodies_never_get_a_5xx(policy: Running) -> None:
    session = requests.Session()
    seen: collections.Counter[int] = collections.Counter()

    @LIVE
    @given(PAIR_BODIES)
    def never_5xx(raw: bytes) -> None:
        r = session.post(policy.http + "/generate_pair", data=raw, headers=JSON, timeout=60)
        seen[r.status_code] += 1
        assert r.status_code < 500, (raw[:200], r.status_code, r.text[:300])

    with session:
        never_5xx()
        assert sum(seen.values()) >= 100 and seen[400] and seen[422] and seen[200], seen
        assert_good(session, policy.http, "/generate_pair")
