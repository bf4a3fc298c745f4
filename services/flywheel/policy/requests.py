"""The engine's domain objects: what a front end sends (GenerationRequest) and gets back.

Plain dataclasses, so the gRPC and HTTP servicers only convert protobuf / JSON to these and
back (TGI's servicer rule); `validate_request` is the one place a request's ranges live (the
configurable ones in `flywheel.core.limits.LimitsConfig`).
"""

from __future__ import annotations

import dataclasses
import math

from flywheel.core import errors
from flywheel.core.limits import LimitsConfig
from flywheel.policy.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
SEED_MAX = 2**63 - 1  # seeds are int64 wherever they travel (JSON clients, the Interaction record)


@dataclasses.dataclass
class GenerationRequest:
    """One generation: exactly one of `prompt` or `messages` (a chat), plus sampling fields."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_new_tokens: int | None = None  # None: EngineConfig.default_max_new_tokens
    temperature: float = 1.0  # 0 = greedy unless do_sample
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random seed, reported in the result
    stop: list[str] = dataclasses.field(default_factory=list)
    do_sample: bool = False
    logprobs: bool = False
    ignore_eos: bool = False  # keep going past EOS (benchmarks; vLLM's ignore_eos)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.do_sample)


@dataclasses.dataclass
class Token:
    id: int
    text: str
    logprob: float | None  # set when the request asked for logprobs
    special: bool


@dataclasses.dataclass
class Result:
    """A finished answer. `version` produced every one of its tokens."""

    text: str
    finish_reason: str  # "eos_token", "length" or "stop_sequence"
    prompt_tokens: int
    generated_tokens: int
    tokens: list[Token]
    version: int
    model: str
    seed: int
    queue_time_s: float
    time_to_first_token_s: float
    total_time_s: float
    prompt_text: str = ""  # the prompt, or a chat as the model's template rendered it (no leading BOS)


@dataclasses.dataclass
class TokenEvent:
    """One streamed token and the text it adds; the last event also carries the result."""

    token: Token | None
    text: str
    result: Result | None = None


@dataclasses.dataclass
class EngineInfo:
    model: str
    version: int | None
    device: str
    dtype: str
    max_context_tokens: int
    max_input_tokens: int
    max_new_tokens: int
    max_concurrent_sequences: int
    max_queue: int
    running: int
    waiting: int
    ready: bool
    last_swap_error: str


def _number(name: str, v: object, integer: bool = False) -> float:
    """A request's numeric field, refused unless it is a finite number (a whole one if `integer`)."""
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok:
        raise errors.InvalidArgument(f"{name} must be {'an integer' if integer else 'a number'}, got {_short(v)}")
    assert isinstance(v, int | float)
    if isinstance(v, float) and not math.isfinite(v):
        raise errors.InvalidArgument(f"{name} = {v}: use a finite number")
    return v


