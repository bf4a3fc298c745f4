"""What the client returns: frozen dataclasses, never protobuf messages.

An `Answer` (and each side of a `Pair`) keeps the user it was served to, its feedback token and
the trace it was served in (`traceparent`), so the feedback helpers can send them back without the
application carrying any of them around.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from flywheel.v1 import feedback_pb2

Status = Literal["accepted", "spooled", "duplicate", "already_voted"]
Choice = Literal["A", "B", "TIE"]

STATUS: dict[int, Status] = {
    feedback_pb2.SUBMIT_STATUS_ACCEPTED: "accepted",
    feedback_pb2.SUBMIT_STATUS_SPOOLED: "spooled",
    feedback_pb2.SUBMIT_STATUS_DUPLICATE: "duplicate",
    feedback_pb2.SUBMIT_STATUS_ALREADY_VOTED: "already_voted",
}


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token (only when `logprobs=True` was asked for, or in a stream's chunk)."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclasses.dataclass(frozen=True)
class Answer:
    """One served answer, with what feedback on it needs (`interaction_id`, `feedback_token`, `user_id`,
    and `traceparent`, which links the feedback to the answer's trace)."""

    text: str
    interaction_id: str
    policy_version: int  # the model-store version that produced every token of it
    feedback_token: str  # proof that `user_id` received it; the feedback helpers send it back
    finish_reason: str  # "length", "eos_token" or "stop_sequence"
    prompt_tokens: int
    generated_tokens: int
    user_id: str  # the end user it was served to: feedback on it must come from the same one
    tokens: tuple[Token, ...] = ()
    traceparent: str = ""  # the answer's W3C trace context from the server ("" when it sent none)

    @classmethod
    def from_proto(cls, msg: Any, user_id: str, traceparent: str = "") -> Answer:
        """From a flywheel.v1.GenerateResponse and the traceparent of the call's initial metadata."""
        return cls(
            text=msg.text,
            interaction_id=msg.interaction_id,
            policy_version=msg.policy_version,
            feedback_token=msg.feedback_token,
            finish_reason=msg.finish_reason,
            prompt_tokens=msg.prompt_tokens,
            generated_tokens=msg.generated_tokens,
            user_id=user_id,
            tokens=tuple(Token(t.id, t.text, t.logprob, t.special) for t in msg.tokens),
            traceparent=traceparent,
        )


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of a streamed answer: the text one token added; the last chunk also has `answer`."""

    text: str
    token: Token | None
    answer: Answer | None = None  # set on the last chunk only: the whole answer with its ids and token

    @classmethod
    def from_proto(cls, msg: Any, user_id: str, traceparent: str = "") -> Chunk:
        """From a flywheel.v1.GenerateStreamResponse (and the stream's traceparent, for `answer`)."""
        t = msg.token if msg.HasField("token") else None
        token = Token(t.id, t.text, t.logprob, t.special) if t is not None else None
        answer = Answer.from_proto(msg.final, user_id, traceparent) if msg.HasField("final") else None
        return cls(msg.text, token, answer)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two answers to one prompt, for "which one is better?" (`Client.prefer`)."""

    pair_id: str
    a: Answer
    b: Answer
    feedback_token: str  # the pair's own token: a preference sends this one, not a side's
    user_id: str
    traceparent: str = ""  # the pair's W3C trace context ("" when the server sent none); both sides share it

    @classmethod
    def from_proto(cls, msg: Any, user_id: str, traceparent: str = "") -> Pair:
        """From a flywheel.v1.GeneratePairResponse and the traceparent of the call's initial metadata."""
        a, b = Answer.from_proto(msg.a, user_id, traceparent), Answer.from_proto(msg.b, user_id, traceparent)
        return cls(msg.pair_id, a, b, msg.feedback_token, user_id, traceparent)


@dataclasses.dataclass(frozen=True)
class Receipt:
    """The feedback service's acknowledgement: the feedback is durable (or was already recorded).

    status: "accepted" (in Kafka), "spooled" (in the service's local spool, on its way to Kafka),
    "duplicate" (this feedback_id was recorded by an earlier call: only when you passed your own
    feedback_id), "already_voted" (this user already gave this kind of feedback on this answer or
    pair under another feedback_id; the first one counts). A retry that the service reports as a
    duplicate means the first attempt landed: that is reported as "accepted".
    """

    feedback_id: str
    status: Status
    attempts: int = 1  # calls it took (more than one after retries, all with the same feedback_id)

    @property
    def counted(self) -> bool:
        """True when this feedback (or the same feedback_id before) is recorded; False: already_voted."""
        return self.status != "already_voted"


@dataclasses.dataclass(frozen=True)
class Session:
    """A short-lived bearer token for one end user (`Client.create_session`), safe to hand to a browser."""

    session: str  # send as `authorization: Bearer <session>` (Client(api_key=session.session))
    user_id: str
    expires_at: int  # unix seconds

    @classmethod
    def from_proto(cls, msg: Any) -> Session:
        return cls(msg.session, msg.user_id, msg.expires_at)
