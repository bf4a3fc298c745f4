"""Continuous-batching inference engine for any Hugging Face causal LM, with hot-swapped weights.

One scheduler thread owns the model. At every step it (1) switches to a version loaded
meanwhile (`flywheel.policy.hotswap`), (2) drops cancelled sequences, (3) asks the scheduler
(`flywheel.policy.scheduler`) which waiting requests to admit within the token budget and the
concurrent-sequence cap and prefills them in one left-padded forward, (4) decodes one token for
every running sequence (`flywheel.policy.answers`: a row whose logits are not finite, or whose
token raises, fails its own answer only), (5) lets finished sequences leave. A request is checked
against `flywheel.core.limits.LimitsConfig` before it is queued (`requests.validate_request`). This is
Orca's iteration-level scheduling (Yu et al., OSDI 2022) as vLLM and TGI run it; the KV cache
is kept per running batch and re-shaped only when the batch changes (`flywheel.policy.kvbatch`,
`flywheel.policy.running`).

Front ends only see `generate`, `stream`, `info`, `load_version`, `start` and `stop` (vLLM's
EngineClient idea): results reach asyncio through one `loop.call_soon_threadsafe` per step
(Outbox), never by blocking the event loop. `snapshot` is for tests and diagnostics.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable

import torch

from flywheel.core import errors
from flywheel.core.limits import LimitsConfig
from flywheel.policy.answers import sample_and_emit
from flywheel.policy.chores import BetweenSteps
from flywheel.policy.config import EngineConfig
from flywheel.policy.hotswap import HotSwap
from flywheel.policy.kvbatch import Batch, LoadedModel
from flywheel.policy.metrics import METRICS
from flywheel.policy.prompts import check_length, prompt_ids
from flywheel.policy.reload import MappedWeights
from flywheel.policy.requests import (
    EngineInfo,
    GenerationRequest,
    Result,
    TokenEvent,
    deadline_exceeded,
    validate_request,
)
from flywheel.policy.running import BatchSnapshot, RunningBatches
from flywheel.policy.scheduler import FcfsScheduler, Scheduler
from flywheel.policy.sequence import Outbox, Sequence

__all__ = ["Engine", "EngineSnapshot", "GenerationRequest"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """The engine between two steps: what runs, on which versions, and what waits."""

    version: int | None  # the version new requests start on
    batches: tuple[BatchSnapshot, ...]
    running: int
    waiting: int
    draining: bool  # answers of a previous version still run


def step_failure(e: Exception) -> errors.FlywheelError:
    """What the answers of a step that raised are told (the last resort: a row's own failure is
    confined to its answer in `answers.sample_and_emit`). No exception text: it is logged."""
    ref = f" (error id {errors.log_internal(e, 'a policy engine step')})"
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
        return errors.ResourceExhausted(
            f"the policy ran out of memory on a step{ref}; its answers were stopped: retry, or ask for fewer tokens",
            retry_after_s=1.0,
        )
    return errors.Unavailable(
        f"a generation step failed{ref}; its answers were stopped and the cause is in the service log: retry",
        retry_after_s=1.0,
    )


class Engine:
    """The policy engine. Thread-safe; `generate`/`stream` are coroutines for the event loop."""

    def __init__(
        self, config: EngineConfig | None = None, scheduler: Scheduler | None = None, limits: LimitsConfig | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.limits = limits or LimitsConfig()  # what a request may carry, checked before it is queued
        self._cv = threading.Condition()  # the scheduler thread waits on it for work
        self._scheduler = scheduler or FcfsScheduler(self.config)  # guarded by _cv
        self._batches = RunningBatches()  # scheduler-owned
        self._admitted: list[Sequence] = []  # admitted this step, not yet in a batch; scheduler-owned
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox = Outbox()  # scheduler-owned: flushed at the end of every step
        self.between_steps = BetweenSteps(self._cv, lambda: self._thread)
        self._swap = HotSwap(self.config, self._cv, self._scheduler, self._batches, self.between_steps)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduler thread (idempotent). Requests are refused until a model is loaded."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="policy-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; waiting and running requests fail with UNAVAILABLE."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def ready(self) -> bool:
        return self._batches.serving is not None and self.between_steps.scheduler_alive

    @property
    def serving_model(self) -> LoadedModel | None:
        """The loaded version new requests start on (None before the first load)."""
        return self._batches.serving

    def info(self) -> EngineInfo:
        cur, c = self._batches.serving, self.config
        with self._cv:
            waiting = self._scheduler.waiting
        return EngineInfo(
            model=cur.source if cur else c.model,
            version=cur.version if cur else None,
            device=str(cur.device) if cur else c.device,
            dtype=str(cur.dtype).removeprefix("torch.") if cur else c.dtype,
            max_context_tokens=cur.context if cur else 0,
            max_input_tokens=min(c.max_input_tokens, cur.context - 1) if cur else c.max_input_tokens,
            max_new_tokens=min(c.max_new_tokens_cap, cur.context - 1) if cur else c.max_new_tokens_cap,
            max_concurrent_sequences=c.max_concurrent_sequences,
            max_queue=c.max_queue,
            running=self._batches.running,
            waiting=waiting,
            ready=self.ready,
            last_swap_error=self._swap.last_error,
        )

    def snapshot(self) -> EngineSnapshot:
        """A consistent picture of the running batches and the queue, taken between two steps
        (waits for the current step to end)."""

        def take() -> EngineSnapshot:
            b = self._batches
            with self._cv:
                waiting = self._scheduler.waiting
            version = b.serving.version if b.serving else None
            return EngineSnapshot(version, b.snapshot(), b.running, waiting, b.draining)

        return self.between_steps(take)

    # ------------------------------------------------------------------ hot swap
    def load_version(
        self,
        path: str,
        version: int,
        on_switch: Callable[[], None] | None = None,
        verify: Callable[[], object] | None = None,
        weights: MappedWeights | None = None,
    ) -> EngineInfo:
        """Load `path` as `version` in the caller's thread, then switch between two decode steps.

        Blocking: call it from a worker thread (`asyncio.to_thread`). Loading the version already
        served is a no-op (announcements arrive at least once); an older version is a rollback,
        loaded like any other. A checkpoint that cannot be loaded raises FailedPrecondition and
        the current version keeps serving. `on_switch` runs in the scheduler thread at the switch,
        before any step runs on the new version (e.g. to clear a reported swap error atomically).
        New weights of the serving architecture skip from_pretrained (`flywheel.policy.reload`),
        whose Python-heavy parts run between decode steps (`between_steps`).

        `verify` (e.g. the result of a sha256 check running in other threads) is awaited before
        anything switches; whatever it raises is raised here and nothing changes. Only new weights
        for the serving config are read before it returns (the work then overlaps the hashing): a
        checkpoint with another config is not even parsed until it is verified. `weights`: its
        safetensors' tensors, already read and verified (`reload.reload_weights`).
        """
        self._swap.load(path, version, on_switch, verify, weights)
        return self.info()

    def load_adapter(
        self,
        path: str,
        version: int,
        base: Callable[[], tuple[str, int]],
        on_switch: Callable[[], None] | None = None,
    ) -> EngineInfo:
        """Serve the LoRA adapter version at `path` (PEFT's layout) on the weights this engine serves,
        unmerged (`flywheel.policy.lora`): nothing of the base is copied or read again, and the answers
        in flight finish on the previous version in the same forwards. The caller checks that those
        weights are the adapter's base; `base()` names them (path, version) for an engine that serves
        nothing yet, which loads them first. Otherwise as `load_version`: blocking, a no-op for the
        version already served, FailedPrecondition (the current version serving on) if it cannot load.
        """
        self._swap.load_adapter(path, version, base, on_switch)
        return self.info()

    def adapter_variant(self, path: str, version: int) -> LoadedModel:
        """The LoRA adapter version at `path` on the whole weights this engine serves, without serving it:
        requests pinned to it (`generate(..., on=)`, e.g. a GeneratePair candidate) run on the serving module
        tree with its deltas, in a batch of their own. Blocking; the caller checks the base. FailedPrecondition
        if it cannot load."""
        return self._swap.variant(path, version)

    # ------------------------------------------------------------------ public API
    async def generate(
        self, req: GenerationRequest, timeout_s: float | None = None, on: LoadedModel | None = None
    ) -> Result:
        """The whole answer, or DeadlineExceeded after `timeout_s`. Cancelling the awaiting task frees
        the sequence's slot. `on`: a version from `adapter_variant` to answer with instead of the serving one."""
        seq = self._submit(req, stream=False, timeout_s=timeout_s, on=on)
        try:
            while True:
                ev = await seq.queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.result is not None:
                    return ev.result
        finally:
            self._cancel(seq)

    async def stream(self, req: GenerationRequest, timeout_s: float | None = None) -> AsyncGenerator[TokenEvent, None]:
        """Tokens as they come; the last event has `.result`; DeadlineExceeded once the whole answer
        has taken `timeout_s`. Closing the iterator (or cancelling the task that iterates) frees the
        slot; use `contextlib.aclosing` for prompt release. Being an async generator, bad input
        raises at the first `__anext__`, before any event."""
        seq = self._submit(req, stream=True, timeout_s=timeout_s)
        try:
            while True:
                ev = await seq.queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.result is not None:
                    return
        finally:
            self._cancel(seq)

    def check_capacity(self) -> None:
        """ResourceExhausted now if the queue is full: a caller refuses an overload before it parses,
        validates or tokenizes anything (a refused request then costs the serving core little)."""
        if self._scheduler.full:
            refusal = self._scheduler.refusal()
            METRICS.requests.labels(f"rejected_{refusal.error_type}").inc()  # as `_submit` counts it
            raise refusal

    def _submit(
        self, req: GenerationRequest, stream: bool, timeout_s: float | None = None, on: LoadedModel | None = None
    ) -> Sequence:
        try:
            if self._scheduler.full:  # before the request's validation and tokenization
                raise self._scheduler.refusal()
            loaded = on or self._batches.serving
            if loaded is None:
                raise errors.Unavailable("the policy model is not loaded yet: retry shortly", retry_after_s=1.0)
            if not self.ready:
                raise errors.Unavailable("the policy engine is not running: retry on another replica")
            c = self.config
            max_new = validate_request(req, self.limits, c.default_max_new_tokens, c.max_new_tokens_cap)
            ids = prompt_ids(req, loaded)
            check_length(len(ids), max_new, self.config.max_input_tokens, loaded)
            seq = Sequence(req, ids, loaded, max_new, stream, pinned=on)
            with self._cv:
                self._scheduler.add(seq)
                self._cv.notify_all()
            if timeout_s is not None:  # one timer per answer: a timeout around each token's wait cost
                # the event loop a timer-heap push and cancel per token, a quarter of its time at 32 streams
                expired = deadline_exceeded(timeout_s)
                seq.expiry = seq.loop.call_later(max(0.0, timeout_s), seq.queue.put_nowait, expired)
            return seq
        except errors.FlywheelError as e:
            METRICS.requests.labels(f"rejected_{e.error_type}").inc()
            raise

    def _cancel(self, seq: Sequence) -> None:
        if seq.expiry is not None:
            seq.expiry.cancel()
        if seq.done:
            return
        seq.cancelled = True
        with self._cv:
            if self._scheduler.abort(seq):
                METRICS.requests.labels("cancelled").inc()
            # else running: the scheduler thread drops it before its next step
            self._cv.notify_all()

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._stopping
                    or self._batches
                    or self._scheduler.waiting
                    or self._swap.pending
                    or self.between_steps.pending
                ):
                    self._cv.wait()
                if self._stopping:
                    break
            self.between_steps.run_one()  # at most one per step, so a swap delays no step by more than one
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the thread must survive anything a batch does
                self._fail(step_failure(e), waiting=False)
            self._outbox.flush()
        self._fail(errors.Unavailable("the policy engine is shutting down: retry on another replica"), waiting=True)

    def _fail(self, err: errors.FlywheelError, waiting: bool) -> None:
        """Fail the running sequences (a step raised, e.g. out of memory) and, on shutdown, the waiting ones."""
        with self._cv:
            running = self._batches.sequences() + self._admitted
            victims = [s for s in dict.fromkeys(running) if not s.done]
            self._admitted = []
            if waiting:
                victims += self._scheduler.clear()
            self._batches.clear()
        for s in victims:
            s.done = True
            self._outbox.put(s, err)
            METRICS.requests.labels("error").inc()
        METRICS.running.set(0)
        self._outbox.flush()  # after the events the failed step had already queued

    def _step(self) -> None:
        t0 = time.perf_counter()
        self._swap.switch_if_pending()
        batches = self._batches
        batches.drop_cancelled()
        admitted = self._admitted = self._admit()  # held here until merged, so a failure can fail them
        by_model: dict[int, list[Sequence]] = {}  # the serving version's, and any pinned version's
        for seq in admitted:
            by_model.setdefault(id(seq.model), []).append(seq)
        new_batches = []
        for seqs in by_model.values():
            assert seqs[0].model is not None  # admitted
            new_batch = Batch.prefill(seqs[0].model, seqs)
            logits = new_batch.last_logits
            assert logits is not None  # what the prefill left
            batches.running -= sample_and_emit(new_batch, logits, self._outbox)
            new_batches.append(new_batch)
        for batch in list(batches.by_model.values()):
            batches.running -= sample_and_emit(batch, batch.decode(), self._outbox)
        for new_batch in new_batches:
            batches.add(new_batch)
        self._admitted = []
        batches.drop_finished()
        METRICS.running.set(batches.running)
        METRICS.step_seconds.observe(time.perf_counter() - t0)

    def _admit(self) -> list[Sequence]:
        cur = self._batches.serving
        if cur is None:
            return []
        with self._cv:
            admitted = self._scheduler.admit(self._batches.running, self._prepare)
        self._batches.running += len(admitted)
        now = time.perf_counter()
        for seq in admitted:
            seq.admit(seq.pinned or cur, now)
            METRICS.queue_seconds.observe(now - seq.t_submit)
            METRICS.prompt_tokens.inc(len(seq.prompt_ids))
        return admitted

    def _prepare(self, seq: Sequence) -> bool:
        """Ready a request at the head of the queue for the serving model; False if it refuses it."""
        cur = seq.pinned or self._batches.serving
        if cur is not None and seq.tokenized_by is not cur:  # a swap may bring another tokenizer
            try:
                ids = prompt_ids(seq.req, cur)
                check_length(len(ids), seq.max_new_tokens, self.config.max_input_tokens, cur)
            except errors.FlywheelError as e:
                seq.done = True
                self._outbox.put(seq, e)
                ids = []
            seq.prompt_ids, seq.tokenized_by = ids, cur
        return not seq.done
