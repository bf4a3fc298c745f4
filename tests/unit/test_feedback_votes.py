"""Feedback intake without a broker: one vote per user, feedback ids per user, API-key namespaces.

A user's first feedback of a kind on an answer (a preference: on a pair) counts; a later one
under another feedback_id is ALREADY_VOTED and never reaches the producer. A feedback_id is one
user's: another user's same id is accepted. With API keys configured, a key's users live in its
namespace ("<key name>:<user_id>"): tokens, events and rate limits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from flywheel.core import bus, errors
from flywheel.core.auth import ANONYMOUS, AuthConfig, Authenticator, Caller
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.dedup import id_key, vote_key
from flywheel.feedback.intake import FeedbackIntake, InFlight
from flywheel.v1 import events_pb2, feedback_pb2
from tests.unit.test_feedback_validation import KEY, SIGNER, FakeProducer, req

S = feedback_pb2
run = asyncio.run


class RefusingProducer(FakeProducer):
    """Refuses for good (like a record over max.message.bytes) every event whose comment says so."""

    def send_raw(self, topic: str, key: bytes | None, value: bytes, headers: Any = None) -> Any:
        if b"refuse me" in value:
            raise bus.RecordRefused(topic, key, "too_large", ValueError("too large"), len(value))
        return super().send_raw(topic, key, value, headers)


def make_intake(state: Path, auth: AuthConfig | None = None, producer: Any = None, **cfg: Any) -> FeedbackIntake:
    config = FeedbackConfig(state_dir=str(state), send_timeout_s=0.2, **({"per_user_rate": 0} | cfg))
    engine = FeedbackIntake(
        config,
        KafkaConfig(bootstrap="x:1"),
        TopicsConfig(),
        auth or AuthConfig(hmac_key=KEY),
        producer=producer or FakeProducer(),
    )
    engine.open()
    return engine


@pytest.fixture
def intake(tmp_path: Path) -> Any:
    engine = make_intake(tmp_path)
    yield engine
    engine.close(drain_timeout_s=0)


def thumbs(fid: str, user: str = "u1", iid: str = "i1", bound: str | None = None, **kw: Any) -> S.FeedbackRequest:
    """`bound`: the user id the token binds (default: `user`, as for a caller without namespace)."""
    return req(
        feedback_id=fid, user_id=user, interaction_id=iid, feedback_token=SIGNER.issue(iid, 3, bound or user), **kw
    )


def preference(fid: str, user: str = "u1", pair: str = "P1", side: int = events_pb2.PREFERENCE_A) -> S.FeedbackRequest:
    return req(
        feedback_id=fid,
        user_id=user,
        interaction_id=None,
        pair_id=pair,
        thumbs=None,
        preference=side,
        feedback_token=SIGNER.issue(pair, 3, user, kind="pair"),
    )


def sent(intake: FeedbackIntake) -> list[tuple[str, str, int]]:
    """(user_id, feedback_id, kind) of every event handed to the producer, in order."""
    events = [events_pb2.FeedbackEvent.FromString(v) for _, _, v in intake.producer.sent]  # type: ignore[attr-defined]
    return [(e.user_id, e.feedback_id, e.kind) for e in events]


def status(intake: FeedbackIntake, r: S.FeedbackRequest, caller: Caller = ANONYMOUS) -> int:
    return int(run(intake.submit(r, caller)).status)


def test_a_second_vote_is_already_voted_and_never_sent(intake: FeedbackIntake) -> None:
    counted = REGISTRY.get_sample_value(
        "flywheel_feedback_accepted_total", {"kind": "thumbs", "status": "already_voted"}
    )
    assert status(intake, thumbs("a", thumbs=1)) == S.SUBMIT_STATUS_ACCEPTED
    assert status(intake, thumbs("b", thumbs=-1)) == S.SUBMIT_STATUS_ALREADY_VOTED  # changed her mind: first wins
    assert status(intake, thumbs("a", thumbs=1)) == S.SUBMIT_STATUS_DUPLICATE  # a retry of the first
    assert status(intake, thumbs("b", thumbs=-1)) == S.SUBMIT_STATUS_ALREADY_VOTED  # and of the second
    assert status(intake, thumbs("c", thumbs=None, rating=2)) == S.SUBMIT_STATUS_ACCEPTED  # another kind
    assert status(intake, thumbs("d", iid="i2")) == S.SUBMIT_STATUS_ACCEPTED  # another answer
    assert status(intake, thumbs("a", user="u2")) == S.SUBMIT_STATUS_ACCEPTED  # another user, even the same id
    assert status(intake, thumbs("e", thumbs=None, demonstration="better")) == S.SUBMIT_STATUS_ACCEPTED
    assert status(intake, thumbs("f", thumbs=None, demonstration="best")) == S.SUBMIT_STATUS_ALREADY_VOTED
    assert status(intake, preference("p1")) == S.SUBMIT_STATUS_ACCEPTED
    assert status(intake, preference("p2", side=events_pb2.PREFERENCE_B)) == S.SUBMIT_STATUS_ALREADY_VOTED
    assert status(intake, preference("p2", user="u2")) == S.SUBMIT_STATUS_ACCEPTED
    K = events_pb2
    assert sent(intake) == [
        ("u1", "a", K.FEEDBACK_KIND_THUMBS),
        ("u1", "c", K.FEEDBACK_KIND_RATING),
        ("u1", "d", K.FEEDBACK_KIND_THUMBS),
        ("u2", "a", K.FEEDBACK_KIND_THUMBS),
        ("u1", "e", K.FEEDBACK_KIND_DEMONSTRATION),
        ("u1", "p1", K.FEEDBACK_KIND_PREFERENCE),
        ("u2", "p2", K.FEEDBACK_KIND_PREFERENCE),
    ]
    after = REGISTRY.get_sample_value("flywheel_feedback_accepted_total", {"kind": "thumbs", "status": "already_voted"})
    assert after == (counted or 0) + 2


def test_two_votes_in_one_batch(tmp_path: Path) -> None:
    intake = make_intake(tmp_path, producer=RefusingProducer())
    try:
        batch = [
            thumbs("x1", iid="i7"),
            thumbs("x2", iid="i7", thumbs=-1),
            thumbs("x1", iid="i7"),
            thumbs("x3", iid="i8"),
        ]
        out = run(intake.submit_batch(batch, ANONYMOUS))
        assert [r.status for r in out] == [
            S.SUBMIT_STATUS_ACCEPTED,
            S.SUBMIT_STATUS_ALREADY_VOTED,
            S.SUBMIT_STATUS_DUPLICATE,
            S.SUBMIT_STATUS_ACCEPTED,
        ]
        # The first vote refused for good: the second was not tried, and says so; alone it counts.
        refused = [thumbs("y1", iid="i9", comment="refuse me"), thumbs("y2", iid="i9", thumbs=-1)]
        out = run(intake.submit_batch(refused, ANONYMOUS))
        assert isinstance(out[0], bus.RecordRefused)
        assert isinstance(out[1], InFlight) and out[1].message == (
            "item 0 of this batch is this user's thumbs on the same answer and was refused, "
            "so this one was not tried: send it again to have it counted"
        )
        assert status(intake, refused[1]) == S.SUBMIT_STATUS_ACCEPTED
        assert [fid for _, fid, _ in sent(intake)] == ["x1", "x3", "y2"]
    finally:
        intake.close(drain_timeout_s=0)


def test_a_vote_in_flight_under_another_id_is_aborted(intake: FeedbackIntake) -> None:
    assert intake.claims is not None
    other = (id_key("u1", "other"), vote_key("u1", "thumbs", "i1"))
    assert intake.claims.reserve([other]) == ["new"]
    with pytest.raises(InFlight, match="this user's thumbs on 'i1' is being submitted under another feedback_id"):
        run(intake.submit(thumbs("a"), ANONYMOUS))
    intake.claims.release([other])  # its event never became durable: the vote is free again
    assert status(intake, thumbs("a")) == S.SUBMIT_STATUS_ACCEPTED
    assert intake.claims.reserve([other]) == ["voted"]


def test_votes_and_ids_survive_a_restart(tmp_path: Path) -> None:
    first = make_intake(tmp_path)
    assert status(first, thumbs("a")) == S.SUBMIT_STATUS_ACCEPTED
    first.close(drain_timeout_s=0)
    second = make_intake(tmp_path)
    try:
        assert status(second, thumbs("b")) == S.SUBMIT_STATUS_ALREADY_VOTED
        assert status(second, thumbs("a")) == S.SUBMIT_STATUS_DUPLICATE
        assert sent(second) == []
    finally:
        second.close(drain_timeout_s=0)


def test_an_id_claimed_in_a_store_from_before_per_user_ids_does_not_block_others(tmp_path: Path) -> None:
    """The old store kept bare feedback ids (table `seen`): whoever sent "abc" first claimed it for all."""
    conn = sqlite3.connect(tmp_path / "seen.sqlite")
    conn.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, at REAL NOT NULL)")
    conn.executemany("INSERT INTO seen VALUES (?, ?)", [("abc", time.time()), ("old", 1.0)])
    conn.commit()
    conn.close()
    intake = make_intake(tmp_path)
    try:
        assert status(intake, thumbs("abc", user="victim")) == S.SUBMIT_STATUS_ACCEPTED
        with sqlite3.connect(tmp_path / "seen.sqlite") as c:  # past retention: pruned with the rest
            assert c.execute("SELECT id FROM seen").fetchall() == [("abc",)]
    finally:
        intake.close(drain_timeout_s=0)


def test_api_keys_give_each_key_a_namespace_of_users(tmp_path: Path) -> None:
    """Key a cannot give feedback with key b's token for b's user "bob", nor spend b's bob's rate limit;
    a caller without a key (allowed here) cannot pass as b's bob either."""
    auth = AuthConfig(hmac_key=KEY, api_keys=["a:key-a-0123456789", "b:key-b-0123456789"], require_api_key=False)
    who = Authenticator(auth)
    a = who.caller([("authorization", "Bearer key-a-0123456789")])
    b = who.caller([("authorization", "Bearer key-b-0123456789")])
    nobody = who.caller([])
    intake = make_intake(tmp_path, auth, per_user_rate=0.01, per_user_burst=2)
    try:
        bobs = thumbs("f1", user="bob", bound="b:bob")  # the token the policy gave key b for its user bob
        with pytest.raises(errors.PermissionDenied, match="issued for another user, not user_id 'a:bob'"):
            run(intake.submit(bobs, a))
        with pytest.raises(errors.PermissionDenied, match="issued for another user, not user_id 'anonymous:b:bob'"):
            run(intake.submit(thumbs("f1", user="b:bob"), nobody))
        assert status(intake, bobs, b) == S.SUBMIT_STATUS_ACCEPTED
        assert sent(intake) == [("b:bob", "f1", events_pb2.FEEDBACK_KIND_THUMBS)]
        # a's own bob: the same id on the same answer is his own (ids and votes are per namespace)...
        assert status(intake, thumbs("f1", user="bob", bound="a:bob"), a) == S.SUBMIT_STATUS_ACCEPTED
        assert status(intake, thumbs("a2", user="bob", iid="j2", bound="a:bob"), a) == S.SUBMIT_STATUS_ACCEPTED
        with pytest.raises(errors.ResourceExhausted, match="rate limit for user 'a:bob'"):  # ...his burst (2) spent
            run(intake.submit(thumbs("a3", user="bob", iid="j3", bound="a:bob"), a))
        assert status(intake, thumbs("b2", user="bob", iid="j3", bound="b:bob"), b) == S.SUBMIT_STATUS_ACCEPTED
        assert [u for u, _, _ in sent(intake)] == ["b:bob", "a:bob", "a:bob", "b:bob"]
    finally:
        intake.close(drain_timeout_s=0)
