"""Feedback intake without a broker: every validation message, tokens, rate limits, dedup, spooling."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from kafka.future import Future

from flywheel.core import errors
from flywheel.core.auth import ANONYMOUS, AuthConfig, Caller
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.dedup import id_key, vote_key
from flywheel.feedback.intake import FeedbackIntake, InFlight
from flywheel.feedback.ratelimit import RateLimiter
from flywheel.feedback.server import request_from_json
from flywheel.feedback.validation import validate
from flywheel.v1 import events_pb2, feedback_pb2

KEY = "k" * 32
AUTH = AuthConfig(hmac_key=KEY)
SIGNER = AUTH.signer()
CFG = FeedbackConfig()
FR = feedback_pb2.FeedbackRequest


def req(**kw: Any) -> feedback_pb2.FeedbackRequest:
    base: dict[str, Any] = {"feedback_id": "f1", "interaction_id": "i1", "user_id": "u1", "thumbs": 1}
    base.update(kw)
    return FR(**{k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(feedback_id=None), "feedback_id is required: send a client-chosen unique id"),
        (req(feedback_id="x" * 129), "feedback_id has 129 characters: use at most 128"),
        (req(user_id=None), "user_id is required: send the id of the end user"),
        (req(user_id="u" * 257), "user_id has 257 characters: use at most 256"),
        (req(thumbs=None), "no feedback value: send exactly one of thumbs (+1 or -1), rating (1..3)"),
        (req(pair_id="p1"), "send interaction_id or pair_id, not both"),
        (req(interaction_id="i" * 129), "interaction_id has 129 characters: use at most 128"),
        (req(thumbs=0), "thumbs must be +1 (up) or -1 (down), got 0"),
        (req(thumbs=2), "thumbs must be +1 (up) or -1 (down), got 2"),
        (req(thumbs=None, rating=0), "rating must be an integer in 1..3, got 0"),
        (req(thumbs=None, rating=4), "rating must be an integer in 1..3, got 4"),
        (
            req(thumbs=None, preference=events_pb2.PREFERENCE_A),
            "preference feedback is about a pair: send the pair_id",
        ),
        (
            req(interaction_id=None, pair_id="p1", thumbs=None, preference=events_pb2.PREFERENCE_UNSPECIFIED),
            "preference must be A, B or TIE, got PREFERENCE_UNSPECIFIED",
        ),
        (
            req(interaction_id=None, pair_id="p1"),
            "thumbs feedback is about one answer: send its interaction_id, not pair_id (for one side of a pair",
        ),
        (req(thumbs=None, demonstration="  "), "demonstration is empty: send the answer the user would have wanted"),
        (req(thumbs=None, demonstration="d" * 8001), "demonstration has 8001 characters: use at most 8000"),
        (req(comment="c" * 2001), "comment has 2001 characters: use at most 2000"),
    ],
)
def test_every_validation_message(request_: feedback_pb2.FeedbackRequest, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        validate(request_, CFG)
    assert message in e.value.message
    assert e.value.http_status == 422


@pytest.mark.parametrize("number", [4, 7, 99, -1, 2**31 - 1, -(2**31)])
def test_unknown_preference_number_is_invalid_argument(number: int) -> None:
    """preference is an open enum: any int32 arrives over gRPC. One it does not define is refused
    naming the value and the allowed ones (it used to raise ValueError: INTERNAL for the whole batch)."""
    r = req(interaction_id=None, pair_id="p1", thumbs=None, preference=number)
    with pytest.raises(errors.InvalidArgument) as e:
        validate(r, CFG)
    assert e.value.message == (
        f"preference must be A, B or TIE, got {number}, which is not a Preference value: "
        "send PREFERENCE_A (1), PREFERENCE_B (2) or PREFERENCE_TIE (3)"
    )


def test_valid_kinds_and_scale() -> None:
    assert validate(req(), CFG) == "thumbs"
    assert validate(req(thumbs=None, rating=3), CFG) == "rating"
    assert validate(req(thumbs=None, rating=5), FeedbackConfig(rating_scale=5)) == "rating"
    pref = req(interaction_id=None, pair_id="p", thumbs=None, preference=events_pb2.PREFERENCE_TIE)
    assert validate(pref, CFG) == "preference"
    assert validate(req(thumbs=None, demonstration="better answer", comment="meh"), CFG) == "demonstration"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1], "the body must be a JSON object"),
        ({"feedback_id": "f", "score": 1}, "unknown field(s) 'score': the fields are feedback_id"),
        (
            {"thumbs": 1, "rating": 2},
            "send exactly one of thumbs, rating, preference or demonstration, got thumbs and rating",
        ),
        ({"user_id": 7}, "user_id must be a string, got 7"),
        ({"thumbs": True}, "thumbs must be +1 (up) or -1 (down), got true"),
        ({"thumbs": "up"}, 'thumbs must be +1 (up) or -1 (down), got "up"'),
        ({"rating": 2.5}, "rating must be an integer in 1..3, got 2.5"),
        ({"rating": 2**40}, "rating must be an integer in 1..3, got 1099511627776"),
        ({"preference": "C"}, 'preference must be "A", "B" or "TIE", got "C"'),
    ],
)
def test_json_body_messages(body: Any, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        request_from_json(body)
    assert message in e.value.message


def test_json_body_conversion() -> None:
    r = request_from_json({"feedback_id": "f", "pair_id": "p", "preference": "tie", "user_id": "u", "comment": None})
    assert (r.feedback_id, r.pair_id, r.preference, r.WhichOneof("value")) == (
        "f",
        "p",
        events_pb2.PREFERENCE_TIE,
        "preference",
    )
    assert request_from_json({"rating": 2}).rating == 2


def test_rate_limiter_bucket_refills_and_says_when() -> None:
    rl = RateLimiter(rate=2.0, burst=3, what="user")
    for _ in range(3):
        rl.take("u", now=100.0)
    with pytest.raises(
        errors.ResourceExhausted, match=r"rate limit for user 'u' reached \(2 events/s, burst 3\): retry in 0.50 s"
    ) as e:
        rl.take("u", now=100.0)
    assert e.value.retry_after_s == pytest.approx(0.5) and e.value.http_status == 429
    rl.take("other", now=100.0)  # buckets are per name
    rl.take("u", now=100.5)
    RateLimiter(rate=0, burst=1, what="user").take("u", n=1000)  # 0: no limit


# ------------------------------------------------------------------ the engine, with a fake producer


class AckedFuture(Future):
    def get(self, timeout: float | None = None) -> None:
        return self.value


class FakeProducer:
    """Acks immediately, or fails every send while `down` (like a broker that is gone)."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send_raw(self, topic: str, key: bytes | None, value: bytes, headers: Any = None) -> Future:
        if self.down:
            raise errors.Unavailable("cannot reach Kafka")
        self.sent.append((topic, key, value))
        return AckedFuture().success(None)

    def close(self, timeout_s: float = 0) -> None:
        pass


