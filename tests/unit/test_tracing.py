"""core/tracing.py: config validation, the trace context in headers and metadata, and the server
spans of a real ServiceServer (real gRPC and HTTP clients on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flywheel.core import errors, tracing
from flywheel.core.config import ConfigError, load
from flywheel.core.server import ServerConfig, ServiceServer
from flywheel.v1 import reward_pb2, reward_pb2_grpc

pytestmark = pytest.mark.timeout(60)
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID = int("0af7651916cd43dd8448eb211c80319c", 16)
OTLP = tracing.TracingConfig(exporter="otlp")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup("t", OTLP, exporter=exporter)
    yield exporter
    tracing.shutdown("t")


def test_config_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing.TracingConfig().exporter == "none"
    with pytest.raises(ConfigError, match=r"TracingConfig.exporter = 'jaeger': use one of none, otlp"):
        tracing.TracingConfig(exporter="jaeger")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"TracingConfig.sample_ratio = .*: use a number from 0"):
            tracing.TracingConfig(sample_ratio=bad)
    with pytest.raises(ConfigError, match=r"TracingConfig.otlp_endpoint = 'collector:4318': use the collector"):
        tracing.TracingConfig(exporter="otlp", otlp_endpoint="collector:4318")
    monkeypatch.setenv("FLYWHEEL_TRACING_EXPORTER", "OTLP")
    monkeypatch.setenv("FLYWHEEL_TRACING_SAMPLE_RATIO", "0.25")
    cfg = load(tracing.TracingConfig)
    assert (cfg.exporter, cfg.sample_ratio) == ("otlp", 0.25)


def test_context_in_and_out_of_headers(spans: InMemorySpanExporter) -> None:
    # Kafka headers are bytes, gRPC metadata and HTTP headers str; keys in any case.
    for carrier in ([("traceparent", PARENT.encode())], {"Traceparent": PARENT}, (("TRACEPARENT", PARENT),)):
        sc = tracing.span_context_of(carrier)
        assert sc is not None and sc.trace_id == TRACE_ID and sc.is_remote
    for carrier in (None, [], {"traceparent": "garbage"}, [("flywheel-event-id", b"x")]):
        assert tracing.span_context_of(carrier) is None
    assert tracing.record_headers() == []  # no span: nothing to carry
    with tracing.span("t", "op", context=tracing.context_of({"traceparent": PARENT})) as s:
        headers = tracing.record_headers()
        assert headers[0][0] == "traceparent" and headers[0][1].startswith(b"00-0af7651916cd43dd8448eb211c80319c-")
        back = tracing.span_context_of(headers)
        assert back is not None and (back.trace_id, back.span_id) == (
            s.get_span_context().trace_id,
            s.get_span_context().span_id,
        )
        # a record that already carries a context keeps it (a spool's drain re-sends it later)
        kept = [("traceparent", PARENT.encode())]
        assert tracing.with_context(kept) is kept
        assert tracing.with_context([("k", b"v")]) == [("k", b"v"), *headers]
        assert tracing.traceparent_of(s) == headers[0][1].decode()
    (done,) = spans.get_finished_spans()
    assert done.name == "op" and done.context.trace_id == TRACE_ID and done.parent.span_id == int(PARENT[36:52], 16)
    assert done.resource.attributes["service.name"] == "t"


def test_exporter_none_records_nothing_but_passes_the_context_on() -> None:
    tracing.setup("quiet", tracing.TracingConfig())
    try:
        assert tracing.tracer("quiet") is not None
        with tracing.span("quiet", "op", context=tracing.context_of({"traceparent": PARENT})) as s:
            assert not s.is_recording()
            assert tracing.record_headers() == [("traceparent", PARENT.encode())]  # the caller's, unchanged
        with tracing.span("quiet", "op") as s:
            assert tracing.record_headers() == []
    finally:
        tracing.shutdown("quiet")


def test_sample_ratio_zero_follows_the_callers_decision() -> None:
    exporter = InMemorySpanExporter()
    tracing.setup("t0", tracing.TracingConfig(exporter="otlp", sample_ratio=0.0), exporter=exporter)
    try:
        with tracing.span("t0", "new trace"):
            pass
        with tracing.span("t0", "sampled by caller", context=tracing.context_of({"traceparent": PARENT})):
            pass
        assert [s.name for s in exporter.get_finished_spans()] == ["sampled by caller"]
    finally:
        tracing.shutdown("t0")


class Reward(reward_pb2_grpc.RewardServicer):
    async def Score(self, request, context):  # noqa: ANN001, ANN201
        if not request.prompt:
            raise errors.InvalidArgument("prompt is empty: send the text the response answers")
        return reward_pb2.ScoreResponse(score=1.0)


def test_server_spans_for_grpc_and_http(spans: InMemorySpanExporter) -> None:
    async def main() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1), name="t")
        server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, Reward())

        async def echo(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return aiohttp.web.json_response({"traceparent": tracing.current_fields().get("traceparent")})

        server.http_app.router.add_get("/echo", echo)
        await server.start(handle_signals=False)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                stub = reward_pb2_grpc.RewardStub(ch)
                md = (("traceparent", PARENT),)
                await stub.Score(reward_pb2.ScoreRequest(prompt="p", response="r"), metadata=md)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Score(reward_pb2.ScoreRequest(prompt=""), metadata=md)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{server.http_port}"
                async with s.get(f"{url}/echo", headers={"traceparent": PARENT}) as r:
                    body, returned = await r.json(), r.headers["traceparent"]
                async with s.get(f"{url}/health") as r:
                    assert "traceparent" not in r.headers  # probes have no spans
        finally:
            await server.stop(grace=0)
        assert body["traceparent"] == returned  # the answer names the span the handler ran in
        assert returned.startswith("00-0af7651916cd43dd8448eb211c80319c-")

    asyncio.run(main())
    done = {s.name: s for s in spans.get_finished_spans()}
    assert set(done) == {"flywheel.v1.Reward/Score", "GET /echo"}, list(done)
    ok, bad = [s for s in spans.get_finished_spans() if s.name == "flywheel.v1.Reward/Score"]
    for s in (ok, bad):
        assert s.kind == trace.SpanKind.SERVER and s.context.trace_id == TRACE_ID
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status.status_code == trace.StatusCode.UNSET
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.status_code == trace.StatusCode.ERROR and bad.status.description == "INVALID_ARGUMENT"
    http = done["GET /echo"]
    assert http.attributes["http.response.status_code"] == 200 and http.context.trace_id == TRACE_ID
