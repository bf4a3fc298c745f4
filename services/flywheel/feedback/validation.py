"""What a feedback request must look like, and the event it becomes.

Pure functions, no I/O: the intake (intake.py) runs them per item before it touches the rate
limits, the claims (dedup.py) or Kafka, and the tests call them directly. `reason` names a refusal for
the rejection metric the same way for every front end.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.core import errors
from flywheel.core.auth import TokenClaims
from flywheel.core.limits import LimitsConfig, check_user_id
from flywheel.feedback.config import FeedbackConfig
from flywheel.v1 import events_pb2, feedback_pb2

KINDS = {
    "thumbs": events_pb2.FEEDBACK_KIND_THUMBS,
    "rating": events_pb2.FEEDBACK_KIND_RATING,
    "preference": events_pb2.FEEDBACK_KIND_PREFERENCE,
    "demonstration": events_pb2.FEEDBACK_KIND_DEMONSTRATION,
}

PREFERENCES = (events_pb2.PREFERENCE_A, events_pb2.PREFERENCE_B, events_pb2.PREFERENCE_TIE)
ALLOWED = "send PREFERENCE_A (1), PREFERENCE_B (2) or PREFERENCE_TIE (3)"


def enum_name(enum: Any, number: int) -> str:
    """The name of `number` in a protobuf enum; an open enum also carries numbers it does not
    define (a newer or hostile client's), which are named as such instead of raising ValueError."""
    if number in enum.values():
        return str(enum.Name(number))
    return f"{number}, which is not a {enum.DESCRIPTOR.name} value"


def validate(req: feedback_pb2.FeedbackRequest, cfg: FeedbackConfig, limits: LimitsConfig | None = None) -> str:
    """The kind of a well-formed request ("thumbs", ...), or errors.InvalidArgument saying what to fix.
    `limits`: the bounds shared with the policy (the user_id's length)."""

    def bad(msg: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(msg)

    if not req.feedback_id:
        raise bad("feedback_id is required: send a client-chosen unique id (e.g. a UUID) so a retry counts once")
    if len(req.feedback_id) > cfg.max_id_chars:
        raise bad(f"feedback_id has {len(req.feedback_id)} characters: use at most {cfg.max_id_chars}")
    if not req.user_id:
        raise bad("user_id is required: send the id of the end user the answer was served to")
    check_user_id(req.user_id, limits or LimitsConfig())
    kind = req.WhichOneof("value")
    if kind is None:
        raise bad(
            f"no feedback value: send exactly one of thumbs (+1 or -1), rating (1..{cfg.rating_scale}), "
            "preference (A, B or TIE, with pair_id) or demonstration (the answer the user wanted)"
        )
    if req.interaction_id and req.pair_id:
        raise bad("send interaction_id or pair_id, not both (pair_id only for a preference between two answers)")
    for name in ("interaction_id", "pair_id"):
        value = getattr(req, name)
        if len(value) > cfg.max_id_chars:
            raise bad(f"{name} has {len(value)} characters: use at most {cfg.max_id_chars}")
    if kind == "preference":
        if not req.pair_id:
            raise bad("preference feedback is about a pair: send the pair_id (and token) that GeneratePair returned")
        if req.preference not in PREFERENCES:
            raise bad(
                f"preference must be A, B or TIE, got {enum_name(events_pb2.Preference, req.preference)}: {ALLOWED}"
            )
    else:
        if not req.interaction_id:
            hint = " (for one side of a pair, its own interaction_id and token)" if req.pair_id else ""
            raise bad(f"{kind} feedback is about one answer: send its interaction_id, not pair_id{hint}")
        if kind == "thumbs" and req.thumbs not in (1, -1):
            raise bad(f"thumbs must be +1 (up) or -1 (down), got {req.thumbs}")
        if kind == "rating" and not 1 <= req.rating <= cfg.rating_scale:
            raise bad(f"rating must be an integer in 1..{cfg.rating_scale}, got {req.rating}")
        if kind == "demonstration":
            if not req.demonstration.strip():
                raise bad("demonstration is empty: send the answer the user would have wanted")
            if len(req.demonstration) > cfg.max_demonstration_chars:
                raise bad(
                    f"demonstration has {len(req.demonstration)} characters: use at most {cfg.max_demonstration_chars}"
                )
    if len(req.comment) > cfg.max_comment_chars:
        raise bad(f"comment has {len(req.comment)} characters: use at most {cfg.max_comment_chars}")
    return kind


def build_event(
    req: feedback_pb2.FeedbackRequest, kind: str, claims: TokenClaims, scale: int, now: Timestamp | None = None
) -> events_pb2.FeedbackEvent:
    """The FeedbackEvent for a validated request and its verified token; its user_id is the one the
    token binds (with API keys configured, the user in the caller's namespace, not the raw id)."""
    if now is None:
        now = Timestamp()
        now.GetCurrentTime()
    return events_pb2.FeedbackEvent(
        feedback_id=req.feedback_id,
        interaction_id=req.interaction_id,
        pair_id=req.pair_id,
        kind=KINDS[kind],
        value=req.thumbs if kind == "thumbs" else req.rating if kind == "rating" else 0,
        rating_scale=scale if kind == "rating" else 0,
        preference=req.preference if kind == "preference" else events_pb2.PREFERENCE_UNSPECIFIED,
        demonstration=req.demonstration,
        comment=req.comment,
        user_id=claims.user_id,
        policy_version=claims.policy_version,
        created_at=now,
    )


def reason(e: errors.FlywheelError) -> str:
    """The `reason` label of a refusal: rate_limited, spool_full, or the status code in lower case."""
    return e.reason or e.code.name.lower()
