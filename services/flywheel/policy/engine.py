"""Continuous-batching inference engine for any Hugging Face causal LM, with hot-swapped weights.

One scheduler thread owns the model. Requests wait in a bounded FCFS queue; at every step the
scheduler (1) applies a pending hot swap, (2) drops cancelled sequences, (3) admits waiting
requests within the token budget and the concurrent-sequence cap and prefills them in one
left-padded forward, (4) decodes one token for every running sequence, (5) lets finished
sequences leave. This is Orca's iteration-level scheduling (Yu et al., OSDI 2022) as vLLM and
TGI run it; the KV cache is kept per running batch and re-shaped only when the batch changes
(TGI's `Batch.concatenate` / `Batch.filter`): left padding, an attention mask and explicit
position ids make each row compute exactly what it would compute alone.

Front ends only see `generate`, `stream`, `info`, `load_version`, `start` and `stop` (vLLM's
EngineClient idea): results reach asyncio through one `loop.call_soon_threadsafe` per step (Outbox), never by
blocking the event loop.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

from flywheel.core import errors
from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import Batch, LoadedModel, load_model
from flywheel.policy.metrics import METRICS
from flywheel.policy.mixed import MixedForward
from flywheel.policy.reload import MappedWeights, try_reload
from flywheel.policy.requests import (
    ROLES,
    EngineInfo,
    GenerationRequest,
    Result,
    Token,
    TokenEvent,
    deadline_exceeded,
    validate_sampling,
)
from flywheel.policy.sampling import select_next
from flywheel.policy.sequence import Outbox, Sequence, detokenize, find_stop, safe_end

log = logging.getLogger(__name__)
T = TypeVar("T")

_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move what exists after the first load (torch, transformers, the model: ~500k objects) out of
    the garbage collector's reach. A full collection walks every tracked object with the GIL held,
    0.3-0.5 s on a small CPU, and the allocations of a hot swap were what triggered one. Frozen
    objects are still freed by reference counting (a swapped-out model is: see the tests)."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


class Engine:
    """The policy engine. Thread-safe; `generate`/`stream` are coroutines for the event loop."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # guarded by _cv
        self._pending_swap: LoadedModel | None = None  # guarded by _cv
        self._pending_mix: MixedForward | None = None  # guarded by _cv; the old and pending versions' forward
        self._on_switch: Callable[[], None] | None = None  # guarded by _cv
        self._chores: deque[tuple[Callable[[], object], Future]] = deque()  # guarded by _cv; see _between_steps
        self._swap_applied = threading.Event()
        self._current: LoadedModel | None = None  # read anywhere, replaced only by the scheduler
        self._batches: dict[int, Batch] = {}  # id(LoadedModel) -> running batch; scheduler-owned
        self._admitted: list[Sequence] = []  # admitted this step, not yet in a batch; scheduler-owned
        self._running = 0
        self._draining = False  # sequences of a previous version still run; set by the scheduler
        self._swap_lock = threading.Lock()
        self._last_swap_error = ""
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox = Outbox()  # scheduler-owned: flushed at the end of every step

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
        return self._current is not None and self._thread is not None and self._thread.is_alive()

    def info(self) -> EngineInfo:
        cur, c = self._current, self.config
        with self._cv:
            waiting = len(self._waiting)
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
            running=self._running,
            waiting=waiting,
            ready=self.ready,
            last_swap_error=self._last_swap_error,
        )

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
        whose Python-heavy parts run as chores between decode steps (`_between_steps`).

        `verify` (e.g. the result of a sha256 check running in other threads) is awaited before
        anything switches; whatever it raises is raised here and nothing changes. Only new weights
        for the serving config are read before it returns (the work then overlaps the hashing): a
        checkpoint with another config is not even parsed until it is verified. `weights`: its
        safetensors' tensors, already read and verified (`reload.reload_weights`).
        """
        with self._swap_lock:
            cur = self._current
            if cur is not None and cur.version == version and cur.source == str(path):
                return self.info()
            self._wait_for_drain()  # at most two copies of the weights: old + new
            t0 = time.perf_counter()
            loaded = cur and try_reload(
                cur, str(path), version, between_steps=self._between_steps, weights=weights
            )  # None on any error
            reloaded = loaded is not None
            if verify is not None:
                verify()  # what it raises goes to the caller (who reports it); nothing has switched
            try:
                loaded = loaded or load_model(str(path), version, self.config)
            except Exception as e:  # noqa: BLE001 - any failure to load is a refused checkpoint
                self._last_swap_error = f"version {version} from {path}: {type(e).__name__}: {e}"
                METRICS.swaps.labels("failed").inc()  # after the error is readable: watchers poll the count
                log.error("hot swap refused: %s", self._last_swap_error)
                raise errors.FailedPrecondition(
                    f"could not load policy version {version} from {path!r} ({type(e).__name__}: {e}); "
                    f"still serving version {cur.version if cur else None}"
                ) from e
            mix = self._mixed_forward(cur, loaded, reloaded)
            self._swap_applied.clear()
            with self._cv:
                self._pending_swap, self._pending_mix, self._on_switch = loaded, mix, on_switch
                self._cv.notify_all()
            while not self._swap_applied.wait(0.05):
                if not (self._thread and self._thread.is_alive()):
                    self._apply_swap()  # no scheduler (not started or stopped): nothing runs, switch here
            if cur is None:
                _freeze_startup_objects()
            METRICS.swaps.labels("ok").inc()
            METRICS.swap_seconds.observe(time.perf_counter() - t0)
            METRICS.version.set(version)
            log.info("serving policy version %s from %s", version, path)
            return self.info()

    def _between_steps(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the scheduler thread between two decode steps and return its result (or raise
        its error); here, if no scheduler runs. For the Python-heavy parts of a hot swap, which would
        otherwise slow every step they overlap (`flywheel.policy.reload`)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        with self._cv:
            self._chores.append((fn, done))
            self._cv.notify_all()
        while True:
            try:
                return done.result(timeout=0.05)
            except TimeoutError:
                if not (self._thread and self._thread.is_alive()) and done.cancel():
                    return fn()  # the scheduler stopped before it got there

    def _run_chore(self) -> None:
        with self._cv:
            if not self._chores:
                return
            fn, done = self._chores.popleft()
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting loader
                done.set_exception(e)

    def _mixed_forward(self, cur: LoadedModel | None, new: LoadedModel, reloaded: bool) -> MixedForward | None:
        """One forward for both versions during the drain, if they can share one (`flywheel.policy.mixed`).
        `reloaded`: new is a copy of cur's module tree with other weights (`flywheel.policy.reload`)."""
        if cur is None or not self.config.mixed_drain:
            return None
        mix = MixedForward.pair(cur, new, same_tree=reloaded)
        if mix is None:
            log.info(
                "version %s drains with one forward per version: it cannot share one with %s", new.version, cur.version
            )
        return mix

    def _wait_for_drain(self) -> None:
        deadline = time.monotonic() + self.config.swap_drain_timeout_s
        while self._draining:
            if time.monotonic() > deadline:
                raise errors.Unavailable("the previous swap is still draining: announce the version again later")
            time.sleep(0.01)

    def _apply_swap(self) -> None:
        """Scheduler side of a swap: runs between steps, so each sequence has one version for all its steps."""
        with self._cv:
            new, self._pending_swap = self._pending_swap, None
            mix, self._pending_mix = self._pending_mix, None
            on_switch, self._on_switch = self._on_switch, None
        if new is None:
            return
        self._last_swap_error = ""
        if on_switch is not None:
            on_switch()
        old, self._current = self._current, new
        if old is not None and self.config.swap_policy == "reprefill" and id(old) in self._batches:
            # Restart every answer whose tokens no caller has seen from its prompt on the new
            # weights, so its result reports the new version for all its tokens. A stream that
            # already sent tokens cannot take them back: it finishes on the old weights.
            batch = self._batches[id(old)]
            restart = [s for s in batch.seqs if not (s.stream and s.generated)]
            batch.filter([s for s in batch.seqs if s not in restart])
            with self._cv:
                for s in reversed(restart):
                    s.reset()
                    s.model = None
                    self._waiting.appendleft(s)  # keep their place ahead of newer requests
        if mix is not None and id(old) in self._batches and self._batches[id(old)].seqs:
            batch = self._batches.pop(id(old))  # its answers finish on old's weights, in new's forwards
            batch.adopt(mix)
            self._batches[id(new)] = batch
        self._drop_empty_batches()
        self._swap_applied.set()

    def _drop_empty_batches(self) -> None:
        for key in [k for k, b in self._batches.items() if not b.seqs]:
            del self._batches[key]  # the last reference to an old model goes here
        self._running = sum(len(b.seqs) for b in self._batches.values())
        cur = self._current
        self._draining = any(b.model is not cur or b.mix is not None for b in self._batches.values())

    # ------------------------------------------------------------------ public API
    async def generate(self, req: GenerationRequest, timeout_s: float | None = None) -> Result:
        """The whole answer, or DeadlineExceeded after `timeout_s`. Cancelling the awaiting task frees
        the sequence's slot."""
        seq = self._submit(req, stream=False, timeout_s=timeout_s)
        try:
            while True:
                ev = await seq.queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.result is not None:
                    return ev.result
        finally:
            self._cancel(seq)

    async def stream(self, req: GenerationRequest, timeout_s: float | None = None) -> AsyncIterator[TokenEvent]:
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

    def _cancel(self, seq: Sequence) -> None:
        if seq.expiry is not None:
            seq.expiry.cancel()
        if seq.done:
            return
        seq.cancelled = True
        with self._cv:
            try:
                self._waiting.remove(seq)
                METRICS.requests.labels("cancelled").inc()
            except ValueError:
                pass  # running: the scheduler drops it before its next step
            METRICS.queue_depth.set(len(self._waiting))
            self._cv.notify_all()

    # ------------------------------------------------------------------ validation
    def _submit(self, req: GenerationRequest, stream: bool, timeout_s: float | None = None) -> Sequence:
        try:
            loaded = self._current
            if loaded is None:
                raise errors.Unavailable("the policy model is not loaded yet: retry shortly", retry_after_s=1.0)
            if not self.ready:
                raise errors.Unavailable("the policy engine is not running: retry on another replica")
            max_new = validate_sampling(req, self.config.default_max_new_tokens, self.config.max_new_tokens_cap)
            ids = self._tokenize(req, loaded)
            self._check_length(len(ids), max_new, loaded)
            seq = Sequence(req, ids, loaded, max_new, stream)
            with self._cv:
                if len(self._waiting) >= self.config.max_queue:
                    raise errors.ResourceExhausted(
                        f"the queue is full ({self.config.max_queue} requests waiting): retry later",
                        retry_after_s=1.0,
                    )
                self._waiting.append(seq)
                METRICS.queue_depth.set(len(self._waiting))
                self._cv.notify_all()
            if timeout_s is not None:  # one timer per answer: a timeout around each token's wait cost
                # the event loop a timer-heap push and cancel per token, a quarter of its time at 32 streams
                expired = deadline_exceeded(timeout_s)
                seq.expiry = seq.loop.call_later(max(0.0, timeout_s), seq.queue.put_nowait, expired)
            return seq
        except errors.FlywheelError as e:
            METRICS.requests.labels(f"rejected_{e.error_type}").inc()
            raise

    def _tokenize(self, req: GenerationRequest, loaded: LoadedModel) -> list[int]:
        bad = errors.InvalidArgument
        if req.prompt is not None and req.messages:
            raise bad("set either prompt or messages, not both")
        if req.messages is not None:
            if not req.messages:
                raise bad("messages is empty: send at least one message")
            for i, m in enumerate(req.messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise bad(f"messages[{i}] must have a role ({', '.join(ROLES)}) and a string content")
            if not any(m["content"].strip() for m in req.messages):
                raise bad("every message is empty: send some text")
            if not loaded.tokenizer.chat_template:
                raise bad(f"model {loaded.source!r} has no chat template: send a prompt instead of messages")
            try:
                return list(loaded.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True))
            except Exception as e:  # noqa: BLE001 - a template can reject a conversation shape
                raise bad(f"the chat template rejected these messages: {e}") from e
        if req.prompt is None or not req.prompt.strip():
            raise bad("prompt is empty: send some text (or messages)")
        return loaded.encode(req.prompt)

    def _check_length(self, n: int, max_new: int, loaded: LoadedModel) -> None:
        limit = self.config.max_input_tokens
        if n > limit:
            raise errors.InvalidArgument(
                f"the prompt has {n} tokens, over the limit of {limit} input tokens: shorten it"
            )
        if n + max_new > loaded.context:
            raise errors.InvalidArgument(
                f"prompt ({n} tokens) + max_new_tokens ({max_new}) = {n + max_new} is over the model's context "
                f"of {loaded.context} tokens: lower max_new_tokens to at most {max(loaded.context - n, 0)} "
                f"or shorten the prompt"
            )

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._pending_swap or self._batches or self._chores):
                    self._cv.wait()
                if self._stopping:
                    break
            self._run_chore()  # at most one per step, so a swap delays no step by more than one chore
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the thread must survive anything a batch does
                log.exception("engine step failed; failing the running sequences")
                self._fail(errors.FlywheelError(f"generation failed: {type(e).__name__}: {e}"), waiting=False)
            self._outbox.flush()
        self._fail(errors.Unavailable("the policy engine is shutting down: retry on another replica"), waiting=True)

    def _fail(self, err: errors.FlywheelError, waiting: bool) -> None:
        """Fail the running sequences (a step raised, e.g. out of memory) and, on shutdown, the waiting ones."""
        with self._cv:
            running = [s for b in self._batches.values() for s in b.seqs] + self._admitted
            victims = [s for s in dict.fromkeys(running) if not s.done]
            self._admitted = []
            if waiting:
                victims += list(self._waiting)
                self._waiting.clear()
            self._batches.clear()
            self._running, self._draining = 0, False
            METRICS.queue_depth.set(len(self._waiting))
        for s in victims:
            s.done = True
            self._outbox.put(s, err)
            METRICS.requests.labels("error").inc()
        METRICS.running.set(0)
        self._outbox.flush()  # after the events the failed step had already queued

    def _step(self) -> None:
        t0 = time.perf_counter()
        self._apply_swap()
        for batch in self._batches.values():
            if any(s.cancelled for s in batch.seqs):
                for s in batch.seqs:
                    if s.cancelled and not s.done:
                        s.done = True
                        METRICS.requests.labels("cancelled").inc()
                batch.filter([s for s in batch.seqs if not s.cancelled])
        self._drop_empty_batches()
        admitted = self._admitted = self._admit()  # held here until merged, so a failure can fail them
        new_batch = None
        if admitted:
            new_batch = Batch.prefill(self._current, admitted)
            self._after_forward(new_batch, new_batch.last_logits)
        for batch in list(self._batches.values()):
            self._after_forward(batch, batch.decode())
        if new_batch is not None:
            key = id(self._current)
            if key in self._batches:
                self._batches[key].merge(new_batch)
            else:
                self._batches[key] = new_batch
        self._admitted = []
        for batch in self._batches.values():
            if any(s.done for s in batch.seqs):
                batch.filter([s for s in batch.seqs if not s.done])
        self._drop_empty_batches()
        METRICS.running.set(self._running)
        METRICS.step_seconds.observe(time.perf_counter() - t0)

    def _admit(self) -> list[Sequence]:
        """FCFS admission within the sequence cap and the step's token budget (no overtaking)."""
        cur = self._current
        budget = self.config.max_tokens_per_step - self._running
        slots = self.config.max_concurrent_sequences - self._running
        admitted: list[Sequence] = []
        with self._cv:
            while self._waiting and slots > 0:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    continue
                if seq.tokenized_by is not cur:  # a swap may bring another tokenizer
                    seq.prompt_ids, seq.tokenized_by = self._retokenize(seq, cur), cur
                if seq.done:  # refused by the new model's limits
                    self._waiting.popleft()
                    continue
                if len(seq.prompt_ids) > budget:
                    break
                self._waiting.popleft()
                budget -= len(seq.prompt_ids)
                slots -= 1
                admitted.append(seq)
            METRICS.queue_depth.set(len(self._waiting))
        self._running += len(admitted)
        now = time.perf_counter()
        for seq in admitted:
            seq.model, seq.t_admit = cur, now
            seq.generator = torch.Generator(device=cur.device).manual_seed(seq.seed)
            seq.seen = torch.tensor(seq.prompt_ids, dtype=torch.long, device=cur.device)
            METRICS.queue_seconds.observe(now - seq.t_submit)
            METRICS.prompt_tokens.inc(len(seq.prompt_ids))
        return admitted

    def _retokenize(self, seq: Sequence, cur: LoadedModel) -> list[int]:
        try:
            ids = self._tokenize(seq.req, cur)
            self._check_length(len(ids), seq.max_new_tokens, cur)
            return ids
        except errors.FlywheelError as e:
            seq.done = True
            self._outbox.put(seq, e)
            return []

    def _after_forward(self, batch: Batch, logits: torch.Tensor) -> None:
        """Sample one token per row of `batch` from logits (B, V) and hand events to the callers."""
        seqs = batch.seqs
        want_logprobs = any(s.req.logprobs for s in seqs)
        tokens, logprobs = select_next(
            logits, [s.params for s in seqs], [s.seen for s in seqs], [s.generator for s in seqs], want_logprobs
        )
        batch.next_ids = tokens
        now = time.perf_counter()
        ids = tokens.tolist()
        lps = logprobs.tolist() if logprobs is not None else [None] * len(ids)
        METRICS.tokens.inc(len(ids))
        for seq, tok, lp in zip(seqs, ids, lps, strict=True):
            if seq.done:
                continue
            if seq.t_first == 0.0:
                seq.t_first = now
                METRICS.ttft.observe(now - seq.t_submit)
            else:
                METRICS.itl.observe(now - seq.t_last)
            seq.t_last = now
            self._append(seq, seq.model, tok, lp)

    def _append(self, seq: Sequence, m: LoadedModel, tok: int, lp: float | None) -> None:
        seq.generated.append(tok)
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.cat([seq.seen, torch.tensor([tok], device=seq.seen.device)])
        # The text is only needed per step to stream it or to look for stop strings; otherwise
        # it is decoded once at the end (it was a quarter of a small model's step time).
        live_text = seq.stream or bool(seq.req.stop)
        if tok in m.eos_ids and not seq.req.ignore_eos:
            seq.finish_reason = "eos_token"
        else:
            if live_text:
                detokenize(seq, m)
                cut = find_stop(seq.text, seq.req.stop, seq.emitted)
                if cut is not None:
                    seq.text, seq.finish_reason = seq.text[:cut], "stop_sequence"
            if seq.finish_reason is None and len(seq.generated) >= seq.max_new_tokens:
                seq.finish_reason = "length"
        token = Token(tok, m.token_text(tok), lp if seq.req.logprobs else None, tok in m.special_ids)
        seq.tokens.append(token)
        if seq.finish_reason is not None:
            if not live_text:
                seq.text = m.decode(seq.generated)
            elif seq.finish_reason != "stop_sequence":
                detokenize(seq, m, final=True)  # with any incomplete character, as decode() gives it
            seq.done = True
            self._running -= 1  # info() is exact as soon as the caller has its result
            result = self._result(seq, m)
            self._outbox.put(seq, TokenEvent(token, seq.text[seq.emitted :], result))
            METRICS.requests.labels(seq.finish_reason).inc()
            METRICS.e2e_seconds.observe(result.total_time_s)
        elif seq.stream:
            end = safe_end(seq.text, seq.req.stop)
            delta = seq.text[seq.emitted : end] if end > seq.emitted else ""
            seq.emitted = max(seq.emitted, end)
            self._outbox.put(seq, TokenEvent(token, delta))

    def _result(self, seq: Sequence, m: LoadedModel) -> Result:
        now = time.perf_counter()
        return Result(
            text=seq.text,
            finish_reason=seq.finish_reason or "length",
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.generated),
            tokens=seq.tokens,
            version=m.version,
            model=m.source,
            seed=seq.seed,
            queue_time_s=seq.t_admit - seq.t_submit,
            time_to_first_token_s=seq.t_first - seq.t_submit,
            total_time_s=now - seq.t_submit,
            prompt_text=seq.req.prompt if seq.req.prompt is not None else m.render_chat(seq.req.messages or []),
        )
