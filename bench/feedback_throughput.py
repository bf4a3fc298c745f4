"""Feedback intake throughput: the real service (gRPC Submit and SubmitBatch, acks=all) against baselines.

Starts what it needs: an Apache Kafka broker (KRaft, in a temp dir; unless --bootstrap or
FLYWHEEL_TEST_KAFKA names one), `python -m flywheel.feedback` on free ports, and a
do-nothing Feedback servicer on the same ServiceServer (interceptor, health, reflection).
Then, on that broker, in one run:
  * submit:             N single Submit calls, C in flight, to the service (latency p50/p99 too);
  * grpc_ceiling:       the same Submit load, the same load generator, on the do-nothing servicer
                        (what Python gRPC itself allows on this machine);
  * submit_batch:       N events as SubmitBatch calls of --batch items, --batch-concurrency in flight;
  * grpc_ceiling_batch: the same SubmitBatch load on the do-nothing servicer (it answers
                        ACCEPTED per item without looking);
  * baseline_sync:      bus.Producer.send_sync of the same FeedbackEvents from C threads
                        (one ack awaited per event: what one Submit must do);
  * baseline_pipelined: bus.Producer.send of every event, then every ack awaited
                        (both with the intake's producer settings: linger, batch size, gzip).

Load generator (--client): `ghz` (default; github.com/bojand/ghz, a Go gRPC load tester,
built once by scripts/ghz with `go install`) so that the client costs little of the cores the
service and the broker need; or `python` (grpc.aio clients in --client-procs processes, the
former default). Both sides of every ratio use the same one. Each request is distinct: its
own feedback_id and a real HMAC feedback token for its own interaction, generated up front
(for ghz into a JSON data file it sends round-robin, each item once). The service
validates, verifies, deduplicates and waits for Kafka's ack (acks=all, idempotence) before
it answers. The bench checks the service's own counters (every event ACCEPTED, none
DUPLICATE or refused) and that the topic holds every event it acknowledged. Rate limits
are off. Client, service and broker share this machine's cores.

    flywheel bench feedback_throughput [--bootstrap HOST:PORT] [--n 20000] [--client ghz|python]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
from kafka import KafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (the Kafka launcher)

from flywheel.core import bus
from flywheel.core.auth import AuthConfig
from flywheel.core.config import KafkaConfig, TopicsConfig
from flywheel.feedback.intake import BATCH_BYTES, COMPRESSION, LINGER_MS
from flywheel.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-hmac-key-0123456789abcdef"
SIGNER = AuthConfig(hmac_key=KEY).signer()
CHANNEL_OPTIONS: list[tuple[str, object]] = []  # gRPC's defaults (one HTTP/2 connection per client process)
SUBMIT, SUBMIT_BATCH = "flywheel.v1.Feedback/Submit", "flywheel.v1.Feedback/SubmitBatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_dicts(prefix: str, n: int, start: int = 0) -> list[dict]:
    """n distinct rating submissions, each with a real feedback token for its own interaction."""
    out = []
    for i in range(start, start + n):
        iid, user = f"{prefix}-i{i}", f"user{i % 1000}"
        out.append(
            {
                "feedback_id": f"{prefix}-f{i}",
                "interaction_id": iid,
                "user_id": user,
                "feedback_token": SIGNER.issue(iid, 1, user),
                "rating": 1 + i % 3,
            }
        )
    return out


def requests(prefix: str, n: int, start: int = 0) -> list[feedback_pb2.FeedbackRequest]:
    return [feedback_pb2.FeedbackRequest(**d) for d in request_dicts(prefix, n, start)]


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


# ---------------------------------------------------------------------------- Kafka baselines


def intake_producer(kafka: KafkaConfig) -> bus.Producer:
    """A producer with the intake's own settings (linger, batch size, compression; acks=all, idempotence)."""
    return bus.Producer(kafka, linger_ms=LINGER_MS, batch_size=BATCH_BYTES, compression_type=COMPRESSION)


def baseline_sync(kafka: KafkaConfig, topic: str, evs: list, concurrency: int) -> float:
    producer = intake_producer(kafka)
    producer.send_sync(topic, "warmup", evs[0])
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda e: producer.send_sync(topic, e.interaction_id, e), evs))
    dt = time.perf_counter() - t0
    producer.close()
    return len(evs) / dt


