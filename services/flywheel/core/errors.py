"""Errors that carry their own gRPC status, HTTP status and TGI error_type.

Engines and stores raise these; the gRPC interceptor and the HTTP front ends turn them into
`INVALID_ARGUMENT` / 422 and friends with the message unchanged, so every front end tells the
caller the same precise thing.

Internal failures are the exception: an error whose status is INTERNAL / DATA_LOSS (HTTP 500),
and any exception that is not a FlywheelError, reaches the caller only as a fixed text with a
reference (`public_message`, `internal_error_message`); its message and traceback are logged
under that reference, so an operator can find them and no exception text or file path leaks.
"""

from __future__ import annotations

import logging
import math
import secrets

import grpc

log = logging.getLogger("flywheel.errors")

# Status codes whose message may carry internals (exception text, paths): never sent as is.
INTERNAL_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNKNOWN})


def internal_error_message(ref: str) -> str:
    """What a caller is told about an internal failure: a fixed text and the reference it is logged under
    (the same words as core/http.py's 500 bodies)."""
    return f"internal error (reference {ref}): the service log has the details"


def log_internal(exc: BaseException, where: str) -> str:
    """Log `exc` with its traceback under a fresh reference (for `internal_error_message`); return it."""
    ref = secrets.token_hex(6)
    log.error("%s failed (reference %s): %s: %s", where, ref, type(exc).__name__, exc, exc_info=exc)
    return ref


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
        self.reference: str | None = None  # set (and logged) the first time an internal error is shown

    @property
    def internal(self) -> bool:
        """Whether the message may carry internals: INTERNAL / DATA_LOSS, HTTP 500."""
        return self.code in INTERNAL_CODES or self.http_status == 500

    def public_message(self, where: str = "a request") -> str:
        """The message a caller may see: `message`, or for an internal error the fixed text with
        its reference (logged with the message and traceback once, however many callers share it)."""
        if not self.internal:
            return self.message
        if self.reference is None:
            self.reference = log_internal(self, where)
        return internal_error_message(self.reference)

    def http_body(self, where: str = "an HTTP request") -> dict[str, str]:
        """TGI's error body (an internal error's message stays in the log, see `public_message`)."""
        return {"error": self.public_message(where), "error_type": self.error_type}


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
