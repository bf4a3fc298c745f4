"""The engine's domain objects: what a front end sends (GenerationRequest) and gets back.

Plain dataclasses, so the gRPC and HTTP servicers only convert protobuf / JSON to these and
back (TGI's servicer rule); `validate_sampling` is the one place the parameter ranges live.
"""

from __future__ import annotations

import dataclasses

from flywheel.core import errors
from flywheel.policy.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


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


def validate_sampling(req: GenerationRequest, default_max_new: int, cap: int) -> int:
    """Check the sampling fields; returns the max_new_tokens to use. Raises InvalidArgument."""
    bad = errors.InvalidArgument
    max_new = default_max_new if req.max_new_tokens is None else req.max_new_tokens
    if max_new < 1:
        raise bad(f"max_new_tokens = {max_new}: ask for at least 1 token")
    if max_new > cap:
        raise bad(f"max_new_tokens = {max_new} is over the limit of {cap}: ask for at most {cap}")
    if not req.temperature >= 0:
        raise bad(f"temperature = {req.temperature}: use a value >= 0 (0 = greedy)")
    if not 0 < req.top_p <= 1:
        raise bad(f"top_p = {req.top_p}: use a value in (0, 1] (1 = off)")
    if req.top_k < 0:
        raise bad(f"top_k = {req.top_k}: use a value >= 0 (0 = off)")
    if not req.repetition_penalty > 0:
        raise bad(f"repetition_penalty = {req.repetition_penalty}: use a value > 0 (1 = off)")
    if req.seed is not None and not 0 <= req.seed < 2**64:
        raise bad(f"seed = {req.seed}: use an integer from 0 to 2**64-1")
    if len(req.stop) > MAX_STOP_SEQUENCES:
        raise bad(f"{len(req.stop)} stop sequences: send at most {MAX_STOP_SEQUENCES}")
    for s in req.stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise bad(f"stop sequence {s!r}: each must be a non-empty string of at most {MAX_STOP_CHARS} chars")
    return max_new


def deadline_exceeded(limit: float) -> errors.DeadlineExceeded:
    return errors.DeadlineExceeded(
        f"the answer did not finish within the deadline of {limit:.3g} s: allow more time or ask for fewer tokens"
    )
