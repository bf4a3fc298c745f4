"""The intake's group hand-off and one-HMAC token check: faster, with the same answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kafka.future import Future

from flywheel.core.auth import ANONYMOUS, AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.intake import MAX_FLUSHES_IN_FLIGHT, FeedbackIntake, InFlight
from flywheel.testing import wait_until
from flywheel.v1 import events_pb2, feedback_pb2

KEY = "unit-test-hmac-key-0123456789"
AUTH = AuthConfig(hmac_key=KEY)
SIGNER = AUTH.signer()
S = feedback_pb2


class LateProducer:
    """Acks only when `ack_all` is called, like a broker that takes its time (acks=all)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.futures: list[Future] = []

    def send_raw(self, topic: str, key: bytes | None, value: bytes, headers: Any = None) -> Future:
        f = Future()
        self.sent.append((key, value))
        self.futures.append(f)
        return f

    def ack_all(self) -> None:
        for f in self.futures:
            if not f.is_done:
                f.success(None)

    def close(self, timeout_s: float = 0) -> None:
        pass


def signed(fid: str, iid: str = "i1", user: str = "u1") -> feedback_pb2.FeedbackRequest:
    return feedback_pb2.FeedbackRequest(
        feedback_id=fid, interaction_id=iid, user_id=user, feedback_token=SIGNER.issue(iid, 3, user), thumbs=1
    )


@pytest.fixture
def intake(tmp_path: Path) -> Any:
    cfg = FeedbackConfig(state_dir=str(tmp_path), per_user_rate=0, send_timeout_s=2.0)
    engine = FeedbackIntake(cfg, KafkaConfig(bootstrap="x:1"), TopicsConfig(), AUTH, producer=LateProducer())
    engine.open()
    yield engine
    engine.close(drain_timeout_s=0)


def count_trips(intake: FeedbackIntake) -> list[int]:
    """The size of every group the intake hands to its send thread, as it happens.

    Each trip reserves the claims of its whole group in one call to the claims store (dedup.py).
    """
    trips: list[int] = []
    claims = intake.claims
    assert claims is not None
    real = claims.reserve

    def counted(group: list[tuple[str, str]]) -> list[str]:
        trips.append(len(group))
        return real(group)

    claims.reserve = counted  # type: ignore[method-assign]
    return trips


def test_concurrent_submits_share_one_flush_and_wait_for_the_acks(intake: FeedbackIntake) -> None:
    trips = count_trips(intake)

    async def scenario() -> list[Any]:
        calls = [asyncio.ensure_future(intake.submit(signed(f"f{i}", f"i{i}"), ANONYMOUS)) for i in range(20)]
        calls.append(asyncio.ensure_future(intake.submit(signed("f3", "i3"), ANONYMOUS)))  # same id, concurrently
        await wait_until(lambda: len(intake.producer.sent) == 20, 5, "the 20 distinct events to be sent")
        assert not any(c.done() for c in calls[:20]), "acknowledged before Kafka acked"
        intake.producer.ack_all()
        return await asyncio.gather(*calls, return_exceptions=True)

    out = asyncio.run(scenario())
    assert trips == [21], "one trip to the hand-off thread for all concurrent requests"
    assert [r.status for r in out[:20]] == [S.SUBMIT_STATUS_ACCEPTED] * 20
    assert [r.feedback_id for r in out[:20]] == [f"f{i}" for i in range(20)]
    assert isinstance(out[20], InFlight)
    assert len(intake.producer.sent) == 20
    ids = {events_pb2.FeedbackEvent.FromString(v).feedback_id for _, v in intake.producer.sent}
    assert ids == {f"f{i}" for i in range(20)}
    assert asyncio.run(intake.submit(signed("f3", "i3"), ANONYMOUS)).status == S.SUBMIT_STATUS_DUPLICATE


def test_unacked_events_are_spooled_not_lost(intake: FeedbackIntake) -> None:
    intake.config.send_timeout_s = 0.05
    out = asyncio.run(intake.submit_batch([signed("a", "ia"), signed("b", "ib")], ANONYMOUS))
    assert [r.status for r in out] == [S.SUBMIT_STATUS_SPOOLED] * 2 and intake.spool.depth() == 2


def test_flushes_in_flight_are_bounded_so_groups_grow_under_load(intake: FeedbackIntake) -> None:
    """With MAX_FLUSHES_IN_FLIGHT waiting for acks, later requests gather into one bigger flush."""
    trips = count_trips(intake)

    async def until_sent(n: int) -> None:
        await wait_until(lambda: len(intake.producer.sent) >= n, 5, f"{n} events to be sent")

    async def wave(tag: str, n: int) -> list[asyncio.Future]:
        return [asyncio.ensure_future(intake.submit(signed(f"{tag}{i}", f"{tag}i{i}"), ANONYMOUS)) for i in range(n)]

    async def scenario() -> list[Any]:
        calls = []
        for k in range(MAX_FLUSHES_IN_FLIGHT):  # each its own flush, all waiting for acks
            calls += await wave(f"w{k}-", 3)
            await until_sent(3 * (k + 1))
        for k in range(3):  # arrive while every flush slot waits: nothing is sent for them yet
            calls += await wave(f"late{k}-", 2)
            await asyncio.sleep(0.02)  # spaced arrivals: a flush loop without the bound would send each wave alone
        assert len(intake.producer.sent) == 3 * MAX_FLUSHES_IN_FLIGHT
        intake.producer.ack_all()
        await until_sent(3 * MAX_FLUSHES_IN_FLIGHT + 6)
        intake.producer.ack_all()
        return await asyncio.gather(*calls)

    out = asyncio.run(scenario())
    assert trips == [3] * MAX_FLUSHES_IN_FLIGHT + [6], "the late requests share one trip"
    assert {r.status for r in out} == {S.SUBMIT_STATUS_ACCEPTED} and len(out) == 3 * MAX_FLUSHES_IN_FLIGHT + 6
