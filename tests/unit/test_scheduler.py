"""FCFS admission: the token budget, the sequence cap, no overtaking, a full queue, requeued restarts."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from flywheel.core import errors
from flywheel.policy.config import EngineConfig
from flywheel.policy.scheduler import FcfsScheduler, Scheduler
from flywheel.policy.sequence import Sequence


@dataclasses.dataclass(eq=False)
class Waiting:
    """What admission reads of a Sequence."""

    name: str
    prompt_ids: list[int]
    cancelled: bool = False


def seq(name: str, tokens: int) -> Sequence:
    return cast(Sequence, Waiting(name, [0] * tokens))  # a stand-in: the scheduler reads no more


def names(seqs: list[Sequence]) -> list[str]:
    return [cast(Waiting, s).name for s in seqs]


def scheduler(**limits: Any) -> Scheduler:
    return FcfsScheduler(EngineConfig(device="cpu", **limits))


def always(_: Sequence) -> bool:
    return True


def test_admits_in_order_within_the_token_budget_and_never_overtakes() -> None:
    s = scheduler(max_tokens_per_step=100, max_input_tokens=64, max_concurrent_sequences=8)
    for name, n in [("a", 40), ("b", 40), ("c", 30), ("d", 5)]:
        s.add(seq(name, n))
    # 3 running take 3 tokens of the budget: a + b fit 97, c does not, and d may not pass c.
    assert names(s.admit(3, always)) == ["a", "b"] and s.waiting == 2
    assert names(s.admit(0, always)) == ["c", "d"] and s.waiting == 0


def test_the_sequence_cap_counts_the_running_ones() -> None:
    s = scheduler(max_concurrent_sequences=3)
    for name in "abcd":
        s.add(seq(name, 2))
    assert names(s.admit(2, always)) == ["a"]
    assert s.admit(3, always) == []
    assert names(s.admit(0, always)) == ["b", "c", "d"]


def test_cancelled_and_refused_requests_leave_the_queue_unadmitted() -> None:
    s = scheduler()
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for x in (a, b, c):
        s.add(x)
    a.cancelled = True
    assert names(s.admit(0, lambda x: x is not b)) == ["c"] and s.waiting == 0


def test_a_full_queue_refuses_and_abort_takes_a_waiting_request_out() -> None:
    s = scheduler(max_queue=2)
    a, b = seq("a", 2), seq("b", 2)
    s.add(a)
    s.add(b)
    with pytest.raises(errors.ResourceExhausted, match="queue is full"):
        s.add(seq("c", 2))
    assert s.abort(a) and not s.abort(a) and s.waiting == 1
    assert names(s.clear()) == ["b"] and s.waiting == 0


def test_requeued_requests_go_first_in_their_order() -> None:
    s = scheduler()
    s.add(seq("new", 2))
    s.requeue([seq("r1", 2), seq("r2", 2)])
    assert names(s.admit(0, always)) == ["r1", "r2", "new"]
