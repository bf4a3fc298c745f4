"""Errors that carry their own gRPC status, HTTP status and TGI error_type.

Engines and stores raise these; the gRPC interceptor and the HTTP front ends turn them into
`INVALID_ARGUMENT` / 422 and friends with the message unchanged, so every front end tells the
caller the same precise thing.
"""

from __future__ import annotations

import math

import grpc


class FlywheelError(Exception):
    """Base class: a failure the caller should be told about precisely."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    error_type: str = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        # The metrics label when it says more than the status code (rate_limited, spool_full).
        self.reason = reason

    def http_body(self) -> dict[str, str]:
        """TGI's error body."""
        return {"error": self.message, "error_type": self.error_type}


class InvalidArgument(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.INVALID_ARGUMENT, 422, "validation"


class ResourceExhausted(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded"


class Unavailable(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.UNAVAILABLE, 503, "unavailable"


class FailedPrecondition(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.FAILED_PRECONDITION, 409, "failed_precondition"


class NotFound(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.NOT_FOUND, 404, "not_found"


class Unauthenticated(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.UNAUTHENTICATED, 401, "unauthenticated"


class PermissionDenied(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.PERMISSION_DENIED, 403, "permission_denied"


class DeadlineExceeded(FlywheelError):
    code, http_status, error_type = grpc.StatusCode.DEADLINE_EXCEEDED, 504, "deadline_exceeded"


class IntegrityError(FlywheelError):
    """A checkpoint or record failed verification (sha256 mismatch, missing file)."""

    code, http_status, error_type = grpc.StatusCode.DATA_LOSS, 500, "integrity"


def retry_after_header(retry_after_s: float) -> str:
    """Whole seconds, rounded up (HTTP Retry-After allows only integers; gRPC uses the same)."""
    return str(max(0, math.ceil(retry_after_s)))
