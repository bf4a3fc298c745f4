"""The policy service at 10x its capacity: every call ends in an answer or a prompt
RESOURCE_EXHAUSTED, the answers it admits stay about as fast as without the crowd, and its memory
stays bounded. In one run:
  1. unloaded: as many concurrent callers as the running batch holds (`--batch`), each asking again
     as soon as it has its answer, for --seconds: the p50/p99 latency of an answer;
  2. overloaded: 10 x (batch + queue) callers doing the same; a refused caller waits what the
     service's retry-after hint says (with jitter, as a client should; --backoff-ms instead to
     hammer it) and asks again. The p99 of the admitted answers against the unloaded p99 (target: at most
     1.5x), how many calls were refused, and any other outcome (target: none).
The service's resident memory is sampled from its /metrics every 0.2 s: the peak of each phase.

The model is serving.py's random-init Llama whose greedy answers always run --new-tokens long, so
every answer costs the same. The service runs on the first half of the CPUs and the callers on the
rest (--no-pin to share them). Kafka: --bootstrap, else the embedded Tansu broker.

    .venv/bin/python bench/overload.py
    .venv/bin/python bench/overload.py --batch 16 --queue 4 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from serving import broker, make_model, pct, pin_service_cpus, policy_process, report, service_env  # noqa: E402

from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc  # noqa: E402

CHANNELS = 8  # connections the callers share: no client-side stream limit in the way


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    exhausted: int = 0
    other: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def summary(self, callers: int, seconds: float) -> dict[str, object]:
        return {
            "callers": callers,
            "answers": len(self.latencies),
            "answers_per_s": len(self.latencies) / seconds,
            "resource_exhausted": self.exhausted,
            "other_outcomes": self.other,
            "p50_s": pct(self.latencies, 0.5),
            "p99_s": pct(self.latencies, 0.99),
            "peak_rss_mb": self.peak_rss_mb,
        }


def rss_mb(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("process_resident_memory_bytes"))
    return float(line.split()[-1]) / 2**20


def retry_after_s(e: grpc.aio.AioRpcError) -> float | None:
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after":
            return float(value)
    return None


async def run_phase(
    addr: str, metrics_url: str, callers: int, seconds: float, new: int, backoff_s: float | None
) -> Phase:
    phase = Phase()
    stop = time.monotonic() + seconds
    channels = [grpc.aio.insecure_channel(addr) for _ in range(CHANNELS)]
    stubs = [policy_pb2_grpc.PolicyStub(ch) for ch in channels]
    request = policy_pb2.GenerateRequest(
        prompt="tell me about the weather", user_id="caller", params=common_pb2.SamplingParams(max_new_tokens=new)
    )

    async def caller(i: int) -> None:
        stub = stubs[i % CHANNELS]
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                await stub.Generate(request, timeout=120)
                phase.latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    phase.exhausted += 1
                    hint = retry_after_s(e) if backoff_s is None else None
                    await asyncio.sleep(backoff_s if hint is None else hint * random.uniform(0.5, 1.5))
                else:
                    phase.other[e.code().name] = phase.other.get(e.code().name, 0) + 1

    async def sample_rss() -> None:
        while time.monotonic() < stop:
            phase.peak_rss_mb = max(phase.peak_rss_mb, await asyncio.to_thread(rss_mb, metrics_url))
            await asyncio.sleep(0.2)

    try:
        await asyncio.gather(sample_rss(), *(caller(i) for i in range(callers)))
    finally:
        for ch in channels:
            await ch.close()
    return phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="the service's max_concurrent_sequences")
    ap.add_argument("--queue", type=int, default=2, help="the service's max_queue: requests waiting for a slot")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument(
        "--backoff-ms",
        type=float,
        default=None,
        help="a refused caller waits this long instead of the service's retry-after hint (e.g. 50: hammering)",
    )
    ap.add_argument("--no-pin", action="store_true", help="the service and the callers share every CPU")
    ap.add_argument("--bootstrap", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    service_cpus = None if args.no_pin else pin_service_cpus()
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-overload-"))
    path = make_model(root / "model", args.hidden, args.layers)
    engine = {
        "model": path,
        "max_concurrent": args.batch,
        "max_queue": args.queue,
        "max_new_tokens_cap": args.new_tokens,
    }
    capacity = args.batch + args.queue
    backoff = None if args.backoff_ms is None else args.backoff_ms / 1000
    with broker(args.bootstrap) as bootstrap:
        env = service_env(bootstrap, root, engine) | {"OMP_NUM_THREADS": "1"}
        with policy_process(env, root / "policy.log", cpus=service_cpus) as (addr, url):
            run = lambda n: asyncio.run(  # noqa: E731
                run_phase(addr, url + "/metrics", n, args.seconds, args.new_tokens, backoff)
            )
            run(args.batch)  # warm-up, not counted
            unloaded, loaded = run(args.batch), run(10 * capacity)
    u, o = unloaded.summary(args.batch, args.seconds), loaded.summary(10 * capacity, args.seconds)
    out = {
        "model": {"hidden": args.hidden, "layers": args.layers, "new_tokens": args.new_tokens},
        "service": {"max_concurrent_sequences": args.batch, "max_queue": args.queue, "capacity": capacity},
        "pinned": not args.no_pin,
        "refused_callers_wait": "retry-after hint" if backoff is None else f"{args.backoff_ms} ms",
        "unloaded": u,
        "overloaded": o,
        "admitted_p99_vs_unloaded": o["p99_s"] / u["p99_s"],
        "rss_overloaded_vs_unloaded": o["peak_rss_mb"] / u["peak_rss_mb"],
        "every_call_answered_or_refused": not o["other_outcomes"] and not u["other_outcomes"],
    }
    report(out, args.out, root)
    print(
        f"at 10x capacity ({10 * capacity} callers): admitted p99 {out['admitted_p99_vs_unloaded']:.2f}x the "
        f"unloaded p99 (target <= 1.5x), {o['resource_exhausted']} refused, other outcomes {o['other_outcomes'] or 0}, "
        f"peak RSS {o['peak_rss_mb']:.0f} MiB ({out['rss_overloaded_vs_unloaded']:.2f}x unloaded)"
    )


if __name__ == "__main__":
    main()
