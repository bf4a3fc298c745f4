"""`AsyncClient`: the asyncio client (grpc.aio), the same methods as `Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Unpack

import grpc

from flywheel.client import wire
from flywheel.client.errors import from_rpc_error, retry_after_s
from flywheel.client.results import STATUS, Answer, Choice, Chunk, Pair, Receipt, Session
from flywheel.client.retry import RetryPolicy
from flywheel.client.wire import Prompt, Sampling
from flywheel.core.tls import TlsConfig
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc, policy_pb2_grpc


class AsyncClient:
    """`Client` for asyncio: the same arguments, methods and errors; create it inside a running loop.

    async with AsyncClient("policy:50051", "feedback:50052", api_key=KEY) as client:
        answer = await client.generate("where is my order?", "alice")
        await client.rate(answer, 3)
        async for chunk in client.stream("hi", "alice"):
            print(chunk.text, end="")
        pair = await client.generate_pair("hi", "alice")
        await client.prefer(pair, "A")

    Answers and pairs keep the policy's `traceparent`, and feedback on them sends it back (see Client).
    """

    def __init__(
        self,
        policy: str | None = None,
        feedback: str | None = None,
        *,
        api_key: str | None = None,
        tls: TlsConfig | None = None,
        ca_file: str = "",
        client_cert_file: str = "",
        client_key_file: str = "",
        server_name: str = "",
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = s = wire.settings(
            policy, feedback, api_key, tls, ca_file, client_cert_file, client_key_file, server_name, timeout_s, retry,
            channel_options,
        )  # fmt: skip
        self._channels = [_channel(s.policy, s.tls, s.channel_options), _channel(s.feedback, s.tls, s.channel_options)]
        self._policy = policy_pb2_grpc.PolicyStub(self._channels[0])
        self._feedback = feedback_pb2_grpc.FeedbackStub(self._channels[1])

    async def generate(
        self, prompt: Prompt, user_id: str, *, timeout_s: float | None = None, **sampling: Unpack[Sampling]
    ) -> Answer:
        """One complete answer (see Client.generate)."""
        req = wire.generate_request(prompt, user_id, sampling)
        msg, _, traceparent = await self._call(self._policy.Generate, req, timeout_s)
        return Answer.from_proto(msg, user_id, traceparent)

    async def stream(
        self, prompt: Prompt, user_id: str, *, timeout_s: float | None = None, **sampling: Unpack[Sampling]
    ) -> AsyncIterator[Chunk]:
        """The answer token by token, `async for chunk in client.stream(...)`; the last chunk has `chunk.answer`
        (see Client.stream). Leaving the loop early cancels the call."""
        req = wire.generate_request(prompt, user_id, sampling)
        attempt = 0
        while True:
            attempt += 1
            call = self._policy.GenerateStream(req, timeout=timeout_s or self.settings.timeout_s, metadata=self._md)
            started, traceparent = False, ""
            try:
                async for msg in call:
                    if not started:  # the initial metadata came before the first message
                        started, traceparent = True, wire.traceparent(await call.initial_metadata())
                    yield Chunk.from_proto(msg, user_id, traceparent)
                return
            except grpc.RpcError as e:
                wait = None if started else self.settings.retry.delay_s(attempt, e.code(), retry_after_s(e))
                if wait is None:
                    raise from_rpc_error(e, attempts=attempt) from e
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def generate_pair(
        self,
        prompt: Prompt,
        user_id: str,
        *,
        candidate_version: int = 0,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> Pair:
        """Two answers to one prompt (see Client.generate_pair)."""
        req = wire.pair_request(prompt, user_id, candidate_version, sampling)
        msg, _, traceparent = await self._call(self._policy.GeneratePair, req, timeout_s)
        return Pair.from_proto(msg, user_id, traceparent)

    async def thumbs(
        self,
        answer: Answer,
        up: bool,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """Thumbs up or down on `answer` (see Client.thumbs)."""
        return await self._submit(answer, wire.thumbs_request(answer, up, comment, feedback_id), timeout_s)

    async def rate(
        self,
        answer: Answer,
        stars: int,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """A rating, 1..the service's rating scale (see Client.rate)."""
        return await self._submit(answer, wire.rating_request(answer, stars, comment, feedback_id), timeout_s)

    async def prefer(
        self,
        pair: Pair,
        choice: Choice,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """ "A", "B" or "TIE" on `pair` (see Client.prefer)."""
        return await self._submit(pair, wire.preference_request(pair, choice, comment, feedback_id), timeout_s)

    async def demonstrate(
        self,
        answer: Answer,
        text: str,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """The answer the user wanted (see Client.demonstrate)."""
        return await self._submit(answer, wire.demonstration_request(answer, text, comment, feedback_id), timeout_s)

    async def _submit(
        self, target: Answer | Pair, req: feedback_pb2.FeedbackRequest, timeout_s: float | None
    ) -> Receipt:
        """One feedback_id for every attempt; a DUPLICATE answer to a retry is reported as "accepted".
        `target`'s traceparent goes along in the metadata."""
        md = wire.submit_metadata(self._md, target)
        msg, attempts, _ = await self._call(self._feedback.Submit, req, timeout_s, req.feedback_id, md)
        status = STATUS.get(msg.status, "accepted")
        if attempts > 1 and status == "duplicate":
            status = "accepted"
        return Receipt(req.feedback_id, status, attempts)

    async def create_session(self, user_id: str, ttl_s: int | None = None) -> Session:
        """A short-lived session for `user_id` (see Client.create_session)."""
        req = feedback_pb2.CreateSessionRequest(user_id=user_id, ttl_s=ttl_s or 0)
        msg, _, _ = await self._call(self._feedback.CreateSession, req, None)
        return Session.from_proto(msg)

    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return self.settings.metadata

    async def _call(
        self,
        rpc: Callable[..., Any],
        req: Any,
        timeout_s: float | None,
        feedback_id: str | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[Any, int, str]:
        """(response, attempts, traceparent of its initial metadata), as Client._call."""
        timeout, md = timeout_s or self.settings.timeout_s, self._md if metadata is None else metadata
        attempt = 0
        while True:
            attempt += 1
            try:
                call = rpc(req, timeout=timeout, metadata=md)
                msg = await call
                return msg, attempt, wire.traceparent(await call.initial_metadata())
            except grpc.RpcError as e:
                wait = self.settings.retry.delay_s(attempt, e.code(), retry_after_s(e))
                if wait is None:
                    raise from_rpc_error(e, feedback_id, attempt) from e
            await asyncio.sleep(wait)

    async def close(self) -> None:
        """Close both channels (calls in flight are cancelled)."""
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _channel(address: str, tls: TlsConfig, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """core.tls.channel's rule for grpc.aio: TLS when tls.ca_file is set, else plaintext."""
    if not tls.client_enabled:
        return grpc.aio.insecure_channel(address, options=list(options))
    creds = tls.channel_credentials()
    return grpc.aio.secure_channel(address, creds, options=[*options, *tls.channel_options()])
