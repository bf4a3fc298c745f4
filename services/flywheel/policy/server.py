"""gRPC `flywheel.v1.Policy`: a thin servicer over PolicyService (TGI's servicer rule).

It converts protobuf to GenerationRequest and Served back to protobuf, nothing more; every
rule lives in the engine (limits, sampling ranges) or the service (ids, tokens, deadlines).
Errors travel as FlywheelError and the server's interceptor turns them into status codes.
The caller's gRPC deadline becomes the request's deadline; a cancelled call (or a client that
went away mid-stream) cancels the engine call, which frees the sequence's slot at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from flywheel.core import errors, tracing
from flywheel.core.auth import Caller
from flywheel.core.server import ServerConfig, ServiceServer
from flywheel.policy.requests import GenerationRequest, Token
from flywheel.policy.service import PolicyService, Served
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc


def request_from_proto(msg: policy_pb2.GenerateRequest) -> GenerationRequest:
    """Zero (unset) proto fields take the engine's defaults; temperature 0 is greedy unless do_sample."""
    p = msg.params
    messages = [{"role": m.role, "content": m.content} for m in msg.messages] or None
    if messages is not None and msg.prompt:
        raise errors.InvalidArgument("set either prompt or messages, not both")
    return GenerationRequest(
        prompt=None if messages is not None else msg.prompt,
        messages=messages,
        max_new_tokens=p.max_new_tokens or None,
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty or 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        do_sample=p.do_sample,
        logprobs=p.logprobs,
    )


def token_proto(t: Token) -> common_pb2.Token:
    return common_pb2.Token(id=t.id, text=t.text, logprob=t.logprob or 0.0, special=t.special)


def response_proto(s: Served, with_tokens: bool) -> policy_pb2.GenerateResponse:
    r = s.result
    return policy_pb2.GenerateResponse(
        text=r.text,
        interaction_id=s.interaction_id,
        policy_version=r.version,
        feedback_token=s.feedback_token,
        finish_reason=r.finish_reason,
        prompt_tokens=r.prompt_tokens,
        generated_tokens=r.generated_tokens,
        tokens=[token_proto(t) for t in r.tokens] if with_tokens else [],
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    left = context.time_remaining()
    return None if left is None else max(0.0, left)


async def _send_trace(context: grpc.aio.ServicerContext) -> None:
    """The answer's trace context as initial metadata (`traceparent`): a client sends it back with
    its feedback, which then joins this answer's trace (docs/ARCHITECTURE.md, 'Tracing')."""
    fields = tracing.current_fields()
    if fields:
        await context.send_initial_metadata(tuple(fields.items()))


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    def _user(self, msg: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> tuple[str, Caller]:
        """The end user (the request's user_id, else a session's user or the caller's name) and the
        caller, in whose namespace the service binds the user (Caller.scoped_user_id; a session refuses
        another user here, before any work)."""
        caller = self.service.auth.caller(context.invocation_metadata())
        return caller.end_user(msg.user_id) or caller.default_user(), caller

    async def Generate(self, request: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        self.service.check_capacity()  # an overload is refused before any other work
        user, caller = self._user(request, context)
        await _send_trace(context)
        served = await self.service.generate(request_from_proto(request), user, _deadline(context), caller=caller)
        return response_proto(served, request.params.logprobs)

    async def GenerateStream(
        self, request: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        self.service.check_capacity()
        user, caller = self._user(request, context)
        await _send_trace(context)
        req = request_from_proto(request)
        async for ev, served in self.service.stream(req, user, _deadline(context), caller=caller):
            out = policy_pb2.GenerateStreamResponse(token=token_proto(ev.token) if ev.token else None, text=ev.text)
            if served is not None:
                out.final.CopyFrom(response_proto(served, False))
            yield out

    async def GeneratePair(self, request: policy_pb2.GeneratePairRequest, context: grpc.aio.ServicerContext) -> Any:
        self.service.check_capacity()
        user, caller = self._user(request.request, context)  # the caller: a candidate_version may need admin
        await _send_trace(context)
        req = request_from_proto(request.request)
        pair = await self.service.pair(req, user, request.candidate_version, _deadline(context), caller=caller)
        logprobs = request.request.params.logprobs
        return policy_pb2.GeneratePairResponse(
            pair_id=pair.pair_id,
            a=response_proto(pair.a, logprobs),
            b=response_proto(pair.b, logprobs),
            feedback_token=pair.feedback_token,
        )

    async def GetInfo(self, request: policy_pb2.GetInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        i = self.service.info()
        if i["version"] is None:
            raise errors.Unavailable("the policy model is not loaded yet: retry shortly", retry_after_s=1.0)
        return policy_pb2.PolicyInfo(
            model=i["model"],
            policy_version=i["version"],
            device=i["device"],
            dtype=i["dtype"],
            max_context_tokens=i["max_context_tokens"],
            max_input_tokens=i["max_input_tokens"],
            max_new_tokens=i["max_new_tokens"],
            max_concurrent_sequences=i["max_concurrent_sequences"],
            max_queue=i["max_queue"],
            running_sequences=i["running"],
            waiting_requests=i["waiting"],
            spooled_interactions=i["spooled_interactions"],
            last_swap_error=i["last_swap_error"],
        )


def build_server(service: PolicyService, server_config: ServerConfig) -> ServiceServer:
    """The policy ServiceServer: gRPC Policy plus the TGI and OpenAI HTTP routes (not started)."""
    from flywheel.policy.http import add_tgi_routes
    from flywheel.policy.openai_routes import add_openai_routes

    server = ServiceServer(server_config, name="policy")
    server.add_servicer(policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer(service))
    add_tgi_routes(server.http_app, service)
    add_openai_routes(server.http_app, service)
    return server
