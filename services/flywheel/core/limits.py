"""Bounds on what one request may carry, checked before it is admitted anywhere.

One section (`limits`) for the fields every front end shares: the end user's id (the same
limit for the policy and the feedback service: a feedback token binds the user_id the policy
served, so the two must accept the same ids) and the fields of a generation request (prompt
and chat size, stop strings, sampling ranges). A value outside them is an InvalidArgument
(INVALID_ARGUMENT / HTTP 422) that names the field, what is wrong and the allowed range.
Ranges that no configuration may widen (top_p in (0, 1], a seed from 0 to 2^63-1) live in
`flywheel.policy.requests`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flywheel.core import errors
from flywheel.core.config import require, setting

INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class LimitsConfig:
    """Bounds on request fields (policy and feedback), checked before admission."""

    SECTION: ClassVar[str] = "limits"

    max_user_id_chars: int = setting(
        256,
        "Longest user_id, the same for the policy (gRPC user_id, the x-flywheel-user-id header, OpenAI's user) "
        "and the feedback service.",
        alias="FLYWHEEL_FEEDBACK_MAX_USER_ID_CHARS",
    )
    max_prompt_chars: int = setting(
        65_536,
        "Longest prompt in characters, or most characters of all a chat's messages together; checked before "
        "tokenizing (max_input_tokens then bounds the tokens).",
        alias="FLYWHEEL_POLICY_MAX_PROMPT_CHARS",
    )
    max_chat_messages: int = setting(256, "Most messages (turns) in one chat request.")
    max_stop_sequences: int = setting(16, "Most stop strings in one generation request.")
    max_stop_chars: int = setting(256, "Longest stop string, in characters.")
    min_temperature: float = setting(
        0.01,
        "Smallest temperature above 0 a request may use (0 is greedy): logits divided by a tinier one overflow "
        "to infinity.",
    )
    max_temperature: float = setting(100.0, "Largest temperature a request may use.")
    min_repetition_penalty: float = setting(
        0.01, "Smallest repetition_penalty (1 = off; below 1 favours repeats; a tinier one overflows the logits)."
    )
    max_repetition_penalty: float = setting(100.0, "Largest repetition_penalty.")
    max_top_k: int = setting(
        1_000_000, "Largest top_k (0 = off); a top_k at or above the vocabulary size keeps every token."
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        for name in ("max_user_id_chars", "max_prompt_chars", "max_chat_messages", "max_stop_chars"):
            require(1 <= getattr(self, name) <= INT32_MAX, n, name, getattr(self, name), "use 1 or more (< 2^31)")
        require(0 <= self.max_stop_sequences <= 1024, n, "max_stop_sequences", self.max_stop_sequences, "use 0..1024")
        require(
            1e-4 <= self.min_temperature <= self.max_temperature <= 1e4,
            n,
            "min_temperature",
            (self.min_temperature, self.max_temperature),
            "use 1e-4 <= min_temperature <= max_temperature <= 1e4",
        )
        require(
            1e-4 <= self.min_repetition_penalty <= 1.0 <= self.max_repetition_penalty <= 1e4,
            n,
            "min_repetition_penalty",
            (self.min_repetition_penalty, self.max_repetition_penalty),
            "use 1e-4 <= min_repetition_penalty <= 1 <= max_repetition_penalty <= 1e4",
        )
        require(1 <= self.max_top_k <= INT32_MAX, n, "max_top_k", self.max_top_k, "use 1 to 2^31-1")


def check_user_id(user_id: object, limits: LimitsConfig, field: str = "user_id") -> None:
    """A user id is a string of at most `max_user_id_chars` characters; else InvalidArgument."""
    if not isinstance(user_id, str):
        raise errors.InvalidArgument(f"{field} must be a string: the end user's id")
    limit = limits.max_user_id_chars
    if len(user_id) > limit:
        raise errors.InvalidArgument(
            f"{field} has {len(user_id)} characters: use at most {limit} (the limit the policy and feedback "
            "services share; send a hash of a longer id)"
        )