def _short(v: object) -> str:
    """A value for a message: short, and safe for any input (repr of a huge int raises)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    if isinstance(v, list | dict | tuple):
        return f"a {type(v).__name__} of {len(v)} items"
    text = repr(v) if not isinstance(v, str) else repr(v[:40])
    return text if len(text) <= 40 else text[:37] + "..."


def validate_request(req: GenerationRequest, limits: LimitsConfig, default_max_new: int, cap: int) -> int:
    """Check every field of `req` against `limits` before anything is tokenized or admitted; returns
    the max_new_tokens to use. Raises InvalidArgument naming the field, its problem and the range.

    The one place a generation request's ranges live: the gRPC servicer, the TGI and the OpenAI
    routes all reach it through PolicyService and Engine.
    """
    bad = errors.InvalidArgument
    check_prompt(req, limits)
    max_new = (
        default_max_new if req.max_new_tokens is None else int(_number("max_new_tokens", req.max_new_tokens, True))
    )
    if max_new < 1:
        raise bad(f"max_new_tokens = {_short(max_new)}: ask for at least 1 token (and at most {cap})")
    if max_new > cap:
        raise bad(f"max_new_tokens = {_short(max_new)} is over the limit of {cap}: ask for at most {cap}")
    t = _number("temperature", req.temperature)
    lo, hi = limits.min_temperature, limits.max_temperature
    if t != 0 and not lo <= t <= hi:
        raise bad(f"temperature = {_short(t)}: use 0 (greedy) or a value from {lo:g} to {hi:g}")
    top_p = _number("top_p", req.top_p)
    if not 0 < top_p <= 1:
        raise bad(f"top_p = {_short(top_p)}: use a value in (0, 1] (1 = off)")
    top_k = _number("top_k", req.top_k, True)
    if not 0 <= top_k <= limits.max_top_k:
        raise bad(f"top_k = {_short(top_k)}: use a value from 0 (off) to {limits.max_top_k}")
    rep = _number("repetition_penalty", req.repetition_penalty)
    lo, hi = limits.min_repetition_penalty, limits.max_repetition_penalty
    if not lo <= rep <= hi:
        raise bad(f"repetition_penalty = {_short(rep)}: use a value from {lo:g} to {hi:g} (1 = off)")
    if req.seed is not None and not 0 <= _number("seed", req.seed, True) <= SEED_MAX:
        raise bad(f"seed = {_short(req.seed)}: use an integer from 0 to 2^63-1 ({SEED_MAX})")
    for name in ("do_sample", "logprobs", "ignore_eos"):
        if not isinstance(getattr(req, name), bool):
            raise bad(f"{name} must be true or false, got {_short(getattr(req, name))}")
    stop = req.stop
    if not isinstance(stop, list):
        raise bad(f"stop must be a list of strings, got {_short(stop)}")
    if len(stop) > limits.max_stop_sequences:
        raise bad(f"{len(stop)} stop sequences: send at most {limits.max_stop_sequences}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s or len(s) > limits.max_stop_chars:
            what = f"has {len(s)} characters" if isinstance(s, str) and s else f"is {_short(s)}"
            raise bad(
                f"stop[{i}] {what}: each stop sequence must be a non-empty string of at most "
                f"{limits.max_stop_chars} characters"
            )
    return max_new


def check_prompt(req: GenerationRequest, limits: LimitsConfig) -> None:
    """The prompt or the chat: its shape, its roles and its size in characters (before tokenizing)."""
    bad = errors.InvalidArgument
    prompt, messages = req.prompt, req.messages
    if prompt is not None and not isinstance(prompt, str):
        raise bad(f"prompt must be a string, got {_short(prompt)}")
    if messages is None:
        if prompt is None or not prompt.strip():
            raise bad("prompt is empty: send some text (or messages)")
        if len(prompt) > limits.max_prompt_chars:
            raise bad(
                f"the prompt has {len(prompt)} characters, over the limit of {limits.max_prompt_chars}: shorten it"
            )
        return
    if prompt:
        raise bad("set either prompt or messages, not both")
    if not isinstance(messages, list):
        raise bad(f"messages must be a list of {{role, content}} objects, got {_short(messages)}")
    if not messages:
        raise bad("messages is empty: send at least one message")
    if len(messages) > limits.max_chat_messages:
        raise bad(f"the chat has {len(messages)} messages, over the limit of {limits.max_chat_messages}: send fewer")
    size = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}] must have a role ({', '.join(ROLES)}) and a string content")
        if len(m) != 2:
            extra = sorted(str(k) for k in m if k not in ("role", "content"))
            raise bad(f"messages[{i}] has unknown field(s) {', '.join(extra)}: send only role and content")
        size += len(m["content"])
        if size > limits.max_prompt_chars:
            raise bad(
                f"the chat has more than {limits.max_prompt_chars} characters (the limit, over all messages): "
                "shorten it"
            )
    if not any(m["content"].strip() for m in messages):
        raise bad("every message is empty: send some text")


def deadline_exceeded(limit: float) -> errors.DeadlineExceeded:
    return errors.DeadlineExceeded(
        f"the answer did not finish within the deadline of {limit:.3g} s: allow more time or ask for fewer tokens"
    )
