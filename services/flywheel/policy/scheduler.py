"""Which waiting requests start running at each step: the waiting queue, admission and its limits.

The engine asks its `Scheduler` once per step which requests to prefill, given how many
sequences already run (vLLM's scheduler interface, reduced to what an engine without paged
blocks needs). `FcfsScheduler` admits first come, first served within the step's token budget
(`EngineConfig.max_tokens_per_step`, vLLM's max_num_batched_tokens) and the concurrent-sequence
cap, and never lets a later request overtake the head of the queue.

A scheduler is not thread-safe: the engine calls it under its own lock (the condition its
scheduler thread waits on), so a request added from an event loop wakes that thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from flywheel.core import errors
from flywheel.policy.config import EngineConfig
from flywheel.policy.metrics import METRICS
from flywheel.policy.sequence import Sequence


class Scheduler(Protocol):
    """The waiting requests and the admission policy. Called under the engine's lock."""

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        ...

    @property
    def full(self) -> bool:
        """No room for another request (read without the lock: a hint, `add` decides)."""
        ...

    def refusal(self) -> errors.ResourceExhausted:
        """What a request is told when the queue is full."""
        ...

    def add(self, seq: Sequence) -> None:
        """Queue a new request; ResourceExhausted when the queue is full."""
        ...

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        """Put requests back at the head of the queue, in order (restarted on new weights)."""
        ...

    def abort(self, seq: Sequence) -> bool:
        """Take a waiting request out of the queue; False where it was not waiting."""
        ...

    def admit(self, running: int, prepare: Callable[[Sequence], bool]) -> list[Sequence]:
        """The requests to start this step, out of the queue, given `running` sequences. `prepare`
        readies the head request for the serving model (e.g. tokenizes it again after a swap) and
        returns False where that refused it: it leaves the queue unadmitted."""
        ...

    def clear(self) -> list[Sequence]:
        """Every waiting request, out of the queue (the engine is stopping)."""
        ...


class FcfsScheduler:
    """First come, first served within the step's token budget and the sequence cap."""

    def __init__(self, config: EngineConfig) -> None:
        self.max_queue = config.max_queue
        self.max_sequences = config.max_concurrent_sequences
        self.max_tokens_per_step = config.max_tokens_per_step
        self._queue: deque[Sequence] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def refusal(self) -> errors.ResourceExhausted:
        return errors.ResourceExhausted(
            f"the queue is full ({self.max_queue} requests waiting): retry later", retry_after_s=1.0
        )

    def add(self, seq: Sequence) -> None:
        if self.full:
            raise self.refusal()
        self._queue.append(seq)
        METRICS.queue_depth.set(len(self._queue))

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        self._queue.extendleft(reversed(list(seqs)))  # ahead of newer requests, in their order
        METRICS.queue_depth.set(len(self._queue))

    def abort(self, seq: Sequence) -> bool:
        try:
            self._queue.remove(seq)
            return True
        except ValueError:
            return False
        finally:
            METRICS.queue_depth.set(len(self._queue))

    def admit(self, running: int, prepare: Callable[[Sequence], bool]) -> list[Sequence]:
        # A running sequence decodes one token per step: it takes one token of the budget.
        budget = self.max_tokens_per_step - running
        slots = self.max_sequences - running
        admitted: list[Sequence] = []
        queue = self._queue
        while queue and slots > 0:
            seq = queue[0]
            if seq.cancelled or not prepare(seq):
                queue.popleft()
                continue
            if len(seq.prompt_ids) > budget:
                break  # no overtaking: the head waits for the budget, and so does everyone behind it
            queue.popleft()
            budget -= len(seq.prompt_ids)
            slots -= 1
            admitted.append(seq)
        METRICS.queue_depth.set(len(queue))
        return admitted

    def clear(self) -> list[Sequence]:
        waiting = list(self._queue)
        self._queue.clear()
        METRICS.queue_depth.set(0)
        return waiting
