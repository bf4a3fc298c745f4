"""Overload: a ServiceServer takes at most its limit of RPCs and HTTP requests at once.

Real gRPC and HTTP servers on 127.0.0.1 with a servicer and a route that hold their callers
until the test lets them go: the calls past the limit are refused at once with
RESOURCE_EXHAUSTED / 429, a message that names the limit and a retry-after hint; the admitted
ones finish normally; health checks, reflection, /health and /metrics still answer meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel.core import metrics
from flywheel.core.server import ServerConfig, ServiceServer
from flywheel.testing import wait_until
from flywheel.v1 import policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

pytestmark = pytest.mark.timeout(60)
RPC_REFUSAL = (
    "the test service is handling its limit of 3 RPCs at once (server.max_concurrent_rpcs): "
    "retry in 2 s, on another replica, or raise the limit"
)
HTTP_REFUSAL = (
    "the test service is handling its limit of 2 HTTP requests at once (server.max_concurrent_http): "
    "retry in 2 s, on another replica, or raise the limit"
)


class Gate:
    """Holds every caller that enters until `release()`; counts who is inside."""

    def __init__(self) -> None:
        self.inside = 0
        self.open = asyncio.Event()

    async def hold(self) -> None:
        self.inside += 1
        try:
            await self.open.wait()
        finally:
            self.inside -= 1

    def release(self) -> None:
        self.open.set()


class SlowReward(reward_pb2_grpc.RewardServicer):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def Score(self, request: Any, context: Any) -> Any:
        await self.gate.hold()
        return reward_pb2.ScoreResponse(score=len(request.response))


class SlowPolicy(policy_pb2_grpc.PolicyServicer):
    """A stream that sends one message, then holds until its gate opens."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def GenerateStream(self, request: Any, context: Any) -> Any:
        yield policy_pb2.GenerateStreamResponse(text="first")
        await self.gate.hold()
        yield policy_pb2.GenerateStreamResponse(text="last")


def serve(
    body: Callable[[ServiceServer], Awaitable[None]],
    servicers: Sequence[tuple[Any, Any]] = (),
    routes: Sequence[tuple[str, str, Any]] = (),
    **cfg: Any,
) -> None:
    """Start a server on free ports with these servicers and routes, SERVING; run `body`; stop it."""

    async def main() -> None:
        config = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, overload_retry_after_s=1.5, **cfg)
        server = ServiceServer(config, name="test")
        for add, servicer in servicers:
            server.add_servicer(add, servicer)
        for method, path, handler in routes:
            server.http_app.router.add_route(method, path, handler)
        await server.start(handle_signals=False)
        await server.set_serving(True)
        try:
            await body(server)
        finally:
            await server.stop(grace=0)

    asyncio.run(main())


def grpc_refusals() -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "flywheel_grpc_requests_total",
            {"service": "flywheel.v1.Reward", "method": "Score", "code": "RESOURCE_EXHAUSTED"},
        )
        or 0.0
    )


def http_refusals() -> float:
    labels = {"route": "/held", "method": "POST", "status": "429"}
    return metrics.REGISTRY.get_sample_value("flywheel_http_requests_total", labels) or 0.0


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, tuple]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", tuple(e.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", ()


