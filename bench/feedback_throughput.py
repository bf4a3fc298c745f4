"""Feedback intake throughput: the real service (gRPC Submit and SubmitBatch) against raw producer sends.

Starts `python -m flywheel.feedback` on free ports against a real broker, then in one run on
that broker:
  * baseline_sync:      bus.Producer.send_sync of the same FeedbackEvents from C threads
                        (one ack awaited per event: what one Submit must do);
  * submit:             C concurrent gRPC Submit calls (grpc.aio clients in --client-procs
                        processes, C/procs calls in flight each; latency p50/p99 too);
  * baseline_pipelined: bus.Producer.send of every event, then every ack awaited;
  * submit_batch:       SubmitBatch of --batch items, --batch-concurrency calls in flight;
  * grpc_ceiling:       the same Submit load (same client processes) on a ServiceServer whose servicer does nothing
                        (what Python gRPC itself allows on this machine with this client).
Every path uses acks=all and idempotence. It prints events/s and the ratios service/baseline,
and checks that the topic holds every event the service acknowledged. Rate limits are off.
Client and service share this machine's cores, so figures are a lower bound for the service.

    python bench/feedback_throughput.py --bootstrap localhost:9092 [--n 20000] [--client-procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import grpc
from kafka import KafkaConsumer, TopicPartition

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

KEY = "bench-hmac-key-0123456789abcdef"
SIGNER = AuthConfig(hmac_key=KEY).signer()
CHANNEL_OPTIONS: list[tuple[str, object]] = []  # gRPC's defaults (one HTTP/2 connection per client process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests(prefix: str, n: int, start: int = 0) -> list[feedback_pb2.FeedbackRequest]:
    out = []
    for i in range(start, start + n):
        iid, user = f"{prefix}-i{i}", f"user{i % 1000}"
        out.append(
            feedback_pb2.FeedbackRequest(
                feedback_id=f"{prefix}-f{i}",
                interaction_id=iid,
                user_id=user,
                feedback_token=SIGNER.issue(iid, 1, user),
                rating=1 + i % 3,
            )
        )
    return out


def events(reqs: list[feedback_pb2.FeedbackRequest]) -> list[events_pb2.FeedbackEvent]:
    return [
        events_pb2.FeedbackEvent(
            feedback_id=r.feedback_id,
            interaction_id=r.interaction_id,
            kind=events_pb2.FEEDBACK_KIND_RATING,
            value=r.rating,
            rating_scale=3,
            user_id=r.user_id,
            policy_version=1,
        )
        for r in reqs
    ]


def baseline_sync(kafka: KafkaConfig, topic: str, evs: list, concurrency: int) -> float:
    producer = bus.Producer(kafka)
    producer.send_sync(topic, "warmup", evs[0])
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda e: producer.send_sync(topic, e.interaction_id, e), evs))
    dt = time.perf_counter() - t0
    producer.close()
    return len(evs) / dt


def baseline_pipelined(kafka: KafkaConfig, topic: str, evs: list) -> float:
    producer = bus.Producer(kafka)
    producer.send_sync(topic, "warmup", evs[0])
    t0 = time.perf_counter()
    futures = [producer.send(topic, e.interaction_id, e) for e in evs]
    for f in futures:
        f.get(timeout=60)
    dt = time.perf_counter() - t0
    producer.close()
    return len(evs) / dt


async def submit(port: int, reqs: list, concurrency: int, lat: list | None = None) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        queue = list(reversed(reqs))
        ok = 0
        clock = time.perf_counter

        async def worker() -> None:
            nonlocal ok
            while queue:
                t = clock()
                r = await stub.Submit(queue.pop())
                if lat is not None:
                    lat.append(clock() - t)
                ok += r.status == feedback_pb2.SUBMIT_STATUS_ACCEPTED

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(reqs) / (time.perf_counter() - t0), ok


async def submit_batch(port: int, reqs: list, batch: int, concurrency: int) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        batches = [feedback_pb2.SubmitBatchRequest(items=reqs[i : i + batch]) for i in range(0, len(reqs), batch)]
        batches.reverse()
        ok = 0

        async def worker() -> None:
            nonlocal ok
            while batches:
                out = await stub.SubmitBatch(batches.pop())
                ok += sum(x.response.status == feedback_pb2.SUBMIT_STATUS_ACCEPTED for x in out.results)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(reqs) / (time.perf_counter() - t0), ok


def _client(kind: str, port: int, prefix: str, start: int, n: int, batch: int, concurrency: int, barrier, out) -> None:
    """One client process: build its share of the requests, wait for the others, then drive its load."""
    reqs = requests(prefix, n, start)
    barrier.wait()
    lat: list[float] = []
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes on Linux
    if kind == "submit":
        _, ok = asyncio.run(submit(port, reqs, concurrency, lat))
    else:
        _, ok = asyncio.run(submit_batch(port, reqs, batch, concurrency))
    out.put((t0, time.perf_counter(), ok, lat))


def drive(kind: str, port: int, prefix: str, n: int, procs: int, concurrency: int, batch: int = 100) -> dict:
    """`kind` ("submit" or "submit_batch") load from `procs` client processes, `concurrency` calls in flight in all.

    Several processes, so that the client's own Python (request building, protobuf, the
    grpc.aio loop) is not what limits the figure; they still share this machine's cores.
    """
    ctx = multiprocessing.get_context("spawn")  # gRPC and fork() do not mix
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    share = [n // procs + (k < n % procs) for k in range(procs)]
    starts = [sum(share[:k]) for k in range(procs)]
    per = max(1, concurrency // procs)
    children = [
        ctx.Process(target=_client, args=(kind, port, prefix, starts[k], share[k], batch, per, barrier, out))
        for k in range(procs)
    ]
    for c in children:
        c.start()
    got = [out.get(timeout=600) for _ in children]
    for c in children:
        c.join(30)
    t0, t1 = min(g[0] for g in got), max(g[1] for g in got)
    lat = sorted(x for g in got for x in g[3])
    res = {"per_s": n / (t1 - t0), "ok": sum(g[2] for g in got)}
    if lat:
        res["p50_ms"] = 1000 * lat[len(lat) // 2]
        res["p99_ms"] = 1000 * lat[int(len(lat) * 0.99)]
    return res


def serve_null(port: int) -> None:
    """A ServiceServer whose Feedback servicer answers at once: the gRPC ceiling."""
    from flywheel.core.server import ServerConfig, ServiceServer

    class Null(feedback_pb2_grpc.FeedbackServicer):
        async def Submit(self, request: feedback_pb2.FeedbackRequest, context: object) -> feedback_pb2.FeedbackResponse:
            return feedback_pb2.FeedbackResponse(feedback_id=request.feedback_id, status=1)

    async def run() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=port, http_port=0), name="null")
        server.add_servicer(feedback_pb2_grpc.add_FeedbackServicer_to_server, Null())
        await server.start()
        await server.wait()

    asyncio.run(run())


def grpc_ceiling(prefix: str, n: int, concurrency: int, procs: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-null", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "null server did not start"
                time.sleep(0.2)
        asyncio.run(submit(port, requests(f"{prefix}w", 200), 8))  # warm up, as for the service
        return drive("submit", port, prefix, n, procs, concurrency)["per_s"]
    finally:
        proc.terminate()
        proc.wait(30)


def topic_size(bootstrap: str, topic: str) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
    n = sum(c.end_offsets(tps).values())
    c.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("FLYWHEEL_TEST_KAFKA") or "localhost:9092")
    ap.add_argument("--n", type=int, default=20_000, help="events per measurement")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent Submit calls / send_sync threads")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--batch-concurrency", type=int, default=8, help="SubmitBatch calls in flight in all")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes driving Submit / SubmitBatch")
    ap.add_argument("--serve-null", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_null is not None:
        serve_null(args.serve_null)
        return
    run = uuid.uuid4().hex[:8]
    kafka = KafkaConfig(bootstrap=args.bootstrap)
    topics = TopicsConfig(feedback=f"bench{run}.flywheel.feedback")
    base_topic = f"bench{run}.baseline"
    bus.ensure_topics(kafka, topics)
    bus.ensure_topics(kafka, TopicsConfig(feedback=base_topic))

    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLYWHEEL_KAFKA_BOOTSTRAP": args.bootstrap,
        "FLYWHEEL_HMAC_KEY": KEY,
        "FLYWHEEL_TOPIC_FEEDBACK": topics.feedback,
        "FLYWHEEL_FEEDBACK_USER_RATE": "0",
        "FLYWHEEL_FEEDBACK_KEY_RATE": "0",
        "FLYWHEEL_FEEDBACK_MAX_BATCH": str(args.batch),
    }
    state = tempfile.mkdtemp(prefix="feedback-bench-")
    cmd = [sys.executable, "-m", "flywheel.feedback", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    cmd += ["--host", "127.0.0.1", "--state-dir", state, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "feedback service did not start"
                time.sleep(0.1)
        asyncio.run(submit(grpc_port, requests(f"{run}w", 200), 8))  # warm up
        procs = args.client_procs
        results = {
            "baseline_sync_per_s": baseline_sync(
                kafka, base_topic, events(requests(f"{run}x", args.n)), args.concurrency
            ),
        }
        sub = drive("submit", grpc_port, f"{run}s", args.n, procs, args.concurrency)
        results["submit_per_s"], sub_ok = sub["per_s"], sub["ok"]
        results["submit_p50_ms"], results["submit_p99_ms"] = sub["p50_ms"], sub["p99_ms"]
        results["baseline_pipelined_per_s"] = baseline_pipelined(kafka, base_topic, events(requests(f"{run}y", args.n)))
        bat = drive("submit_batch", grpc_port, f"{run}b", args.n, procs, args.batch_concurrency, args.batch)
        results["submit_batch_per_s"], batch_ok = bat["per_s"], bat["ok"]
    finally:
        proc.terminate()
        proc.wait(30)
    results["grpc_ceiling_per_s"] = grpc_ceiling(f"{run}n", args.n, args.concurrency, args.client_procs)
    on_topic = topic_size(args.bootstrap, topics.feedback)
    results = {k: round(v, 1) if k.endswith("_ms") else round(v) for k, v in results.items()}
    results["submit_vs_send_sync"] = round(results["submit_per_s"] / results["baseline_sync_per_s"], 3)
    results["batch_vs_pipelined"] = round(results["submit_batch_per_s"] / results["baseline_pipelined_per_s"], 3)
    results["submit_vs_grpc_ceiling"] = round(results["submit_per_s"] / results["grpc_ceiling_per_s"], 3)
    results.update(n=args.n, concurrency=args.concurrency, batch=args.batch, accepted=sub_ok + batch_ok)
    results.update(batch_concurrency=args.batch_concurrency, client_procs=args.client_procs, cpus=os.cpu_count())
    results["events_on_topic"] = on_topic
    print(json.dumps(results, indent=2))
    assert sub_ok + batch_ok == 2 * args.n and on_topic >= 2 * args.n + 200, "the service lost events"


if __name__ == "__main__":
    main()
