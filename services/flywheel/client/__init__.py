"""The Python client for applications: answers from the policy, feedback to the feedback service.

    from flywheel.client import Client

    with Client("127.0.0.1:50051", "127.0.0.1:50052") as client:    # `flywheel up`'s addresses
        answer = client.generate("how do I reset my password?", user_id="alice")
        print(answer.text, "(policy version", answer.policy_version, ")")
        receipt = client.thumbs(answer, up=True)                    # or rate / demonstrate
        pair = client.generate_pair("hi", user_id="alice")
        client.prefer(pair, "B")

`AsyncClient` is the same for asyncio (`await client.generate(...)`, `async for chunk in
client.stream(...)`). Both take `api_key=`, TLS (`ca_file=`, `client_cert_file=`,
`client_key_file=`, or `tls=TlsConfig(...)`), `timeout_s=` and `retry=RetryPolicy(...)`; calls
refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried with backoff (honouring the server's
retry-after), and a retried feedback call keeps its feedback_id, so it is never a second vote.
Results are frozen dataclasses (`Answer`, `Chunk`, `Pair`, `Receipt`, `Session`); errors are
`FlywheelError` subclasses carrying the server's message (flywheel.client.errors).
docs/CLIENT.md has the whole guide.
"""

from flywheel.client.aio import AsyncClient
from flywheel.client.errors import (
    Conflict,
    DeadlineExceeded,
    FlywheelError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from flywheel.client.results import Answer, Chunk, Pair, Receipt, Session, Token
from flywheel.client.retry import NO_RETRY, RetryPolicy
from flywheel.client.sync import Client
from flywheel.client.wire import Sampling

__all__ = [
    "NO_RETRY",
    "Answer",
    "AsyncClient",
    "Chunk",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "FlywheelError",
    "InvalidArgument",
    "NotFound",
    "Pair",
    "PermissionDenied",
    "RateLimited",
    "Receipt",
    "RetryPolicy",
    "Sampling",
    "ServerError",
    "Session",
    "Token",
    "Unauthenticated",
    "Unavailable",
]
