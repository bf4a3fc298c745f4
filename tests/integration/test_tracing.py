"""One trace per answer, across the real policy, feedback and reward join on a real Kafka broker.

The three services run in this process (each with its own event loop or consumer thread, real
ports and real clients) so that the SDK's InMemorySpanExporter, installed through
`tracing.setup`, sees every span. A client sends the traceparent that Generate returned with its
next calls (GeneratePair, a thumbs, a preference): the policy's, the feedback's and the join's
spans then share that one trace id, and the join's pair span links both interactions and the
feedback it came from. The context also survives the feedback spool across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka import KafkaConsumer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flywheel.core import bus, tracing
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.core.server import ServerConfig
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server as build_feedback
from flywheel.feedback.server import open_and_serve
from flywheel.reward.config import JoinConfig
from flywheel.reward.join import PreferenceJoin
from flywheel.reward.store import PreferenceStore
from flywheel.testing import wait_for
from flywheel.trainer.prompt_sources import KafkaPrompts
from flywheel.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2
from tests.integration.test_policy_service import HMAC_KEY, Running, make_config, make_store

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
SERVICES = ("policy", "feedback", "reward")
ON = tracing.TracingConfig(exporter="otlp")  # the in-memory exporter stands in for OTLP


class Feedback:
    """The feedback service (build_server + open_and_serve, as its __main__) on a loop in a thread."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, state: Path) -> None:
        cfg = FeedbackConfig(state_dir=str(state), send_timeout_s=1)
        server_cfg = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, grace_s=1)
        self.server, self.intake = build_feedback(server_cfg, cfg, kafka, topics, AuthConfig(hmac_key=HMAC_KEY))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start(handle_signals=False))
        self.call(open_and_serve(self.server, self.intake))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
        self.stub = feedback_pb2_grpc.FeedbackStub(self.channel)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.call(self.server.stop(grace=0), 20)
        self.intake.close(0.5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Join:
    """The reward service's preference join, consuming interactions and feedback in a thread."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, state: Path) -> None:
        self.join = PreferenceJoin(JoinConfig(), PreferenceStore(state / "join.db"))
        decoders = {topics.interactions: events_pb2.Interaction, topics.feedback: events_pb2.FeedbackEvent}
        self.consumer = bus.Consumer(kafka, f"join-{uuid.uuid4().hex[:8]}", decoders, self.join.handle, dlq_topic=None)
        self.consumer.start()

    def close(self) -> None:
        self.consumer.stop()


@pytest.fixture(scope="module")
def world(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("tracing")
    prefix = f"t{uuid.uuid4().hex[:10]}."
    d = TopicsConfig()
    topics = TopicsConfig(
        **{f: prefix + getattr(d, f) for f in ("interactions", "feedback", "preferences", "policy_updates")},
        **{f: prefix + getattr(d, f) for f in ("reward_updates", "dlq")},
        partitions=1,
    )
    kafka = KafkaConfig(bootstrap=kafka_bootstrap, session_timeout_ms=3000, request_timeout_ms=10_000)
    bus.ensure_topics(kafka, topics)
    make_store(root / "store")  # the starter policy, version 0
    policy = Running(make_config(kafka_bootstrap, topics, root / "store", root / "policy"))
    feedback = Feedback(kafka, topics, root / "feedback")
    join = Join(kafka, topics, root)
    yield {"policy": policy, "feedback": feedback, "join": join, "kafka": kafka, "topics": topics, "root": root}
    join.close()
    feedback.close()
    policy.close()
    tracing.shutdown()


def trace_on(exporter: InMemorySpanExporter | None, config: tracing.TracingConfig = ON) -> None:
    for name in SERVICES:
        tracing.setup(name, config, exporter=exporter)


def gen(prompt: str) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompt=prompt, user_id="alice", params=common_pb2.SamplingParams(max_new_tokens=4)
    )


def thumbs(answer: Any) -> feedback_pb2.FeedbackRequest:
    return feedback_pb2.FeedbackRequest(
        feedback_id=uuid.uuid4().hex,
        interaction_id=answer.interaction_id,
        feedback_token=answer.feedback_token,
        user_id="alice",
        thumbs=1,
    )


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def test_one_trace_from_answer_to_join(world: dict[str, Any]) -> None:
    spans = InMemorySpanExporter()
    trace_on(spans)
    policy, feedback, join = world["policy"], world["feedback"], world["join"]
    answer, call = policy.stub.Generate.with_call(gen("how do I bake bread?"), timeout=60)
    traceparent = dict(call.initial_metadata())["traceparent"]
    md = (("traceparent", traceparent),)
    trace_id = int(traceparent.split("-")[1], 16)

    pair = policy.stub.GeneratePair(policy_pb2.GeneratePairRequest(request=gen("where is my order?")), metadata=md)
    thumbs_req = thumbs(answer)
    pref_req = feedback_pb2.FeedbackRequest(
        feedback_id=uuid.uuid4().hex,
        pair_id=pair.pair_id,
        feedback_token=pair.feedback_token,
        user_id="alice",
        preference=events_pb2.PREFERENCE_A,
    )
    for req in (thumbs_req, pref_req):
        assert feedback.stub.Submit(req, metadata=md, timeout=30).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED

    def names() -> set[str]:
        return {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}

    wait_for(lambda: "join pair" in names(), 60, "the join to make the preference's pair")
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_service: dict[str, list[ReadableSpan]] = {}
    for s in mine:
        by_service.setdefault(service_of(s), []).append(s)
    assert {s.name for s in by_service["policy"]} >= {"flywheel.v1.Policy/Generate", "flywheel.v1.Policy/GeneratePair"}
    submits = [s for s in by_service["feedback"] if s.name == "flywheel.v1.Feedback/Submit"]
    assert len(submits) == 2 and all(s.kind == trace.SpanKind.SERVER for s in submits)
    joins = by_service["reward"]
    topics = world["topics"]
    fed = [s for s in joins if s.name == f"join {topics.feedback}"]
    assert len(fed) == 2, [s.name for s in joins]
    # each feedback's join span is a child of the Submit span that produced its record
    assert {s.parent.span_id for s in fed} == {s.context.span_id for s in submits}
    assert len([s for s in joins if s.name == f"join {topics.interactions}"]) == 3  # the answer and both sides

    (pair_span,) = [s for s in joins if s.name == "join pair"]
    linked = {link.attributes["flywheel.source_id"] for link in pair_span.links}
    assert linked == {pair.a.interaction_id, pair.b.interaction_id, pref_req.feedback_id}
    assert all(link.context.trace_id == trace_id for link in pair_span.links)
    assert join.join.store.pending_count() == 0


def test_context_survives_the_feedback_spool(world: dict[str, Any], tmp_path: Path) -> None:
    """Feedback spooled while Kafka is unreachable keeps its trace context on disk; after a restart
    the spool drains to Kafka and the join's span still joins the answer's trace."""
    spans = InMemorySpanExporter()
    trace_on(spans)
    policy, topics = world["policy"], world["topics"]
    answer, call = policy.stub.Generate.with_call(gen("how can I get a refund?"), timeout=60)
    traceparent = dict(call.initial_metadata())["traceparent"]
    trace_id = int(traceparent.split("-")[1], 16)

    away = KafkaConfig(bootstrap="127.0.0.1:9", request_timeout_ms=1000)  # nothing listens on the discard port
    offline = Feedback(away, topics, tmp_path / "fb")
    try:
        req = thumbs(answer)
        got = offline.stub.Submit(req, metadata=(("traceparent", traceparent),), timeout=30)
        assert got.status == feedback_pb2.SUBMIT_STATUS_SPOOLED
        assert offline.intake.spool is not None
        (spooled,) = offline.intake.spool.peek()
        assert tracing.span_context_of(spooled.headers).trace_id == trace_id  # type: ignore[union-attr]
    finally:
        offline.close()

    online = Feedback(world["kafka"], topics, tmp_path / "fb")  # the restart: the spool drains
    try:
        assert online.intake.spool is not None and online.intake.spool.wait_empty(30)
    finally:
        online.close()
    consumer = KafkaConsumer(topics.feedback, bootstrap_servers=world["kafka"].bootstrap, auto_offset_reset="earliest")
    try:
        records = []
        wait_for(
            lambda: (
                records.extend(m for ms in consumer.poll(500).values() for m in ms)
                or any(events_pb2.FeedbackEvent.FromString(m.value).feedback_id == req.feedback_id for m in records)
            ),
            30,
            "the drained feedback on its topic",
        )
    finally:
        consumer.close()
    (record,) = [m for m in records if events_pb2.FeedbackEvent.FromString(m.value).feedback_id == req.feedback_id]
    assert tracing.span_context_of(record.headers).trace_id == trace_id  # type: ignore[union-attr]

    def joined() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.name == f"join {topics.feedback}" and s.context.trace_id == trace_id
        ]

    wait_for(lambda: joined(), 30, "the join's span for the drained feedback")


def test_exporter_none_records_no_spans(world: dict[str, Any]) -> None:
    spans = InMemorySpanExporter()
    trace_on(spans, tracing.TracingConfig())  # exporter none: the in-memory exporter is never installed
    policy, feedback = world["policy"], world["feedback"]
    answer, call = policy.stub.Generate.with_call(gen("hello, how are you today?"), timeout=60)
    assert "traceparent" not in dict(call.initial_metadata())
    req = thumbs(answer)
    assert feedback.stub.Submit(req, timeout=30).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
    store = world["join"].join.store
    wait_for(lambda: store.feedback_status(req.feedback_id, req.user_id) == "joined", 30, "the join to join it")
    assert spans.get_finished_spans() == ()


def test_trainer_take_links_the_answers_it_used(world: dict[str, Any]) -> None:
    spans = InMemorySpanExporter()
    trace_on(spans)
    tracing.setup("trainer", ON, exporter=spans)
    policy, topics = world["policy"], world["topics"]
    _, call = policy.stub.Generate.with_call(gen("I need an invoice for my purchase."), timeout=60)
    trace_id = int(dict(call.initial_metadata())["traceparent"].split("-")[1], 16)
    model = policy.service.config.policy.model_name
    prompts = KafkaPrompts(world["kafka"], topics.interactions, ["from the pool"], f"trainer-{uuid.uuid4().hex}", model)
    try:

        def linked() -> bool:
            prompts.take(64)
            return any(
                link.context.trace_id == trace_id
                for s in spans.get_finished_spans()
                if s.name == "trainer take prompts"
                for link in s.links
            )

        wait_for(linked, 30, "a take span linked to the answer's trace")
    finally:
        prompts.close()
    took = [s for s in spans.get_finished_spans() if s.name == "trainer take prompts"]
    assert all(service_of(s) == "trainer" and s.attributes["flywheel.live_prompts"] >= 1 for s in took)


def test_http_answer_carries_its_traceparent(world: dict[str, Any]) -> None:
    spans = InMemorySpanExporter()
    trace_on(spans)
    body = json.dumps({"inputs": "where is my order?", "parameters": {"max_new_tokens": 4}}).encode()
    sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    req = urllib.request.Request(
        world["policy"].http + "/generate",
        data=body,
        headers={"Content-Type": "application/json", "traceparent": sent},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        returned = r.headers["traceparent"]
    assert returned.split("-")[1] == sent.split("-")[1] and returned != sent
    (span,) = [s for s in spans.get_finished_spans() if s.name == "POST /generate"]
    assert service_of(span) == "policy" and span.attributes["http.response.status_code"] == 200
    assert f"{span.context.span_id:016x}" == returned.split("-")[2]


SUBMIT = "flywheel.v1.Feedback/Submit"


def submit_span_under(spans: InMemorySpanExporter, traceparent: str) -> ReadableSpan:
    """The one feedback Submit span in `traceparent`'s trace, checked to be a child of that span."""
    _, trace_hex, span_hex, _ = traceparent.split("-")

    def submits() -> list[ReadableSpan]:
        finished = spans.get_finished_spans()
        return [s for s in finished if s.name == SUBMIT and s.context.trace_id == int(trace_hex, 16)]

    wait_for(lambda: submits(), 30, f"a Submit span in the trace of {traceparent}")
    (span,) = submits()
    assert service_of(span) == "feedback" and span.parent is not None and span.parent.span_id == int(span_hex, 16)
    return span


def test_the_client_links_feedback_to_the_answers_trace(world: dict[str, Any]) -> None:
    """flywheel.client keeps each answer's (and pair's) traceparent and sends it with its feedback."""
    from flywheel.client import Client

    spans = InMemorySpanExporter()
    trace_on(spans)
    addrs = world["policy"].grpc_addr, f"127.0.0.1:{world['feedback'].server.grpc_port}"
    with Client(*addrs) as client:
        answer = client.generate("how do I bake bread?", "erin", max_new_tokens=4)
        assert client.thumbs(answer, up=True).status == "accepted"
        *_, last = client.stream("where is my order?", "erin", max_new_tokens=4)
        streamed = last.answer
        assert streamed is not None and client.rate(streamed, 2).status == "accepted"
        pair = client.generate_pair("do you like coffee?", "erin", max_new_tokens=4)
        assert pair.a.traceparent == pair.b.traceparent == pair.traceparent
        assert client.prefer(pair, "A").status == "accepted"
    traces = {answer.traceparent, streamed.traceparent, pair.traceparent}
    assert len(traces) == 3 and all(t.startswith("00-") for t in traces)  # one trace per answer
    for traceparent in traces:
        submit_span_under(spans, traceparent)

    trace_on(spans, tracing.TracingConfig())  # tracing off: no traceparent, and feedback works as before
    with Client(*addrs) as client:
        quiet = client.generate("hello, how are you today?", "erin", max_new_tokens=4)
        assert quiet.traceparent == "" and client.thumbs(quiet, up=False).status == "accepted"


def test_the_async_client_links_feedback_to_the_answers_trace(world: dict[str, Any]) -> None:
    from flywheel.client import AsyncClient

    spans = InMemorySpanExporter()
    trace_on(spans)
    addrs = world["policy"].grpc_addr, f"127.0.0.1:{world['feedback'].server.grpc_port}"

    async def main() -> list[str]:
        async with AsyncClient(*addrs) as client:
            answer = await client.generate("how can I get a refund?", "frank", max_new_tokens=4)
            assert (await client.thumbs(answer, up=True)).status == "accepted"
            chunks = [c async for c in client.stream("I need an invoice.", "frank", max_new_tokens=4)]
            streamed = chunks[-1].answer
            assert streamed is not None and (await client.demonstrate(streamed, "Here it is.")).status == "accepted"
            pair = await client.generate_pair("do you like tea?", "frank", max_new_tokens=4)
            assert (await client.prefer(pair, "TIE")).status == "accepted"
            return [answer.traceparent, streamed.traceparent, pair.traceparent]

    traces = asyncio.run(main())
    assert len(set(traces)) == 3 and all(traces)
    for traceparent in traces:
        submit_span_under(spans, traceparent)
