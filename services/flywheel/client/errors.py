"""The client's exceptions: one class per group of gRPC status codes, each with the server's message.

Catch `FlywheelError` for everything, or a subclass for what you handle:

    try:
        receipt = client.thumbs(answer, up=True)
    except RateLimited as e:      # RESOURCE_EXHAUSTED, after the client's own retries
        wait(e.retry_after_s)
    except PermissionDenied as e:  # e.g. the feedback token expired, or another user's answer
        show(e.message)

The server's words are kept as they are (they say what to change); `code` is the grpc.StatusCode.
A feedback call's error also carries its `feedback_id`: pass it again (`feedback_id=`) to retry
the same piece of feedback later without it ever counting twice.
"""

from __future__ import annotations

from typing import Any

import grpc


class FlywheelError(Exception):
    """A call failed; `message` is the server's explanation, `code` its grpc.StatusCode."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        retry_after_s: float | None = None,
        feedback_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.message, self.code, self.retry_after_s = message, code, retry_after_s
        self.feedback_id = feedback_id  # set for a feedback call: retry later with the same id
        self.attempts = attempts  # calls made before giving up (retries included)


class InvalidArgument(FlywheelError):
    """INVALID_ARGUMENT / OUT_OF_RANGE: the request breaks a rule the message names; fix it, do not retry."""


class Unauthenticated(FlywheelError):
    """UNAUTHENTICATED: the API key (or session) is missing, unknown or expired."""


class PermissionDenied(FlywheelError):
    """PERMISSION_DENIED: e.g. a feedback token that expired or belongs to another answer or user, a
    session used for another user, or an admin-only call."""


class NotFound(FlywheelError):
    """NOT_FOUND: e.g. a candidate_version the model store does not have."""


class RateLimited(FlywheelError):
    """RESOURCE_EXHAUSTED: a rate limit or a full queue; `retry_after_s` is the server's hint (None if it gave none)."""


class Unavailable(FlywheelError):
    """UNAVAILABLE: the service is down, starting or not reachable (after the client's retries)."""


class DeadlineExceeded(FlywheelError):
    """DEADLINE_EXCEEDED: no answer within the call's timeout."""


class Conflict(FlywheelError):
    """ABORTED / FAILED_PRECONDITION / ALREADY_EXISTS: e.g. the same feedback_id is being submitted by
    another call right now; call again with the same feedback_id to learn its outcome."""


class ServerError(FlywheelError):
    """INTERNAL / UNKNOWN / DATA_LOSS / UNIMPLEMENTED and anything else: the message names a reference
    that the service's log has the details under."""


_BY_CODE: dict[grpc.StatusCode, type[FlywheelError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
}


def retry_after_s(e: Any) -> float | None:
    """The `retry-after` trailing metadata of a failed call (seconds), or None when the server sent none."""
    try:
        trailing = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never reached a server has no metadata
        return None
    for key, value in trailing:
        if key.lower() == "retry-after":
            try:
                seconds = float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def from_rpc_error(e: Any, feedback_id: str | None = None, attempts: int = 1) -> FlywheelError:
    """The FlywheelError subclass for a grpc.RpcError (sync or asyncio), with the server's message."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
    cls = _BY_CODE.get(code, ServerError)
    return cls(message, code, retry_after_s(e), feedback_id, attempts)


__all__ = [
    "Conflict",
    "DeadlineExceeded",
    "FlywheelError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