@pytest.fixture
def intake(tmp_path: Path) -> Any:
    cfg = FeedbackConfig(state_dir=str(tmp_path), per_user_rate=1.0, per_user_burst=3, send_timeout_s=0.2)
    engine = FeedbackIntake(cfg, KafkaConfig(bootstrap="x:1"), TopicsConfig(), AUTH, producer=FakeProducer())
    engine.open()
    engine.spool.backoff_s = engine.spool.max_backoff_s = 0.02
    yield engine
    engine.close(drain_timeout_s=0)


def signed(fid: str, user: str = "u1", iid: str = "i1", version: int = 7, **kw: Any) -> feedback_pb2.FeedbackRequest:
    return req(feedback_id=fid, user_id=user, interaction_id=iid, feedback_token=SIGNER.issue(iid, version, user), **kw)


def tampered(token: str) -> str:
    """The token with its policy version raised by one (a forged claim)."""
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[8] += 1  # last byte of the big-endian policy_version after the 1-byte token version
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_tokens_are_checked_against_answer_user_and_expiry(intake: FeedbackIntake) -> None:
    run = asyncio.run
    cases = [
        (req(feedback_token=""), "feedback_token is missing"),
        (req(feedback_token="garbage"), "malformed feedback token"),
        (req(feedback_token=SIGNER.issue("other", 1, "u1")), "issued for another answer"),
        (req(feedback_token=SIGNER.issue("i1", 1, "mallory")), "issued for another user"),
        (req(feedback_token=SIGNER.issue("i1", 1, "u1", now=0)), "feedback token has expired"),
        (req(feedback_token=AuthConfig(hmac_key="z" * 32).signer().issue("i1", 1, "u1")), "another answer"),
        (req(feedback_token=tampered(SIGNER.issue("i1", 1, "u1"))), "signature is invalid"),
    ]
    for r, message in cases:
        with pytest.raises(errors.PermissionDenied, match=message):
            run(intake.submit(r, ANONYMOUS))
    pair = req(interaction_id=None, pair_id="p9", thumbs=None, preference=events_pb2.PREFERENCE_B)
    pair.feedback_token = SIGNER.issue("p9", 4, "u1")  # an answer's token, though its id is the pair's
    with pytest.raises(errors.PermissionDenied, match="is an answer's: send it with interaction_id"):
        run(intake.submit(pair, ANONYMOUS))
    pair.feedback_token = SIGNER.issue("p9", 4, "u1", kind="pair")  # a pair's token is issued over pair_id
    assert run(intake.submit(pair, ANONYMOUS)).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
    event = events_pb2.FeedbackEvent.FromString(intake.producer.sent[-1][2])
    assert (event.pair_id, event.preference, event.policy_version, event.kind) == (
        "p9",
        events_pb2.PREFERENCE_B,
        4,
        events_pb2.FEEDBACK_KIND_PREFERENCE,
    )
    assert intake.producer.sent[-1][1] == b"p9"


