"""Hot swap under continuous load: `flywheel serve policy` as its own process, N gRPC clients
generating without pause, 5 new versions published to the model store and announced on
flywheel.policy.updates one after another, --rounds times (60 versions by default). Reports:
  - swap latency (announcement -> first answer from the new version: it includes the whole of
    that answer, --new-tokens decode steps on the new weights) against the raw time to
    read that checkpoint from disk (every byte of its files, best of 3, measured before the load
    starts; the page cache is as warm as the service finds it); target <= 1.5x + 0.5 s. Also the
    service's own figures (its metrics, means over the swaps): swap duration (verify + load +
    switch) and announcement -> switch (delivery too, without the answer's own decode steps),
  - failed requests (target 0) and answers whose version is not the one announced last,
  - p99 request latency during swaps against steady state (target <= 1.3x). "During" is every
    request that overlaps an announcement -> first-new-answer window, pooled over the rounds (each
    round's own ratio is printed too). Steady state is measured across the whole run: the
    --steady-s before the first announcement and the quiet seconds between swaps (from --settle-s
    after a swap's first new answer to the next announcement, no-op windows left out). This
    host's speed drifts with its neighbours: with no swap at all, the p99 of 4-second slices of
    one run ranged 43-72 ms, so a baseline from one stretch of seconds (the steady seconds before
    the first swap, `p99_ratio_to_first_steady_s`, the headline figure until stop 16) put a run's
    ratio wherever that stretch fell. With it, a 90% interval of the ratio from a cluster
    bootstrap (swap windows and slices of the steady answers resampled): how far another run of
    the same code on this machine can land.
    The versions are all published before the load starts, and announced from another process
    (the trainer's side, whose Kafka client would otherwise share the clients' GIL right at the
    start of every window).
  - the noise band of that p99: steady-state p99 over random windows as long as the swap
    windows (the "during" sample is smaller, so one hiccup of a shared machine moves it),
  - with --noop, a control for what announcing costs without a swap: after each swap, the same
    announcement for another model (delivered, parsed, ignored), and the p99 and mean latency of
    the answers overlapping a window of that swap's length, whose p99 against steady state is
    what this estimator reads when nothing loads (an A/A test in the same run); and where the
    swap's cost falls: the mean latency of the answers that ended before the switch, were in
    flight at it (they finish on the old weights) or began after it, against the same phases of
    the no-op windows.

    .venv/bin/python bench/hot_swap.py
    .venv/bin/python bench/hot_swap.py --noop --pin
    .venv/bin/python bench/hot_swap.py --hidden 256 --layers 4
    .venv/bin/python bench/hot_swap.py --pin  # the service on its own CPUs, as a pod would be
    .venv/bin/python bench/hot_swap.py --hidden 1280 --layers 24 --device cuda --dtype bfloat16  # ~0.5B on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from serving import broker, make_model, pct, pin_service_cpus, policy_process, report, service_env  # noqa: E402

from flywheel.core.bus import Producer  # noqa: E402
from flywheel.core.config import KafkaConfig  # noqa: E402
from flywheel.core.modelstore import ModelStore, save_pretrained  # noqa: E402
from flywheel.policy import corpus  # noqa: E402
from flywheel.v1 import common_pb2, events_pb2, policy_pb2, policy_pb2_grpc  # noqa: E402

_producer: Producer | None = None  # the announcing process's own


def _start_announcer(kafka: KafkaConfig) -> None:
    global _producer
    _producer = Producer(kafka)


def _announce(topic: str, update: bytes) -> None:
    if update:
        _producer.send_sync(topic, "policy", events_pb2.ModelUpdate.FromString(update))


def perturb(src: Path, seed: int):  # noqa: ANN201
    def write(d: Path) -> None:  # as the trainer writes a version
        model = AutoModelForCausalLM.from_pretrained(src)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.01 * torch.randn_like(p))
        save_pretrained(model, AutoTokenizer.from_pretrained(src), d)

    return write


def read_time(path: Path) -> float:
    """Raw time to read a checkpoint from disk: every byte of its files into memory, nothing else.
    (from_pretrained is no measure of that: it maps safetensors lazily and reads almost nothing.)"""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


def noise_band(steady: list[tuple[float, float, int]], lengths: list[float], n: int = 300) -> list[float]:
    """p10, p50, p90 of the p99 of steady requests overlapping random windows of these lengths."""
    lo, hi, rng, p99s = min(s for s, _, _ in steady), max(e for _, e, _ in steady), random.Random(0), []
    for _ in range(n):
        ws = [(t, t + w) for w in lengths for t in [rng.uniform(lo, hi - w)]]
        p99s.append(pct([e - s for s, e, _ in steady if any(s < b and e > a for a, b in ws)], 0.99))
    return [pct(p99s, q) for q in (0.1, 0.5, 0.9)]


def ratio_interval(
    during: list[list[float]], steady: list[tuple[float, float, int]], n: int = 1000, slices: int = 20
) -> list[float]:
    """p5 and p95 of the p99 ratio (during swaps / steady) under a cluster bootstrap: the swap
    windows' answer sets, and the steady answers cut into `slices` slices of time, resampled with
    replacement. Answers of one window share its hiccups, so resampling single answers would
    understate how far another run of the same code can land."""
    lo, hi = min(s for s, _, _ in steady), max(s for s, _, _ in steady)
    cut: list[list[float]] = [[] for _ in range(slices)]
    for s, e, _ in steady:
        cut[min(slices - 1, int((s - lo) / (hi - lo) * slices))].append(e - s)
    rng, ratios = random.Random(1), []
    for _ in range(n):
        d = [x for w in rng.choices(during, k=len(during)) for x in w]
        st = [x for c in rng.choices(cut, k=slices) for x in c]
        ratios.append(pct(d, 0.99) / pct(st, 0.99))
    return [pct(ratios, 0.05), pct(ratios, 0.95)]


def histogram_means(url: str, *names: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of the service's own histograms `names`, read from its /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    vals = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(names))
    return {n: (float(vals[n + "_sum"]), float(vals[n + "_count"])) for n in names}


def by_phase(log: list[tuple[float, float, int]], swaps: list[dict], noops: list[tuple[float, float]]) -> dict:
    """Mean latency (ms) of the answers overlapping the swap windows, and of those overlapping the
    no-op windows, by phase: ended before the switch (the load), in flight at the switch (they
    drain on the old weights), started after it. A no-op window's "switch" is at its swap's offset."""
    out: dict[str, list[list[float]]] = {k: [[], []] for k in ("before_switch", "across_switch", "after_switch")}
    for x, (na, nb) in zip(swaps, noops, strict=False):
        a, b = x["window"]
        switch = x["switch"]
        for side, (wa, wb, sw) in enumerate(((a, b, switch), (na, nb, na + switch - a))):
            for s, e, _ in log:
                if s < wb and e > wa:
                    out["before_switch" if e <= sw else "across_switch" if s < sw else "after_switch"][side].append(
                        e - s
                    )
    return {k: [round(1000 * sum(v) / max(len(v), 1), 1) for v in sides] + [len(sides[0])] for k, sides in out.items()}


SERVICE_SWAP = ("flywheel_policy_swap_duration_seconds", "flywheel_policy_swap_lag_seconds")


async def run(addr: str, url: str, store: ModelStore, kafka: KafkaConfig, topic: str, args: argparse.Namespace) -> dict:
    prompts = [e.prompt for e in corpus.generate(64, seed=2)]
    log: list[tuple[float, float, int]] = []  # (start, end, version)
    failures: list[str] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)

        async def client(i: int) -> None:
            while not stop.is_set():
                p = prompts[i % len(prompts)]
                i += 1
                t0 = time.perf_counter()
                try:
                    req = policy_pb2.GenerateRequest(
                        prompt=p, params=common_pb2.SamplingParams(max_new_tokens=args.new_tokens)
                    )
                    r = await stub.Generate(req)
                    log.append((t0, time.perf_counter(), r.policy_version))
                except grpc.aio.AioRpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")

        # The trainer's side happens before the load starts and outside the clients' process in
        # production: publishing (perturb, save, sha256) and the raw read measurement would
        # otherwise hold this process's GIL and CPU while its clients are being timed.
        versions = []
        for k in range(1, 5 * args.rounds + 1):
            m = await asyncio.to_thread(store.publish, "policy", perturb(store.version_path("policy", 0), k), k - 1)
            versions.append((m, min([await asyncio.to_thread(read_time, m.path) for _ in range(3)])))
        loop = asyncio.get_running_loop()
        trainer = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _start_announcer, (kafka,))
        await loop.run_in_executor(trainer, _announce, topic, b"")  # started before the clients are timed
        tasks = [asyncio.create_task(client(i)) for i in range(args.clients)]
        await asyncio.sleep(args.steady_s)
        first_steady = list(log)
        before = histogram_means(url, *SERVICE_SWAP)
        swaps, noops = [], []
        for m, raw in versions:
            t_a, seen = time.perf_counter(), len(log)
            update = store.to_update(m, "gate").SerializeToString()
            await loop.run_in_executor(trainer, _announce, topic, update)
            while not any(v == m.version for _, _, v in log[-args.clients * 2 :]):
                await asyncio.sleep(0.005)
            first = min(e for s, e, v in log[seen:] if v == m.version)  # the tail: the loop is the clients' too
            swaps.append({"version": m.version, "swap_s": first - t_a, "read_s": raw, "window": (t_a, first)})
            await asyncio.sleep(args.gap_s)
            if args.noop:  # the same announcement for another model: delivered and parsed, then ignored
                update = store.to_update(m, "gate")
                update.model = "noop"
                t_n = time.perf_counter()
                await loop.run_in_executor(trainer, _announce, topic, update.SerializeToString())
                noops.append((t_n, t_n + (first - t_a)))
                await asyncio.sleep(max(0.0, t_n + (first - t_a) - time.perf_counter()) + args.gap_s)
        stop.set()
        t_end = time.perf_counter()
        await asyncio.gather(*tasks)
        after = histogram_means(url, *SERVICE_SWAP)
        trainer.shutdown()
    for x in swaps:  # when the first answer on the new weights began (known once every answer ended)
        x["switch"] = min(s for s, _, v in log if v == x["version"])

    def overlapping(windows: list[tuple[float, float]]) -> list[float]:
        return [e - s for s, e, _ in log if any(s < b and e > a for a, b in windows)]

    during = overlapping([x["window"] for x in swaps])
    noop = overlapping(noops)
    # Steady state across the run: the seconds before the first swap and those between swaps (from
    # `settle_s` after one swap's first new answer, when the old weights have drained, to the next
    # announcement), no-op windows left out. The host's speed drifts by 1.5x within one run.
    ends = [y["window"][0] for y in swaps[1:]] + [t_end]
    quiet = [(x["window"][1] + args.settle_s, end) for x, end in zip(swaps, ends, strict=True)]
    steady_log = first_steady + [
        (s, e, v)
        for s, e, v in log[len(first_steady) :]
        if any(a <= s and e <= b for a, b in quiet) and not any(s < b and e > a for a, b in noops)
    ]
    steady = [e - s for s, e, _ in steady_log]
    rounds = [overlapping([x["window"] for x in swaps[r : r + 5]]) for r in range(0, len(swaps), 5)]
    interval = ratio_interval([overlapping([x["window"]]) for x in swaps], steady_log)
    # The answers still decoding on the old weights once the new ones serve: every step then runs
    # one forward per version (finish_on_old), which is what a swap costs the answers in flight.
    draining = []
    for x in swaps:
        a, b = x["window"]
        draining += [e - s for s, e, v in log if s < b and e > x["switch"] and v != x["version"] and e > a]
    wrong = 0
    for s, _, v in log:  # an answer started after the swap to k was observed must not report < k
        done = [x["version"] for x in swaps if x["window"][1] < s]
        wrong += bool(done) and v < max(done)
    if args.trace:
        Path(args.trace).write_text(json.dumps({"log": log, "swaps": swaps, "noops": noops}))
    return {
        "steady": steady,
        "first_steady": [e - s for s, e, _ in first_steady],
        "draining": draining,
        "steady_band": noise_band(steady_log, [x["window"][1] - x["window"][0] for x in swaps]),
        "during": during,
        "noop": noop,
        "phases": by_phase(log, swaps, noops) if noops else {},
        "rounds": rounds,
        "interval": interval,
        "swaps": swaps,
        "service": {n: (after[n][0] - before[n][0]) / max(after[n][1] - before[n][1], 1) for n in SERVICE_SWAP},
        "failures": failures,
        "answers": len(log),
        "wrong": wrong,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steady-s", type=float, default=5.0)
    ap.add_argument("--gap-s", type=float, default=2.0)
    ap.add_argument(
        "--settle-s",
        type=float,
        default=0.5,
        help="answers from this long after a swap's first new answer (the old weights have drained) to the"
        " next announcement count as steady state",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="rounds of 5 announcements; the p99 during swaps pools them. The 8 answers in flight in a"
        " window share its decode steps, so the windows, not the answers, are the samples: with 6 rounds"
        " (30 windows) one slow window could lift a run past 1.3x",
    )
    ap.add_argument(
        "--drain",
        choices=("mixed", "separate"),
        default="mixed",
        help="answers in flight at a swap finish on the old weights in one forward with the new rows (mixed, the "
        "default) or in a forward of their own (separate): FLYWHEEL_POLICY_MIXED_DRAIN",
    )
    ap.add_argument(
        "--swap-worker",
        choices=("process", "threads"),
        default="process",
        help="consume, verify and read new versions in a process of their own (the default) or in threads of the"
        " service: FLYWHEEL_POLICY_SWAP_WORKER",
    )
    ap.add_argument(
        "--noop",
        action="store_true",
        help="after each swap, announce the same version for another model (delivered, parsed, ignored) and"
        " report the p99 of the answers overlapping a window as long as that swap's: what the announcing"
        " costs without the swap",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the service (0: torch default)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the service on the first half of the CPUs, this process, the broker and the announcer on the"
        " rest (as in production, where the trainer and the broker run elsewhere)",
    )
    ap.add_argument("--bootstrap", default=os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", ""))
    ap.add_argument("--out", default="")
    ap.add_argument("--trace", default="", help="write every request's (start, end, version) and the windows here")
    args = ap.parse_args()
    service_cpus = pin_service_cpus() if args.pin else None
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-swap-"))
    model = make_model(root / "model", args.hidden, args.layers)
    store = ModelStore(root / "store")
    store.publish("policy", lambda d: shutil.copytree(model, d, dirs_exist_ok=True), parent=None, version=0)
    with broker(args.bootstrap) as bootstrap:
        engine = {
            "device": args.device,
            "dtype": args.dtype,
            "max_concurrent": 32,
            "mixed_drain": args.drain == "mixed",
            "swap_worker": args.swap_worker == "process",
        }
        env = service_env(bootstrap, root, engine)
        env |= {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        with policy_process(env, root / "policy.log", cpus=service_cpus) as (addr, url):
            r = asyncio.run(
                run(addr, url, store, KafkaConfig(bootstrap=bootstrap), env["FLYWHEEL_TOPIC_POLICY_UPDATES"], args)
            )
    swaps = r["swaps"]
    steady_p99, during_p99 = pct(r["steady"], 0.99), pct(r["during"], 0.99)
    first_p99, noop_p99 = pct(r["first_steady"], 0.99), pct(r["noop"], 0.99)
    out = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "params": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters()),
        "clients": args.clients,
        "service_cpus": sorted(service_cpus) if service_cpus else "shared",
        "swap_worker": args.swap_worker,
        "answers": r["answers"],
        "failed_requests": len(r["failures"]),
        "stale_version_answers": r["wrong"],
        "swap_latency_s": [round(s["swap_s"], 3) for s in swaps],
        "checkpoint_read_s": [round(s["read_s"], 3) for s in swaps],
        "service_swap_s_mean": round(r["service"][SERVICE_SWAP[0]], 3),
        "service_announce_to_switch_s_mean": round(r["service"][SERVICE_SWAP[1]], 3),
        "worst_swap_vs_budget": round(max(s["swap_s"] / (1.5 * s["read_s"] + 0.5) for s in swaps), 2),
        "steady_p99_ms": round(steady_p99 * 1000, 1),
        "during_swaps_p99_ms": round(during_p99 * 1000, 1),
        "p99_ratio": round(during_p99 / steady_p99, 2),
        "p99_ratio_90pct_interval": [round(x, 2) for x in r["interval"]],
        "p99_ratio_per_round_of_5": [round(pct(d, 0.99) / steady_p99, 2) for d in r["rounds"]],
        "steady_p99_same_size_windows_ms_p10_p50_p90": [round(x * 1000, 1) for x in r["steady_band"]],
        "p99_ratio_to_same_size_p50": round(during_p99 / r["steady_band"][1], 2),
        "draining_answers": len(r["draining"]),
        "draining_p50_vs_steady_p50": round(pct(r["draining"], 0.5) / pct(r["steady"], 0.5), 2),
        "steady_answers": len(r["steady"]),
        "during_swaps_answers": len(r["during"]),
        "steady_p99_first_steady_s_ms": round(first_p99 * 1000, 1),
        "p99_ratio_to_first_steady_s": round(during_p99 / first_p99, 2),
        **(
            {
                "noop_announcements_p99_ms": round(noop_p99 * 1000, 1),
                "noop_p99_ratio": round(noop_p99 / steady_p99, 2),
                "noop_p99_ratio_to_first_steady_s": round(noop_p99 / first_p99, 2),
                "p99_ratio_to_noop_announcements": round(during_p99 / noop_p99, 2),
                "mean_ms_swap_vs_noop_by_phase_and_n": r["phases"],
                "mean_ratio_to_noop_announcements": round(
                    sum(r["during"]) / len(r["during"]) / (sum(r["noop"]) / len(r["noop"])), 3
                ),
            }
            if r["noop"]
            else {}
        ),
        "first_failures": r["failures"][:3],
    }
    report(out, args.out, root)


if __name__ == "__main__":
    main()