async def probes_answer(ch: grpc.aio.Channel, server: ServiceServer) -> None:
    """Health (gRPC and HTTP), reflection and /metrics answer however loaded the service is."""
    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
    listed = [m async for m in info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
    assert "flywheel.v1.Reward" in {s.name for s in listed[0].list_services_response.service}
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/live", "/metrics"):
            async with s.get(f"http://127.0.0.1:{server.http_port}{path}") as resp:
                assert resp.status == 200, path


def test_rpcs_past_the_limit_are_refused_with_a_retry_hint_and_probes_still_answer() -> None:
    gate, stream_gate = Gate(), Gate()
    refusals_before = grpc_refusals()

    async def body(server: ServiceServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            score = reward_pb2_grpc.RewardStub(ch).Score
            # 3 + 2 at once: exactly the 2 past the limit are refused, at once.
            calls = [asyncio.ensure_future(outcome(score(reward_pb2.ScoreRequest(response="x" * i)))) for i in range(5)]
            await wait_until(lambda: gate.inside == 3 and sum(c.done() for c in calls) == 2, 10, "3 held, 2 refused")
            for code, details, trailing in [c.result() for c in calls if c.done()]:
                assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, RPC_REFUSAL)
                assert ("retry-after", "2") in trailing
            # Still full: one more is refused (before its request is even parsed); probes answer.
            code, details, trailing = await outcome(score(reward_pb2.ScoreRequest(prompt="late"), timeout=5))
            assert (code, details, trailing) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                RPC_REFUSAL,
                (("retry-after", "2"),),
            )
            await probes_answer(ch, server)
            assert server.rpc_limit.in_flight == 3
            gate.release()
            codes = [code for code, _, _ in await asyncio.gather(*calls)]
            assert codes.count(grpc.StatusCode.OK) == 3 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
            assert server.rpc_limit.in_flight == 0

            # A stream counts until it ends: three open streams fill the service.
            stream = policy_pb2_grpc.PolicyStub(ch).GenerateStream
            streams = [stream(policy_pb2.GenerateRequest(prompt="p")) for _ in range(3)]
            for s in streams:
                assert (await s.read()).text == "first"
            await wait_until(lambda: stream_gate.inside == 3, 10, "3 streams open")
            code, details, _ = await outcome(score(reward_pb2.ScoreRequest(response="abc"), timeout=5))
            assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, RPC_REFUSAL)
            streams.pop().cancel()  # a stream its caller cancels gives its place back
            await wait_until(lambda: server.rpc_limit.in_flight == 2, 10, "the cancelled stream's place")
            assert (await score(reward_pb2.ScoreRequest(response="ab"), timeout=5)).score == 2
            stream_gate.release()
            for s in streams:
                assert (await s.read()).text == "last" and await s.read() is grpc.aio.EOF
            assert (await score(reward_pb2.ScoreRequest(response="abc"), timeout=5)).score == 3
        assert grpc_refusals() - refusals_before == 4

    serve(
        body,
        [
            (reward_pb2_grpc.add_RewardServicer_to_server, SlowReward(gate)),
            (policy_pb2_grpc.add_PolicyServicer_to_server, SlowPolicy(stream_gate)),
        ],
        max_concurrent_rpcs=3,
    )


def test_http_requests_past_the_limit_get_429_with_retry_after() -> None:
    gate = Gate()
    refusals_before = http_refusals()

    async def held(request: web.Request) -> web.Response:
        await gate.hold()
        return web.json_response({"ok": True})

    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first\n")
        await gate.hold()
        await resp.write(b"last\n")
        return resp

    async def body(server: ServiceServer) -> None:
        base = f"http://127.0.0.1:{server.http_port}"
        async with aiohttp.ClientSession() as s:

            async def post() -> tuple[int, Any, str]:
                async with s.post(f"{base}/held", json={"inputs": "x" * 1000}) as r:
                    return r.status, await r.json(), r.headers.get("Retry-After", "")

            calls = [asyncio.ensure_future(post()) for _ in range(4)]
            await wait_until(lambda: gate.inside == 2 and sum(c.done() for c in calls) == 2, 10, "2 held, 2 refused")
            for c in calls:
                if c.done():
                    assert c.result() == (429, {"error": HTTP_REFUSAL, "error_type": "overloaded"}, "2")
            async with aiohttp.ClientSession() as other:  # probes, on connections of their own
                for path in ("/health", "/live", "/metrics"):
                    async with other.get(f"{base}{path}") as r:
                        assert r.status == 200, path
            assert server.http_limit.in_flight == 2
            gate.release()
            results = await asyncio.gather(*calls)
            assert sorted(status for status, _, _ in results) == [200, 200, 429, 429]
            assert server.http_limit.in_flight == 0

            # A streamed answer counts until it ends.
            gate.open.clear()
            async with s.get(f"{base}/streamed") as a, s.get(f"{base}/streamed") as b:
                assert await a.content.readline() == b"first\n" and await b.content.readline() == b"first\n"
                assert (await post())[:2] == (429, {"error": HTTP_REFUSAL, "error_type": "overloaded"})
                gate.release()
                assert await a.text() == "last\n" and await b.text() == "last\n"
            assert (await post())[0] == 200  # every slot is free again
        assert http_refusals() - refusals_before == 3

    serve(body, routes=[("POST", "/held", held), ("GET", "/streamed", streamed)], max_concurrent_http=2)


def test_health_watch_streams_have_a_bound_of_their_own_and_check_is_never_refused() -> None:
    async def body(server: ServiceServer) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(2)]
            for w in watches:
                assert (await w.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5).read()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.details() == (
                "2 health Watch streams are open already (server.max_health_watches): use Check, or retry in 5 s"
            )
            for _ in range(5):
                r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            watches.pop().cancel()
            await wait_until(lambda: server.health.watching == 1, 10, "the cancelled Watch's place")
            again = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await again.read()).status == health_pb2.HealthCheckResponse.SERVING

    serve(body, max_health_watches=2)
