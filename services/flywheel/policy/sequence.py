"""A request's state inside the engine, and how its tokens become text and reach its caller.

`Sequence` is one request (scheduler-owned once admitted); `detokenize` turns its tokens into
text incrementally; `find_stop` / `safe_end` decide what text may be sent; `Outbox` hands a
step's events to the callers' event loops.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import torch

from flywheel.policy.kvbatch import LoadedModel
from flywheel.policy.requests import GenerationRequest, Token, TokenEvent


class Sequence:
    """A request's state inside the engine. Fields below `model` are owned by the scheduler thread."""

    # Set at admission (`admit`): its own random stream, and the ids so far (prompt and answer)
    # for the repetition penalty, on the device of the model it runs on.
    generator: torch.Generator
    seen: torch.Tensor

    def __init__(
        self,
        req: GenerationRequest,
        prompt_ids: list[int],
        loaded: LoadedModel,
        max_new: int,
        stream: bool,
        pinned: LoadedModel | None = None,  # the version it must run on (else the serving one at admission)
    ):
        self.req, self.params, self.stream, self.pinned = req, req.sampling(), stream, pinned
        self.prompt_ids, self.tokenized_by, self.max_new_tokens = prompt_ids, loaded, max_new
        self.seed = req.seed if req.seed is not None else secrets.randbits(63)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.cancelled = False  # set from the event loop; read by the scheduler between steps
        self.done = False
        self.t_submit = time.perf_counter()
        self.expiry: asyncio.TimerHandle | None = None  # puts DeadlineExceeded in `queue` (the event loop's)
        self.model: LoadedModel | None = None
        self.reset()

    def reset(self) -> None:
        """Back to 'nothing generated' (admission, or a re-prefill after a swap)."""
        self.generated: list[int] = []
        self.tokens: list[Token] = []
        self.text, self.emitted = "", 0
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window (detokenize)
        self.finish_reason: str | None = None
        self.t_admit = self.t_first = self.t_last = 0.0

    def admit(self, model: LoadedModel, now: float) -> None:
        """Start running on `model` (the scheduler thread, as it leaves the queue)."""
        self.model, self.t_admit = model, now
        self.generator = torch.Generator(device=model.device).manual_seed(self.seed)
        self.seen = torch.tensor(self.prompt_ids, dtype=torch.long, device=model.device)


def _deliver(items: list[tuple[Sequence, TokenEvent | BaseException]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


class Outbox:
    """Events of one scheduler step, handed to each event loop with ONE `call_soon_threadsafe`.

    Waking a loop writes to its self-pipe (a syscall); per token that was a third of a small
    model's step time with 32 streams. Per step and loop it is noise.
    """

    def __init__(self) -> None:
        self.items: list[tuple[Sequence, TokenEvent | BaseException]] = []

    def put(self, seq: Sequence, item: TokenEvent | BaseException) -> Outbox:
        self.items.append((seq, item))
        return self

    def flush(self) -> None:
        items, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in items:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for seq, _ in batch:
                    seq.cancelled = True


def detokenize(seq: Sequence, m: LoadedModel, final: bool = False) -> None:
    """Bring `seq.text` up to `seq.generated` (= m.decode(seq.generated) once `final`).

    Incremental detokenization as TGI and vLLM do it: decode only a short window of tokens
    (from `prefix_offset`) with and without the newest ones, and append the difference once it
    no longer ends in an incomplete UTF-8 character. Decoding the whole answer every step
    instead costs O(n) per token. Tokenizers that clean up spaces across tokens decode it all.
    """
    ids = seq.generated
    if not m.incremental_detokenization:
        seq.text = m.decode(ids)
        return
    prefix = m.decode(ids[seq.prefix_offset : seq.read_offset]) if seq.read_offset > seq.prefix_offset else ""
    new = m.decode(ids[seq.prefix_offset :])
    if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
        seq.text += new[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for s in stops if (i := text.find(s, max(0, emitted - len(s)))) >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: list[str]) -> int:
    """How much of text a stream may send: hold back an incomplete UTF-8 character and any
    suffix that could be the start of a stop string (TGI's stop criteria see the same text)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold
