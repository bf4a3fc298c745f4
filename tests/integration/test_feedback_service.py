"""The feedback service as a real process on real ports, against the real Apache Kafka broker.

Each test reads the feedback topic back with its own consumer and asserts on the events'
content and count, so none can pass by nothing happening.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.testing import wait_for
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]

KEY = "integration-hmac-key-0123456789"
SIGNER = AuthConfig(hmac_key=KEY).signer()
S = feedback_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m flywheel.feedback` in a subprocess, with a gRPC stub and an HTTP helper."""

    def __init__(self, bootstrap: str, topic: str, state_dir: Path, **env: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        full_env = {
            **os.environ,
            "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
            "FLYWHEEL_HMAC_KEY": KEY,
            "FLYWHEEL_TOPIC_FEEDBACK": topic,
            "FLYWHEEL_TOPIC_PARTITIONS": "1",
            "FLYWHEEL_FEEDBACK_SEND_TIMEOUT_S": "1",
            "FLYWHEEL_GRACE_S": "1",
            **env,
        }
        self.log = open(state_dir / f"service-{self.grpc_port}.log", "w")  # noqa: SIM115
        args = ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.feedback", *args, "--state-dir", str(state_dir)],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = feedback_pb2_grpc.FeedbackStub(self.channel)
        wait_for(self.healthy, 30, "the feedback service to become healthy", poll_s=0.1)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"service exited: {Path(self.log.name).read_text()[-2000:]}"
        return self.http("GET", "/health")[0] == 200

    def http(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None, r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), e.headers
        except (urllib.error.URLError, ConnectionError):
            return 0, None, None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def read_topic(bootstrap: str, topic: str, n: int, settle_s: float = 1.0, timeout_s: float = 20) -> list[Any]:
    """Every record of partition 0 once at least `n` arrived and nothing more came for `settle_s`."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records: list[Any] = []
    deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            new = [m for msgs in batch.values() for m in msgs]
            records += new
            if new:
                quiet_since = time.monotonic()
            elif len(records) >= n and time.monotonic() - quiet_since >= settle_s:
                break
    finally:
        consumer.close()
    return [(m.key.decode(), events_pb2.FeedbackEvent.FromString(m.value), dict(m.headers)) for m in records]


def token(subject: str, user: str, version: int = 5, kind: str = "answer") -> str:
    return SIGNER.issue(subject, version, user, kind=kind)


def fb(fid: str, user: str, iid: str, **kw: Any) -> feedback_pb2.FeedbackRequest:
    if not {"thumbs", "rating", "preference", "demonstration"} & set(kw):
        kw["thumbs"] = 1
    kw.setdefault("feedback_token", token(iid, user))
    return feedback_pb2.FeedbackRequest(feedback_id=fid, interaction_id=iid, user_id=user, **kw)


@pytest.fixture(scope="module")
def topics(kafka_bootstrap: str) -> TopicsConfig:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    d = TopicsConfig()
    fields = ("interactions", "feedback", "preferences", "policy_updates", "reward_updates", "dlq")
    t = TopicsConfig(**{f: prefix + getattr(d, f) for f in fields}, partitions=1)
    bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), t)
    return t


@pytest.fixture(scope="module")
def service(kafka_bootstrap: str, topics: TopicsConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(
        kafka_bootstrap,
        topics.feedback,
        tmp_path_factory.mktemp("feedback"),
        FLYWHEEL_FEEDBACK_USER_RATE="0.5",
        FLYWHEEL_FEEDBACK_USER_BURST="3",
    )
    yield svc
    assert svc.stop(signal.SIGTERM) == 0  # graceful stop on SIGTERM


def test_grpc_and_http_feedback_reach_kafka_once(service: Service, kafka_bootstrap: str, topics: TopicsConfig) -> None:
    r = service.stub.Submit(fb("g1", "alice", "i-1", thumbs=-1, comment="too long"))
    assert (r.feedback_id, r.status) == ("g1", S.SUBMIT_STATUS_ACCEPTED)
    assert service.stub.Submit(fb("g1", "alice", "i-1", thumbs=-1)).status == S.SUBMIT_STATUS_DUPLICATE
    body = {"feedback_id": "h1", "interaction_id": "i-2", "user_id": "bob", "feedback_token": token("i-2", "bob")}
    assert service.http("POST", "/feedback", {**body, "rating": 3})[:2] == (
        200,
        {"feedback_id": "h1", "status": "accepted"},
    )
    assert service.http("POST", "/feedback", {**body, "rating": 3})[:2] == (
        200,
        {"feedback_id": "h1", "status": "duplicate"},
    )
    pair = feedback_pb2.FeedbackRequest(
        feedback_id="p1",
        pair_id="pair-1",
        user_id="carol",
        feedback_token=token("pair-1", "carol", 9, kind="pair"),
        preference=events_pb2.PREFERENCE_B,
    )
    demo = fb("d1", "dave", "i-3", demonstration="The capital is Paris.")
    bad = fb("x1", "erin", "i-4", thumbs=5)
    out = service.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(items=[pair, bad, demo]))
    assert [(x.response.feedback_id, x.response.status, x.error_code) for x in out.results] == [
        ("p1", S.SUBMIT_STATUS_ACCEPTED, ""),
        ("x1", S.SUBMIT_STATUS_UNSPECIFIED, "INVALID_ARGUMENT"),
        ("d1", S.SUBMIT_STATUS_ACCEPTED, ""),
    ]
    assert "thumbs must be +1 (up) or -1 (down), got 5" in out.results[1].error

    got = read_topic(kafka_bootstrap, topics.feedback, n=4)
    assert [(k, e.feedback_id) for k, e, _ in got] == [("i-1", "g1"), ("i-2", "h1"), ("pair-1", "p1"), ("i-3", "d1")]
    g1, h1, p1, d1 = (e for _, e, _ in got)
    assert (g1.kind, g1.value, g1.comment, g1.user_id, g1.policy_version) == (
        events_pb2.FEEDBACK_KIND_THUMBS,
        -1,
        "too long",
        "alice",
        5,
    )
    assert (h1.kind, h1.value, h1.rating_scale, h1.interaction_id) == (events_pb2.FEEDBACK_KIND_RATING, 3, 3, "i-2")
    assert (p1.kind, p1.preference, p1.pair_id, p1.interaction_id, p1.policy_version) == (
        events_pb2.FEEDBACK_KIND_PREFERENCE,
        events_pb2.PREFERENCE_B,
        "pair-1",
        "",
        9,
    )
    assert (d1.kind, d1.demonstration) == (events_pb2.FEEDBACK_KIND_DEMONSTRATION, "The capital is Paris.")
    assert abs(g1.created_at.seconds - time.time()) < 60
    assert got[0][2]["flywheel-event-id"] == b"g1"


def test_bad_tokens_and_bad_input_are_refused_precisely(service: Service) -> None:
    forged = fb("t1", "mallory", "i-9")
    forged.feedback_token = token("i-9", "alice")  # alice's token, mallory's user_id
    cases = {
        "issued for another user": forged,
        "issued for another answer": fb("t2", "alice", "i-9", feedback_token=token("i-8", "alice")),
        "has expired": fb("t3", "alice", "i-9", feedback_token=SIGNER.issue("i-9", 1, "alice", now=1000)),
        "malformed feedback token": fb("t4", "alice", "i-9", feedback_token="forged"),
    }
    for message, request in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            service.stub.Submit(request)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and message in e.value.details()
    body = {"feedback_id": "t5", "interaction_id": "i-9", "user_id": "mallory", "thumbs": 1}
    status, err, _ = service.http("POST", "/feedback", {**body, "feedback_token": token("i-9", "alice")})
    assert (status, err["error_type"]) == (403, "permission_denied") and "another user" in err["error"]
    status, err, _ = service.http("POST", "/feedback", {**body, "feedback_token": "x", "stars": 5})
    assert (status, err["error_type"]) == (422, "validation") and "unknown field(s) 'stars'" in err["error"]
    assert service.http("POST", "/feedback", raw=b"{not json")[0] == 400
    status, err, _ = service.http("POST", "/feedback", {**body, "feedback_token": token("i-9", "mallory"), "thumbs": 0})
    assert (status, err["error"]) == (422, "thumbs must be +1 (up) or -1 (down), got 0")
    with pytest.raises(grpc.RpcError) as e:
        service.stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(items=[fb(f"b{i}", f"u{i}", "i") for i in range(101)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..100 items, got 101" in e.value.details()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).read().decode()
    assert 'flywheel_feedback_rejected_total{reason="permission_denied"}' in metrics
    assert 'flywheel_spool_depth{spool="feedback"} 0.0' in metrics


def test_rate_limit_per_user(service: Service) -> None:
    for i in range(3):  # burst 3
        assert service.stub.Submit(fb(f"r{i}", "greedy", f"ri-{i}")).status == S.SUBMIT_STATUS_ACCEPTED
    with pytest.raises(grpc.RpcError) as e:
        service.stub.Submit(fb("r3", "greedy", "ri-3"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit for user 'greedy'" in e.value.details()
    assert dict(e.value.trailing_metadata())["retry-after"] == "2"  # 1 token at 0.5/s
    body = {"feedback_id": "r4", "interaction_id": "ri-4", "user_id": "greedy", "thumbs": 1}
    status, err, headers = service.http("POST", "/feedback", {**body, "feedback_token": token("ri-4", "greedy")})
    assert (status, err["error_type"], headers["Retry-After"]) == (429, "overloaded", "2")
    assert service.stub.Submit(fb("r5", "patient", "ri-5")).status == S.SUBMIT_STATUS_ACCEPTED  # others unaffected


def test_one_vote_per_user_and_answer_and_feedback_ids_per_user(
    service: Service, kafka_bootstrap: str, topics: TopicsConfig
) -> None:
    """A user's second thumbs on an answer (another feedback_id) is ALREADY_VOTED on gRPC and HTTP, a
    second preference on a pair too, even inside one batch; another user's same feedback_id is his
    own. Only the first votes reach Kafka."""
    assert service.stub.Submit(fb("v1", "vera", "vi-1", thumbs=1)).status == S.SUBMIT_STATUS_ACCEPTED
    assert service.stub.Submit(fb("v2", "vera", "vi-1", thumbs=-1)).status == S.SUBMIT_STATUS_ALREADY_VOTED
    body = {"feedback_id": "v3", "interaction_id": "vi-1", "user_id": "vera", "thumbs": -1}
    assert service.http("POST", "/feedback", {**body, "feedback_token": token("vi-1", "vera")})[:2] == (
        200,
        {"feedback_id": "v3", "status": "already_voted"},
    )
    assert service.stub.Submit(fb("v1", "walt", "vi-2")).status == S.SUBMIT_STATUS_ACCEPTED  # vera's id, his vote

    def pref(fid: str, side: int) -> feedback_pb2.FeedbackRequest:
        tok = token("pair-9", "xena", kind="pair")
        return S.FeedbackRequest(feedback_id=fid, pair_id="pair-9", user_id="xena", feedback_token=tok, preference=side)

    out = service.stub.SubmitBatch(S.SubmitBatchRequest(items=[pref("q1", 1), pref("q2", 2)]))
    assert [(x.response.status, x.error_code) for x in out.results] == [
        (S.SUBMIT_STATUS_ACCEPTED, ""),
        (S.SUBMIT_STATUS_ALREADY_VOTED, ""),
    ]
    assert service.stub.Submit(pref("q3", 3)).status == S.SUBMIT_STATUS_ALREADY_VOTED
    got = read_topic(kafka_bootstrap, topics.feedback, n=1)  # acknowledged: every one is on the topic by now
    mine = [(k, e.feedback_id, e.user_id) for k, e, _ in got if e.user_id in ("vera", "walt", "xena")]
    assert mine == [("vi-1", "v1", "vera"), ("vi-2", "v1", "walt"), ("pair-9", "q1", "xena")]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics", timeout=10).read().decode()
    assert 'flywheel_feedback_accepted_total{kind="preference",status="already_voted"} 2.0' in metrics


def test_kafka_down_spools_and_drains_in_order_after_a_kill(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.flywheel.feedback"
    bus.ensure_topics(KafkaConfig(bootstrap=kafka_bootstrap), TopicsConfig(feedback=topic, partitions=1))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    down = Service(dead, topic, tmp_path, FLYWHEEL_KAFKA_REQUEST_TIMEOUT_MS="1000")
    try:
        statuses = [down.stub.Submit(fb(f"s{i}", f"user{i}", f"si-{i}"), timeout=15).status for i in range(4)]
        body = {"feedback_id": "s4", "interaction_id": "si-4", "user_id": "user4", "rating": 2}
        status, resp, _ = down.http("POST", "/feedback", {**body, "feedback_token": token("si-4", "user4")})
        assert (status, resp) == (200, {"feedback_id": "s4", "status": "spooled"})
        assert statuses == [S.SUBMIT_STATUS_SPOOLED] * 4
        assert down.stub.Submit(fb("s2", "user2", "si-2")).status == S.SUBMIT_STATUS_DUPLICATE
        assert down.http("GET", "/health")[0] == 200  # the spool keeps the service available
    finally:
        down.stop(signal.SIGKILL)
    up = Service(kafka_bootstrap, topic, tmp_path)  # same state dir: the spool and the seen ids
    try:
        got = read_topic(kafka_bootstrap, topic, n=5, settle_s=1.5)
        assert [e.feedback_id for _, e, _ in got] == ["s0", "s1", "s2", "s3", "s4"]  # in order, once each
        assert got[4][1].value == 2 and got[4][1].kind == events_pb2.FEEDBACK_KIND_RATING
        assert up.stub.Submit(fb("s3", "user3", "si-3")).status == S.SUBMIT_STATUS_DUPLICATE  # survived the kill
        assert up.stub.Submit(fb("s5", "user5", "si-5")).status == S.SUBMIT_STATUS_ACCEPTED
    finally:
        assert up.stop() == 0
    assert [e.feedback_id for _, e, _ in read_topic(kafka_bootstrap, topic, n=6, settle_s=0.5)][-1] == "s5"


def test_an_event_kafka_refuses_for_good_is_an_error_for_that_item_only(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A feedback topic whose max.message.bytes refuses an event that passed validation: that
    item is INVALID_ARGUMENT (never ACCEPTED or SPOOLED), the items around it are accepted, and
    the service keeps accepting (its producer is not poisoned)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = f"t{uuid.uuid4().hex[:10]}.flywheel.feedback"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "1200"})])
    finally:
        admin.close()
    svc = Service(kafka_bootstrap, topic, tmp_path)
    try:
        long = base64.b64encode(os.urandom(1500)).decode()  # 2000 chars that gzip cannot shrink below the limit
        with pytest.raises(grpc.RpcError) as e:
            svc.stub.Submit(fb("big", "ann", "bi-0", comment=long))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than Kafka accepts" in e.value.details()
        batch = [fb("n0", "bob", "bi-1"), fb("big2", "bob", "bi-2", comment=long), fb("n1", "bob", "bi-3")]
        results = svc.stub.SubmitBatch(S.SubmitBatchRequest(items=batch)).results
        assert [(r.response.status, r.error_code) for r in results] == [
            (S.SUBMIT_STATUS_ACCEPTED, ""),
            (S.SUBMIT_STATUS_UNSPECIFIED, "INVALID_ARGUMENT"),
            (S.SUBMIT_STATUS_ACCEPTED, ""),
        ]
        assert svc.stub.Submit(fb("n2", "cid", "bi-4")).status == S.SUBMIT_STATUS_ACCEPTED
        with pytest.raises(grpc.RpcError) as e:  # not recorded as seen: a retry is refused again, not DUPLICATE
            svc.stub.Submit(fb("big", "ann", "bi-0", comment=long))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = read_topic(kafka_bootstrap, topic, n=3, settle_s=0.5)
        assert [ev.feedback_id for _, ev, _ in got] == ["n0", "n1", "n2"]
    finally:
        assert svc.stop() == 0
