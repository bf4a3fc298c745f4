"""How a step's logits become each answer's next token, its text, and the events its caller gets.

A failure here is confined to the answer it belongs to: a row the model gave non-finite logits
(or whose sampling or text raised) fails that answer alone, with a message that carries no
exception text, and every other row of the batch goes on.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from flywheel.core import errors
from flywheel.policy.kvbatch import Batch, LoadedModel
from flywheel.policy.metrics import METRICS
from flywheel.policy.requests import Result, Token, TokenEvent
from flywheel.policy.sampling import FAILED, select_each, select_next
from flywheel.policy.sequence import Outbox, Sequence, detokenize, find_stop, safe_end

log = logging.getLogger(__name__)


class AnswerFailed(errors.FlywheelError):
    """One answer failed inside a decode step (INTERNAL / 500); the others in its batch went on.

    Its message is fixed text, never an exception's, so it may be shown as it is."""

    code, http_status, error_type = grpc.StatusCode.INTERNAL, 500, "generation_failed"

    @property
    def internal(self) -> bool:  # the message carries no internals: callers see it unchanged
        return False


def non_finite(seq: Sequence) -> AnswerFailed:
    return AnswerFailed(
        f"the model produced non-finite logits for this answer at token {len(seq.generated) + 1}; it was stopped "
        "(the other answers were not affected): retry, perhaps with other sampling settings or another seed",
        reason="non_finite_logits",
    )


def answer_failed(seq: Sequence) -> AnswerFailed:
    return AnswerFailed(
        f"this answer failed at token {len(seq.generated) + 1} and was stopped (the other answers were not "
        "affected; the cause is in the service log): retry",
        reason="answer_failed",
    )


def sample_and_emit(batch: Batch, logits: torch.Tensor, outbox: Outbox) -> int:
    """Sample one token per row of `batch` from logits (B, V) and put the callers' events in
    `outbox`. Returns how many answers finished (or failed)."""
    seqs = batch.seqs
    want_logprobs = any(s.req.logprobs for s in seqs)
    args = (logits, [s.params for s in seqs], [s.seen for s in seqs], [s.generator for s in seqs], want_logprobs)
    try:
        tokens, logprobs = select_next(*args)
    except Exception:  # noqa: BLE001 - find the row(s) that raise; only they fail
        log.warning("sampling a batch of %d failed; sampling its rows one by one", len(seqs), exc_info=True)
        tokens, logprobs = select_each(*args)
    now = time.perf_counter()
    ids = tokens.tolist()
    batch.next_ids = tokens.clamp(min=0) if FAILED in ids else tokens  # a failed row leaves before the next step
    lps = logprobs.tolist() if logprobs is not None else [None] * len(ids)
    METRICS.tokens.inc(len(ids))
    finished = 0
    for seq, tok, lp in zip(seqs, ids, lps, strict=True):
        if seq.done:
            continue
        if tok == FAILED:
            finished += fail(seq, non_finite(seq), outbox)
            continue
        if seq.t_first == 0.0:
            seq.t_first = now
            METRICS.ttft.observe(now - seq.t_submit)
        else:
            METRICS.itl.observe(now - seq.t_last)
        seq.t_last = now
        model = seq.model
        assert model is not None  # admitted
        try:
            finished += append_token(seq, model, tok, lp, outbox)
        except Exception:  # noqa: BLE001 - its text or its event failed: this answer alone
            log.exception("answer failed at token %d", len(seq.generated))
            finished += fail(seq, answer_failed(seq), outbox)
    return finished


def fail(seq: Sequence, err: errors.FlywheelError, outbox: Outbox) -> bool:
    """End `seq` with `err` (it leaves its batch before the next step); True."""
    seq.done = True
    outbox.put(seq, err)
    METRICS.requests.labels("error").inc()
    return True


def append_token(seq: Sequence, m: LoadedModel, tok: int, lp: float | None, outbox: Outbox) -> bool:
    """Add `tok` to `seq`'s answer and queue its event; True if that finished the answer."""
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
        result = result_of(seq, m)
        outbox.put(seq, TokenEvent(token, seq.text[seq.emitted :], result))
        METRICS.requests.labels(seq.finish_reason).inc()
        METRICS.e2e_seconds.observe(result.total_time_s)
        return True
    if seq.stream:
        end = safe_end(seq.text, seq.req.stop)
        delta = seq.text[seq.emitted : end] if end > seq.emitted else ""
        seq.emitted = max(seq.emitted, end)
        outbox.put(seq, TokenEvent(token, delta))
    return False


def result_of(seq: Sequence, m: LoadedModel) -> Result:
    """The finished answer, as its caller gets it."""
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