def baseline_pipelined(kafka: KafkaConfig, topic: str, evs: list) -> float:
    producer = intake_producer(kafka)
    producer.send_sync(topic, "warmup", evs[0])
    t0 = time.perf_counter()
    futures = [producer.send(topic, e.interaction_id, e) for e in evs]
    for f in futures:
        f.get(timeout=60)
    dt = time.perf_counter() - t0
    producer.close()
    return len(evs) / dt


# ---------------------------------------------------------------------------- load: ghz


def ghz_binary(explicit: str | None) -> str:
    """--ghz, $FLYWHEEL_GHZ, or scripts/ghz (builds it once with `go install`); RuntimeError if none."""
    path = explicit or os.environ.get("FLYWHEEL_GHZ")
    if path:
        return path
    res = subprocess.run([str(ROOT / "scripts" / "ghz")], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/ghz could not provide ghz: {res.stderr.strip()[-500:]}")
    return res.stdout.strip()


class Ghz:
    """Runs ghz against a Feedback server, with the request data pre-generated into JSON files."""

    def __init__(self, binary: str, workdir: str, connections: int) -> None:
        self.binary, self.workdir, self.connections = binary, workdir, connections
        res = subprocess.run([binary, "--version"], capture_output=True, text=True)
        version = (res.stdout or res.stderr).strip()
        self.name = f"ghz {version} ({connections} connection{'s' * (connections > 1)})"

    def data(self, name: str, items: list[dict]) -> str:
        path = os.path.join(self.workdir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(items, f)
        return path

    def run(self, port: int, call: str, data: str, n: int, concurrency: int) -> dict:
        """ghz's figures for `n` calls of `call`, one data item each (round-robin over exactly n items)."""
        cmd = [self.binary, "--insecure", "--proto", str(ROOT / "protos/flywheel/v1/feedback.proto")]
        cmd += ["--import-paths", str(ROOT / "protos"), "--call", call, "--data-file", data]
        cmd += ["-n", str(n), "-c", str(concurrency), "--connections", str(self.connections), "--timeout", "60s"]
        cmd += ["-O", "json", f"127.0.0.1:{port}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"ghz failed ({res.returncode}): {res.stderr[-2000:]}")
        report = json.loads(res.stdout)
        codes = report.get("statusCodeDistribution") or {}
        assert codes.get("OK") == n and report["count"] == n, f"ghz: {codes} {report.get('errorDistribution')}"
        lat = {int(d["percentage"]): d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
        return {"per_s": report["rps"], "p50_ms": lat.get(50), "p99_ms": lat.get(99)}


# ---------------------------------------------------------------------------- load: Python clients


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


class Load:
    """One load generator for every measurement of a run: ghz or the Python clients."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.ghz = Ghz(ghz_binary(args.ghz), workdir, args.connections) if args.client == "ghz" else None
        self.name = self.ghz.name if self.ghz else f"python grpc.aio ({args.client_procs} processes)"

    def prepare(self, prefix: str, n: int) -> dict:
        """Request data for one Submit and one SubmitBatch measurement, distinct ids in each (made up front)."""
        if self.ghz is None:
            return {"prefix": prefix, "n": n}
        b, items = self.args.batch, request_dicts(f"{prefix}b", n)
        return {
            "n": n,
            SUBMIT: self.ghz.data(f"{prefix}-submit", request_dicts(f"{prefix}s", n)),
            SUBMIT_BATCH: self.ghz.data(f"{prefix}-batch", [{"items": items[i : i + b]} for i in range(0, n, b)]),
        }

    def submit(self, port: int, data: dict) -> dict:
        a = self.args
        if self.ghz is None:
            return drive("submit", port, f"{data['prefix']}s", data["n"], a.client_procs, a.concurrency)
        return self.ghz.run(port, SUBMIT, data[SUBMIT], data["n"], a.concurrency)

    def submit_batch(self, port: int, data: dict) -> dict:
        a = self.args
        if self.ghz is None:
            return drive(
                "submit_batch", port, f"{data['prefix']}b", data["n"], a.client_procs, a.batch_concurrency, a.batch
            )
        calls = -(-data["n"] // a.batch)
        res = self.ghz.run(port, SUBMIT_BATCH, data[SUBMIT_BATCH], calls, a.batch_concurrency)
        return {**res, "per_s": res["per_s"] * data["n"] / calls}


# ---------------------------------------------------------------------------- servers


def serve_null(port: int) -> None:
    """A ServiceServer whose Feedback servicer answers at once: the gRPC ceiling."""
    from flywheel.core.server import ServerConfig, ServiceServer

    accepted = feedback_pb2.SUBMIT_STATUS_ACCEPTED

    class Null(feedback_pb2_grpc.FeedbackServicer):
        async def Submit(self, request: feedback_pb2.FeedbackRequest, context: object) -> feedback_pb2.FeedbackResponse:
            return feedback_pb2.FeedbackResponse(feedback_id=request.feedback_id, status=accepted)

        async def SubmitBatch(
            self, request: feedback_pb2.SubmitBatchRequest, context: object
        ) -> feedback_pb2.SubmitBatchResponse:
            out = feedback_pb2.SubmitBatchResponse()
            for item in request.items:
                out.results.add(response=feedback_pb2.FeedbackResponse(feedback_id=item.feedback_id, status=accepted))
            return out

    async def run() -> None:
        server = ServiceServer(ServerConfig(host="127.0.0.1", grpc_port=port, http_port=0), name="null")
        server.add_servicer(feedback_pb2_grpc.add_FeedbackServicer_to_server, Null())
        await server.start()
        await server.wait()

    asyncio.run(run())


def wait_for_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(0.2)


@contextlib.contextmanager
def child(cmd: list[str], env: dict | None = None):
    proc = subprocess.Popen(cmd, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def broker(bootstrap: str | None):
    """The broker to use: the one named, or an Apache Kafka started here for this run."""
    if bootstrap:
        yield bootstrap
        return
    from tools.kafka import ApacheKafka

    print("starting an Apache Kafka broker for this run (--bootstrap to use your own)", file=sys.stderr)
    kafka = ApacheKafka()
    try:
        yield kafka.start()
    finally:
        kafka.stop()


def outcome_counts(http_port: int) -> dict[str, float]:
    """The service's flywheel_feedback_accepted / _rejected counters, summed by status / reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^flywheel_feedback_(accepted|rejected)_total\{([^}]*)\} (\S+)$", text, re.M):
        label = re.search(r'(?:status|reason)="([^"]*)"', m.group(2))
        key = f"{m.group(1)}:{label.group(1) if label else ''}"
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def topic_size(bootstrap: str, topic: str) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
    n = sum(c.end_offsets(tps).values())
    c.close()
    return n


# ---------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, bootstrap: str) -> dict:
    run = uuid.uuid4().hex[:8]
    kafka = KafkaConfig(bootstrap=bootstrap)
    topics = TopicsConfig(feedback=f"bench{run}.flywheel.feedback")
    base_topic = f"bench{run}.baseline"
    bus.ensure_topics(kafka, topics)
    bus.ensure_topics(kafka, TopicsConfig(feedback=base_topic))
    env = {
        **os.environ,
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_HMAC_KEY": KEY,
        "FLYWHEEL_TOPIC_FEEDBACK": topics.feedback,
        "FLYWHEEL_FEEDBACK_USER_RATE": "0",
        "FLYWHEEL_FEEDBACK_KEY_RATE": "0",
        "FLYWHEEL_FEEDBACK_MAX_BATCH": str(args.batch),
    }
    grpc_port, http_port, null_port = free_port(), free_port(), free_port()
    state, work = tempfile.mkdtemp(prefix="feedback-bench-"), tempfile.mkdtemp(prefix="feedback-bench-data-")
    svc = [sys.executable, "-m", "flywheel.feedback", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    svc += ["--host", "127.0.0.1", "--state-dir", state, "--log-level", "WARNING"]
    load = Load(args, work)
    n, reps = args.n, args.repeat
    data = [load.prepare(f"{run}r{r}", n) for r in range(reps)]  # the service's: distinct ids every repeat
    null_data = load.prepare(f"{run}n", n)  # the do-nothing servicer's (it keeps nothing: reused)
    best: dict[str, dict] = {}

    def keep(name: str, res: dict) -> None:
        if name not in best or res["per_s"] > best[name]["per_s"]:
            best[name] = res

    with child(svc, env) as proc, child([sys.executable, __file__, "--serve-null", str(null_port)]):
        wait_for_port(null_port, proc, "the do-nothing servicer")
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "feedback service did not start"
                time.sleep(0.1)
        warm = load.prepare(f"{run}w", 2 * args.batch)  # warm up both servers with the same client
        for port in (grpc_port, null_port):
            load.submit(port, warm)
            load.submit_batch(port, warm)
        before = outcome_counts(http_port)
        for r in range(reps):
            keep("submit", load.submit(grpc_port, data[r]))
            keep("grpc_ceiling", load.submit(null_port, null_data))
            keep("submit_batch", load.submit_batch(grpc_port, data[r]))
            keep("grpc_ceiling_batch", load.submit_batch(null_port, null_data))
        after = outcome_counts(http_port)
    sync_evs = events(requests(f"{run}x", min(n, args.baseline_n)))
    keep("baseline_sync", {"per_s": baseline_sync(kafka, base_topic, sync_evs, args.concurrency)})
    keep("baseline_pipelined", {"per_s": baseline_pipelined(kafka, base_topic, events(requests(f"{run}y", n)))})
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    accepted = int(delta.get("accepted:accepted", 0))
    on_topic = topic_size(bootstrap, topics.feedback)
    results: dict = {name: round(best[name]["per_s"]) for name in best}
    results = {f"{k}_per_s": v for k, v in results.items()}
    for name in ("submit", "grpc_ceiling", "submit_batch"):
        for q in ("p50_ms", "p99_ms"):
            if best[name].get(q) is not None:
                results[f"{name}_{q}"] = round(best[name][q], 1)
    r = results
    r["submit_vs_grpc_ceiling"] = round(r["submit_per_s"] / r["grpc_ceiling_per_s"], 3)
    r["batch_vs_grpc_ceiling_batch"] = round(r["submit_batch_per_s"] / r["grpc_ceiling_batch_per_s"], 3)
    r["submit_vs_send_sync"] = round(r["submit_per_s"] / r["baseline_sync_per_s"], 3)
    r["batch_vs_pipelined"] = round(r["submit_batch_per_s"] / r["baseline_pipelined_per_s"], 3)
    r.update(client=load.name, n=n, repeat=reps, concurrency=args.concurrency, batch=args.batch)
    r.update(batch_concurrency=args.batch_concurrency, cpus=os.cpu_count())
    r["service_outcomes"] = {k: int(v) for k, v in sorted(delta.items()) if v}
    r["events_on_topic"] = on_topic
    print(json.dumps(r, indent=2))
    want = 2 * n * reps
    assert accepted == want and sum(delta.values()) == want, f"the service did not accept every event: {delta}"
    assert on_topic >= want, f"the service acknowledged {want} events but the topic holds {on_topic}"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bootstrap",
        default=os.environ.get("FLYWHEEL_TEST_KAFKA"),
        help="Kafka to use (default: $FLYWHEEL_TEST_KAFKA, else an Apache Kafka started for this run)",
    )
    ap.add_argument("--n", type=int, default=20_000, help="events per measurement")
    ap.add_argument("--repeat", type=int, default=1, help="measure each side this many times; report the best")
    ap.add_argument("--concurrency", type=int, default=64, help="Submit calls in flight / send_sync threads")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--batch-concurrency", type=int, default=8, help="SubmitBatch calls in flight in all")
    ap.add_argument("--client", choices=("ghz", "python"), default="ghz", help="load generator for both sides")
    ap.add_argument("--ghz", default=None, help="ghz binary (default: $FLYWHEEL_GHZ, else built by scripts/ghz)")
    ap.add_argument("--connections", type=int, default=1, help="ghz: gRPC connections")
    ap.add_argument("--client-procs", type=int, default=2, help="python: client processes")
    ap.add_argument("--baseline-n", type=int, default=10_000, help="events for the send_sync baseline (slow)")
    ap.add_argument("--serve-null", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_null is not None:
        serve_null(args.serve_null)
        return
    with broker(args.bootstrap) as bootstrap:
        measure(args, bootstrap)


if __name__ == "__main__":
    main()
