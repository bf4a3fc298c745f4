"""`Client`: the blocking client (threads welcome: one Client can be shared by all of them)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Unpack

import grpc

from flywheel.client import wire
from flywheel.client.errors import from_rpc_error, retry_after_s
from flywheel.client.results import STATUS, Answer, Choice, Chunk, Pair, Receipt, Session
from flywheel.client.retry import RetryPolicy
from flywheel.client.wire import Prompt, Sampling
from flywheel.core.tls import TlsConfig, channel
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc, policy_pb2_grpc


class Client:
    """Answers from the policy service and feedback to the feedback service, over gRPC.

        with Client("policy:50051", "feedback:50052", api_key=KEY) as client:
            answer = client.generate("where is my order?", user_id="alice", max_new_tokens=64)
            print(answer.text, answer.policy_version)
            client.thumbs(answer, up=True)                 # carries answer's id, token, user and trace
            for chunk in client.stream("hi", user_id="alice"):
                print(chunk.text, end="")                   # the last chunk has chunk.answer
            pair = client.generate_pair("hi", user_id="alice")
            client.prefer(pair, "B", comment="shorter")

    policy, feedback: gRPC addresses (default FLYWHEEL_POLICY_ADDR / FLYWHEEL_FEEDBACK_ADDR, else
    `flywheel up`'s 127.0.0.1:50051 and 127.0.0.1:50052).
    api_key: sent as `authorization: Bearer <api_key>` on every call; a session from
    `create_session` works here too.
    tls: a flywheel.core.tls.TlsConfig; or ca_file (the CA that signed the servers' certificates:
    TLS on), client_cert_file + client_key_file (mutual TLS), server_name (the name the servers'
    certificates carry, when it differs from the host you dial). None of them: plaintext.
    timeout_s: each call's deadline (one attempt; retries get their own).
    retry: RetryPolicy (UNAVAILABLE and RESOURCE_EXHAUSTED only; `RetryPolicy(max_attempts=1)`: none).
    Errors are flywheel.client.errors classes (FlywheelError and its subclasses) with the server's message.
    Answers and pairs keep the `traceparent` the policy returned; feedback on them sends it back, so
    the feedback joins the answer's trace (docs/ARCHITECTURE.md, "Tracing").
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
        self._channels = [channel(s.policy, s.tls, s.channel_options), channel(s.feedback, s.tls, s.channel_options)]
        self._policy = policy_pb2_grpc.PolicyStub(self._channels[0])
        self._feedback = feedback_pb2_grpc.FeedbackStub(self._channels[1])

    # ------------------------------------------------------------------ answers
    def generate(
        self, prompt: Prompt, user_id: str, *, timeout_s: float | None = None, **sampling: Unpack[Sampling]
    ) -> Answer:
        """One complete answer for end user `user_id`. `prompt`: text, or chat messages
        ([{"role": "user", "content": "..."}]); sampling: max_new_tokens, temperature, top_p, top_k,
        repetition_penalty, seed, stop, do_sample, logprobs.

            answer = client.generate("how do I bake bread?", "alice", max_new_tokens=48, temperature=0.7, seed=1)
        """
        req = wire.generate_request(prompt, user_id, sampling)
        msg, _, traceparent = self._call(self._policy.Generate, req, timeout_s)
        return Answer.from_proto(msg, user_id, traceparent)

    def stream(
        self, prompt: Prompt, user_id: str, *, timeout_s: float | None = None, **sampling: Unpack[Sampling]
    ) -> Iterator[Chunk]:
        """The answer token by token; the last Chunk carries the whole `Answer` (`chunk.answer`).
        A refusal before the first token is retried like any call; a stream cut later raises.
        Stopping early (break) cancels the call, which frees the server's slot.

            for chunk in client.stream("hi", "alice"):
                print(chunk.text, end="", flush=True)
            client.thumbs(chunk.answer, up=True)  # the last chunk's answer
        """
        req = wire.generate_request(prompt, user_id, sampling)
        attempt = 0
        while True:
            attempt += 1
            call = self._policy.GenerateStream(req, timeout=timeout_s or self.settings.timeout_s, metadata=self._md)
            started, traceparent = False, ""
            try:
                for msg in call:
                    if not started:  # the initial metadata came before the first message
                        started, traceparent = True, wire.traceparent(call.initial_metadata())
                    yield Chunk.from_proto(msg, user_id, traceparent)
                return
            except grpc.RpcError as e:
                wait = None if started else self.settings.retry.delay_s(attempt, e.code(), retry_after_s(e))
                if wait is None:
                    raise from_rpc_error(e, attempts=attempt) from e
            finally:
                call.cancel()
            time.sleep(wait)

    def generate_pair(
        self,
        prompt: Prompt,
        user_id: str,
        *,
        candidate_version: int = 0,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> Pair:
        """Two answers to one prompt for a "which is better?" choice (`prefer`). candidate_version:
        side B from that model-store version (an admin call unless it is the serving or configured one).

            pair = client.generate_pair("hi", "alice", max_new_tokens=32)
            show(pair.a.text, pair.b.text); client.prefer(pair, "A")
        """
        req = wire.pair_request(prompt, user_id, candidate_version, sampling)
        msg, _, traceparent = self._call(self._policy.GeneratePair, req, timeout_s)
        return Pair.from_proto(msg, user_id, traceparent)

    # ------------------------------------------------------------------ feedback
    def thumbs(
        self,
        answer: Answer,
        up: bool,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """Thumbs up (up=True) or down on `answer`, from the user it was served to (and in its trace).

        receipt = client.thumbs(answer, up=False, comment="wrong topic")
        receipt.status  # "accepted", "spooled", "duplicate" or "already_voted"
        """
        return self._submit(answer, wire.thumbs_request(answer, up, comment, feedback_id), timeout_s)

    def rate(
        self,
        answer: Answer,
        stars: int,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """A rating, 1..the service's rating scale (3 by default): `client.rate(answer, 3)`."""
        return self._submit(answer, wire.rating_request(answer, stars, comment, feedback_id), timeout_s)

    def prefer(
        self,
        pair: Pair,
        choice: Choice,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """Which side of `pair` the user preferred: "A", "B" or "TIE": `client.prefer(pair, "TIE")`."""
        return self._submit(pair, wire.preference_request(pair, choice, comment, feedback_id), timeout_s)

    def demonstrate(
        self,
        answer: Answer,
        text: str,
        comment: str | None = None,
        *,
        feedback_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Receipt:
        """The answer the user wanted instead of `answer`: `client.demonstrate(answer, "Click 'Forgot password'.")`."""
        return self._submit(answer, wire.demonstration_request(answer, text, comment, feedback_id), timeout_s)

    def _submit(self, target: Answer | Pair, req: feedback_pb2.FeedbackRequest, timeout_s: float | None) -> Receipt:
        """One feedback_id for every attempt: the service records it once. A DUPLICATE answer to a
        retry means an earlier attempt landed: it is reported as "accepted". `target`'s traceparent
        goes along in the metadata."""
        md = wire.submit_metadata(self._md, target)
        msg, attempts, _ = self._call(self._feedback.Submit, req, timeout_s, req.feedback_id, md)
        status = STATUS.get(msg.status, "accepted")
        if attempts > 1 and status == "duplicate":
            status = "accepted"
        return Receipt(req.feedback_id, status, attempts)

    # ------------------------------------------------------------------ sessions
    def create_session(self, user_id: str, ttl_s: int | None = None) -> Session:
        """A short-lived session for `user_id` (Feedback/CreateSession, made with this client's API
        key): hand `session.session` to that user's browser (the page's `?session=`) or to
        `Client(api_key=session.session)`; it acts as this key with the user pinned, never as admin.
        ttl_s: seconds it lives (None: the service's default, 3600 unless configured).

            s = client.create_session("alice", ttl_s=900)
            url = f"https://flywheel.example.com/ui/?session={s.session}"
        """
        req = feedback_pb2.CreateSessionRequest(user_id=user_id, ttl_s=ttl_s or 0)
        msg, _, _ = self._call(self._feedback.CreateSession, req, None)
        return Session.from_proto(msg)

    # ------------------------------------------------------------------ plumbing
    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return self.settings.metadata

    def _call(
        self,
        rpc: Any,
        req: Any,
        timeout_s: float | None,
        feedback_id: str | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[Any, int, str]:
        """(response, attempts, traceparent of its initial metadata): `rpc(req)` with the retry
        policy, with the client's metadata unless `metadata` is given; a FlywheelError once it gives up."""
        timeout, md = timeout_s or self.settings.timeout_s, self._md if metadata is None else metadata
        attempt = 0
        while True:
            attempt += 1
            try:
                msg, call = rpc.with_call(req, timeout=timeout, metadata=md)
                return msg, attempt, wire.traceparent(call.initial_metadata())
            except grpc.RpcError as e:
                wait = self.settings.retry.delay_s(attempt, e.code(), retry_after_s(e))
                if wait is None:
                    raise from_rpc_error(e, feedback_id, attempt) from e
            time.sleep(wait)

    def close(self) -> None:
        """Close both channels (calls in flight are cancelled)."""
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
