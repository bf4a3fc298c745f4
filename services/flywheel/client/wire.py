"""What the sync and asyncio clients share: their settings, the protobuf requests built from the
helpers' arguments, and the trace context an answer came with and its feedback sends back (so both
send byte for byte the same thing)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from flywheel.client.results import Answer, Choice, Pair
from flywheel.client.retry import RetryPolicy
from flywheel.core.tls import TlsConfig
from flywheel.v1 import common_pb2, events_pb2, feedback_pb2, policy_pb2

DEFAULT_POLICY = "127.0.0.1:50051"  # where `flywheel up` serves them
DEFAULT_FEEDBACK = "127.0.0.1:50052"

Prompt = str | Sequence[Mapping[str, str]]  # text, or chat messages [{"role": "user", "content": "..."}]
PREFERENCES = {"A": events_pb2.PREFERENCE_A, "B": events_pb2.PREFERENCE_B, "TIE": events_pb2.PREFERENCE_TIE}


class Sampling(TypedDict, total=False):
    """How to sample (keyword arguments of generate, stream and generate_pair); unset: the server's defaults."""

    max_new_tokens: int
    temperature: float  # 0 (the default): greedy unless do_sample
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int  # reproducible sampling
    stop: Sequence[str]  # stop at any of these strings (not included in the text)
    do_sample: bool
    logprobs: bool  # fill Answer.tokens with each token's log-probability


@dataclasses.dataclass(frozen=True)
class Settings:
    """A client's resolved settings (see Client's docstring for each)."""

    policy: str
    feedback: str
    metadata: tuple[tuple[str, str], ...]
    tls: TlsConfig
    timeout_s: float
    retry: RetryPolicy
    channel_options: tuple[tuple[str, Any], ...]


def settings(
    policy: str | None,
    feedback: str | None,
    api_key: str | None,
    tls: TlsConfig | None,
    ca_file: str,
    client_cert_file: str,
    client_key_file: str,
    server_name: str,
    timeout_s: float,
    retry: RetryPolicy | None,
    channel_options: Sequence[tuple[str, Any]],
) -> Settings:
    """Settings from a constructor's arguments; ValueError / ConfigError naming the argument to fix."""
    if tls is not None and (ca_file or client_cert_file or client_key_file or server_name):
        raise ValueError("pass either tls=TlsConfig(...) or ca_file/client_cert_file/client_key_file/server_name")
    if tls is None:  # TlsConfig checks the files (readable, PEM, key matches certificate) and says what is wrong
        tls = TlsConfig(
            ca_file=ca_file, client_cert_file=client_cert_file, client_key_file=client_key_file, server_name=server_name
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s = {timeout_s}: use a positive number of seconds per call")
    if api_key is not None and (not api_key.strip() or any(c in api_key for c in "\r\n")):
        raise ValueError("api_key is empty or holds a line break: pass the key (or session) itself, or None")
    metadata = (("authorization", f"Bearer {api_key.strip()}"),) if api_key else ()
    return Settings(
        policy=policy or os.environ.get("FLYWHEEL_POLICY_ADDR") or DEFAULT_POLICY,
        feedback=feedback or os.environ.get("FLYWHEEL_FEEDBACK_ADDR") or DEFAULT_FEEDBACK,
        metadata=metadata,
        tls=tls,
        timeout_s=float(timeout_s),
        retry=retry or RetryPolicy(),
        channel_options=tuple(channel_options),
    )


def generate_request(prompt: Prompt, user_id: str, sampling: Sampling) -> policy_pb2.GenerateRequest:
    """A GenerateRequest: `prompt` is text, or chat messages the server's chat template renders."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id is required: the id of the end user the answer is for (feedback must come from it)")
    unknown = set(sampling) - set(Sampling.__annotations__)
    if unknown:
        known = ", ".join(Sampling.__annotations__)
        raise TypeError(f"unknown sampling argument(s) {', '.join(sorted(unknown))}: the known ones are {known}")
    fields: dict[str, Any] = {k: v for k, v in sampling.items() if k != "stop"}
    params = common_pb2.SamplingParams(**fields)
    params.stop.extend(sampling.get("stop", ()))
    if isinstance(prompt, str):
        return policy_pb2.GenerateRequest(prompt=prompt, params=params, user_id=user_id)
    messages = [policy_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
    return policy_pb2.GenerateRequest(messages=messages, params=params, user_id=user_id)


def pair_request(prompt: Prompt, user_id: str, candidate_version: int, sampling: Sampling) -> Any:
    req = generate_request(prompt, user_id, sampling)
    return policy_pb2.GeneratePairRequest(request=req, candidate_version=candidate_version)


def feedback_request(
    target: Answer | Pair, comment: str | None, feedback_id: str | None, **value: Any
) -> feedback_pb2.FeedbackRequest:
    """A FeedbackRequest carrying `target`'s id, token and user, with a fresh feedback_id unless one is given."""
    common: dict[str, Any] = {
        "feedback_id": feedback_id or uuid.uuid4().hex,
        "feedback_token": target.feedback_token,
        "user_id": target.user_id,
        "comment": comment or "",
    }
    if isinstance(target, Pair):
        return feedback_pb2.FeedbackRequest(pair_id=target.pair_id, **common, **value)
    return feedback_pb2.FeedbackRequest(interaction_id=target.interaction_id, **common, **value)


def traceparent(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The W3C `traceparent` in a call's initial metadata: the answer's trace ("" when the server
    sent none, as with tracing off)."""
    for key, value in metadata or ():
        if key == "traceparent":
            return value.decode() if isinstance(value, bytes) else value
    return ""


def submit_metadata(base: tuple[tuple[str, str], ...], target: Answer | Pair) -> tuple[tuple[str, str], ...]:
    """A feedback Submit's metadata: the client's own (`base`), plus `target`'s traceparent when it
    has one, so the feedback joins the answer's trace (docs/ARCHITECTURE.md, "Tracing")."""
    return (*base, ("traceparent", target.traceparent)) if target.traceparent else base


def thumbs_request(answer: Answer, up: bool, comment: str | None, feedback_id: str | None) -> Any:
    _need(answer, Answer, "thumbs")
    return feedback_request(answer, comment, feedback_id, thumbs=1 if up else -1)


def rating_request(answer: Answer, stars: int, comment: str | None, feedback_id: str | None) -> Any:
    _need(answer, Answer, "rate")
    if isinstance(stars, bool) or not isinstance(stars, int):
        raise TypeError(f"stars must be an int (1..the service's rating scale, 3 by default), got {stars!r}")
    return feedback_request(answer, comment, feedback_id, rating=stars)


def preference_request(pair: Pair, choice: Choice, comment: str | None, feedback_id: str | None) -> Any:
    _need(pair, Pair, "prefer")
    key = choice.upper() if isinstance(choice, str) else choice
    if key not in PREFERENCES:
        raise ValueError(f'choice must be "A", "B" or "TIE", got {choice!r}')
    return feedback_request(pair, comment, feedback_id, preference=PREFERENCES[key])


def demonstration_request(answer: Answer, text: str, comment: str | None, feedback_id: str | None) -> Any:
    _need(answer, Answer, "demonstrate")
    return feedback_request(answer, comment, feedback_id, demonstration=text)


def _need(target: Any, cls: type, helper: str) -> None:
    if not isinstance(target, cls):
        hint = " (for a pair, prefer(pair, ...), or pass pair.a / pair.b)" if isinstance(target, Pair) else ""
        raise TypeError(f"{helper}() takes the {cls.__name__} the client returned, got {type(target).__name__}{hint}")
