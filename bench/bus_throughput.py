"""Throughput of the bus (our Producer and Consumer loop) against raw kafka-python, same settings.

Produces N small Interaction events and consumes them, first with raw kafka-python (the
baseline), then with flywheel.core.bus, in the same run on the same broker, and prints
records/s for both and the ratio ours/raw. Both sides use acks=all, idempotence,
linger_ms=5, manual commits after each poll batch, and protobuf (de)serialization.

    python bench/bus_throughput.py --bootstrap localhost:9092
    python bench/bus_throughput.py --broker kafka   # starts Apache Kafka (jars via mvn)
    python bench/bus_throughput.py --both           # starts Apache Kafka and Tansu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (the Kafka launcher)

from flywheel.core import brokers, bus
from flywheel.core.config import KafkaConfig
from flywheel.v1 import common_pb2, events_pb2
from tools import kafka


def event(i: int) -> events_pb2.Interaction:
    return events_pb2.Interaction(
        interaction_id=f"i-{i:08d}",
        prompt="What is the capital of France?",
        response="Paris.",
        policy_version=1,
        params=common_pb2.SamplingParams(max_new_tokens=32, temperature=0.7),
        prompt_tokens=8,
        generated_tokens=2,
    )


def raw_produce(kafka: KafkaConfig, topic: str, events: list) -> float:
    p = KafkaProducer(
        **kafka.client_options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    t0 = time.perf_counter()
    for e in events:
        p.send(topic, key=e.interaction_id.encode(), value=e.SerializeToString())
    p.flush()
    dt = time.perf_counter() - t0
    p.close()
    return dt


def ours_produce(kafka: KafkaConfig, topic: str, events: list) -> float:
    p = bus.Producer(kafka)
    _ = p.client  # connect outside the timing, as the raw producer does in its constructor
    t0 = time.perf_counter()
    for e in events:
        p.send(topic, e.interaction_id, e)
    p.flush()
    dt = time.perf_counter() - t0
    p.close()
    return dt


def raw_consume(kafka: KafkaConfig, topic: str, n: int) -> float:
    c = KafkaConsumer(
        topic,
        **kafka.client_options(),
        group_id="raw-" + topic,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=200,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.session_timeout_ms // 3,
    )
    seen, t0 = 0, None
    while seen < n:
        batches = c.poll(timeout_ms=200)
        offsets = {}
        for tp, msgs in batches.items():
            for m in msgs:
                t0 = t0 or time.perf_counter()  # from the first record: group join is not throughput
                events_pb2.Interaction.FromString(m.value)
                seen += 1
                offsets[tp] = OffsetAndMetadata(m.offset + 1, "", -1)
        if offsets:
            c.commit(offsets)
    dt = time.perf_counter() - t0
    c.close(autocommit=False)
    return dt


def ours_consume(kafka: KafkaConfig, topic: str, n: int) -> float:
    state = {"seen": 0, "t0": 0.0}

    def handle(_r: bus.Record) -> None:
        if state["seen"] == 0:
            state["t0"] = time.perf_counter()
        state["seen"] += 1

    c = bus.Consumer(kafka, "ours-" + topic, {topic: events_pb2.Interaction}, handle, dlq_topic=None)
    while state["seen"] < n:
        c.poll_once()
    dt = time.perf_counter() - state["t0"]
    c.close()
    return dt


def one_round(kafka: KafkaConfig, events: list, raw_first: bool) -> dict[str, float]:
    """Records/s of each side on fresh topics; `raw_first` alternates who meets a cold broker."""
    n = len(events)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    topics = {"raw": f"{prefix}-raw", "ours": f"{prefix}-ours"}
    admin = KafkaAdminClient(**kafka.client_options())
    admin.create_topics({t: {"num_partitions": 1, "replication_factor": 1} for t in topics.values()})
    admin.wait_for_topics(list(topics.values()))
    admin.close()
    produce = {"raw": raw_produce, "ours": ours_produce}
    consume = {"raw": raw_consume, "ours": ours_consume}
    order = ["raw", "ours"] if raw_first else ["ours", "raw"]
    out = {}
    for side in order:
        out[f"produce_{side}"] = n / produce[side](kafka, topics[side], events)
    for side in order:
        out[f"consume_{side}"] = n / consume[side](kafka, topics[side], n)
    return out


def bench(name: str, bootstrap: str, n: int, repeat: int) -> dict:
    """A discarded warm-up round (JIT, page cache), then `repeat` alternating rounds; medians."""
    kafka = KafkaConfig(bootstrap=bootstrap, session_timeout_ms=6000)
    events = [event(i) for i in range(n)]
    one_round(kafka, events[: max(1000, n // 4)], raw_first=True)
    rounds = [one_round(kafka, events, raw_first=i % 2 == 0) for i in range(repeat)]
    res: dict = {"broker": name, "n": n, "rounds": repeat, "bytes_per_event": events[0].ByteSize()}
    for key in rounds[0]:
        res[key] = statistics.median(r[key] for r in rounds)
    for what in ("produce", "consume"):
        res[f"{what}_ratio"] = res[f"{what}_ours"] / res[f"{what}_raw"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="an existing broker (host:port); otherwise one is started")
    ap.add_argument("--broker", choices=["kafka", "tansu"], default="kafka", help="which broker to start")
    ap.add_argument("--both", action="store_true", help="start and measure Apache Kafka and Tansu")
    ap.add_argument("-n", type=int, default=20_000, help="events per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="measured rounds (median reported)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per broker")
    a = ap.parse_args()
    targets: list[tuple[str, str | None]] = (
        [("given", a.bootstrap)] if a.bootstrap else [(b, None) for b in (["kafka", "tansu"] if a.both else [a.broker])]
    )
    for name, bootstrap in targets:
        broker = None
        if bootstrap is None:
            broker = kafka.ApacheKafka() if name == "kafka" else brokers.EmbeddedTansu()
            bootstrap = broker.start()
        try:
            r = bench(name, bootstrap, a.n, a.repeat)
        finally:
            if broker is not None:
                broker.stop()
        if a.json:
            print(json.dumps(r))
            continue
        print(f"{name} ({bootstrap}): {r['n']} events of {r['bytes_per_event']} B, 1 partition, acks=all, idempotent;")
        print(f"  median of {r['rounds']} rounds after a warm-up round")
        for what in ("produce", "consume"):
            raw, ours, ratio = r[f"{what}_raw"], r[f"{what}_ours"], r[f"{what}_ratio"]
            print(
                f"  {what:8s} raw kafka-python {raw:9.0f} rec/s   flywheel.bus {ours:9.0f} rec/s   ours/raw {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