def test_duplicates_rate_limits_batches_and_spool(intake: FeedbackIntake, tmp_path: Path) -> None:
    run, S = asyncio.run, feedback_pb2
    assert run(intake.submit(signed("a", thumbs=-1, comment="no"), ANONYMOUS)).status == S.SUBMIT_STATUS_ACCEPTED
    topic, key, value = intake.producer.sent[0]
    e = events_pb2.FeedbackEvent.FromString(value)
    assert (topic, key, e.feedback_id, e.value, e.comment, e.user_id, e.policy_version) == (
        "flywheel.feedback",
        b"i1",
        "a",
        -1,
        "no",
        "u1",
        7,
    )
    assert e.created_at.seconds > 0
    assert run(intake.submit(signed("a"), ANONYMOUS)).status == S.SUBMIT_STATUS_DUPLICATE
    assert len(intake.producer.sent) == 1
    # per-user limit (burst 3, used 2): the third passes (u1's second thumbs on i1: not counted), the
    # fourth is refused with a retry hint
    assert run(intake.submit(signed("b"), ANONYMOUS)).status == S.SUBMIT_STATUS_ALREADY_VOTED
    with pytest.raises(errors.ResourceExhausted, match="rate limit for user 'u1'") as ex:
        run(intake.submit(signed("c"), ANONYMOUS))
    assert ex.value.retry_after_s > 0
    # a batch: invalid items get their own error, the rest pass; a repeated id inside it is a duplicate
    batch = [
        signed("d", user="u2"),
        signed("d", user="u2"),
        req(feedback_id="e", user_id="u2", thumbs=3),
        signed("f", user="u3"),
    ]
    out = run(intake.submit_batch(batch, Caller("app")))
    assert [getattr(r, "status", type(r).__name__) for r in out] == [
        S.SUBMIT_STATUS_ACCEPTED,
        S.SUBMIT_STATUS_DUPLICATE,
        "InvalidArgument",
        S.SUBMIT_STATUS_ACCEPTED,
    ]
    # an unknown enum number fails its own item only
    pairs = [
        req(feedback_id=f"p{i}", user_id="u5", interaction_id=None, pair_id=f"pp{i}", thumbs=None, preference=pref)
        for i, pref in enumerate([events_pb2.PREFERENCE_A, 7, events_pb2.PREFERENCE_TIE])
    ]
    for i, r in enumerate(pairs):
        r.feedback_token = SIGNER.issue(f"pp{i}", 7, "u5", kind="pair")
    out = run(intake.submit_batch(pairs, Caller("app")))
    assert [getattr(r, "status", type(r).__name__) for r in out] == [
        S.SUBMIT_STATUS_ACCEPTED,
        "InvalidArgument",
        S.SUBMIT_STATUS_ACCEPTED,
    ]
    assert "got 7, which is not a Preference value" in out[1].message
    with pytest.raises(errors.InvalidArgument, match="a batch holds 1..100 items, got 101"):
        run(intake.submit_batch([signed(str(i)) for i in range(101)], ANONYMOUS))
    # an id in flight elsewhere is refused with ABORTED, not silently called a duplicate
    assert intake.claims is not None
    intake.claims.reserve([(id_key("u4", "busy"), vote_key("u4", "thumbs", "elsewhere"))])
    with pytest.raises(InFlight, match="being submitted by another request"):
        run(intake.submit(signed("busy", user="u4"), ANONYMOUS))
    # Kafka down: spooled; the spool drains in order once it is back, and the ids stay seen
    intake.producer.down = True
    statuses = [run(intake.submit(signed(f"s{i}", user=f"v{i}"), ANONYMOUS)).status for i in range(3)]
    assert statuses == [S.SUBMIT_STATUS_SPOOLED] * 3 and intake.spool.depth() == 3
    assert run(intake.submit(signed("s1", user="v1"), ANONYMOUS)).status == S.SUBMIT_STATUS_DUPLICATE
    intake.producer.down = False
    assert intake.spool.wait_empty(5)
    tail = [events_pb2.FeedbackEvent.FromString(v).feedback_id for _, _, v in intake.producer.sent[-3:]]
    assert tail == ["s0", "s1", "s2"]
    intake.claims.flush()
    assert id_key("v2", "s2") in intake.claims and vote_key("v2", "thumbs", "i1") in intake.claims
    assert id_key("u1", "c") not in intake.claims  # a refused submission is not remembered
