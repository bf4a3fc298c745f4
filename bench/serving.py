"""Aggregate generated tokens/s of the policy service (32 concurrent streaming gRPC clients) against
transformers `generate` on the same model, prompts and token counts, in one run:
  1. `model.generate` one prompt at a time, 2. `model.generate` on all prompts as one static batch,
  3. `flywheel serve policy` as its own process, every client streaming over gRPC at once.
Also p50/p99 time to first token and inter-token latency as the clients see them. Each of the
three is measured --repeat times, interleaved with nothing else, and the medians are compared.

Baselines, all on this machine in this run: `generate` greedy with min_new_tokens = max_new_tokens
= --new-tokens, on the same saved model (same dtype, device) and the same --clients prompts;
torch gets --threads intra-op threads in the benchmark process (HF) and in the service process
(OMP_NUM_THREADS, as `flywheel up` sets it), so neither side is given more cores than the other.

The model is a random-init Llama of the starter's architecture whose EOS is <unk> with a zero
embedding, so greedy decoding never stops early: every request makes exactly --new-tokens
(`generate` gets min_new_tokens too). Kafka: --bootstrap, else the embedded Tansu broker.

    .venv/bin/python bench/serving.py                          # CPU, hidden 64, 2 layers
    .venv/bin/python bench/serving.py --pin                    # the service on its own core(s)
    .venv/bin/python bench/serving.py --hidden 256 --layers 4
    .venv/bin/python bench/serving.py --hidden 1280 --layers 24 --device cuda --dtype bfloat16  # ~0.5B on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from flywheel.policy import corpus
from flywheel.policy.kvbatch import resolve_device, resolve_dtype
from flywheel.policy.starter import build_tokenizer, model_config
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc


def make_model(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """Random-init model of the starter's shape that never emits its EOS under greedy decoding."""
    tok = build_tokenizer([f"{e.prompt} {e.answer}" for e in corpus.generate(2000, 0)])
    tok.eos_token = "<unk>"
    torch.manual_seed(seed)
    cfg = model_config(tok, hidden, layers)
    cfg.eos_token_id = tok.unk_token_id
    if hidden >= 512:  # heads of 64, as in most models of this width (head_dim is derived at init)
        cfg.num_attention_heads = cfg.num_key_value_heads = hidden // 64
        cfg.head_dim = 64
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.unk_token_id].zero_()
    model.generation_config.eos_token_id = tok.unk_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def broker(bootstrap: str):
    if bootstrap:
        yield bootstrap
        return
    from flywheel.core.brokers import EmbeddedTansu

    b = EmbeddedTansu(log_path=os.path.join(tempfile.gettempdir(), "flywheel-bench-tansu.log"))
    try:
        yield b.start()
    finally:
        b.stop()


@contextmanager
def policy_process(env: dict[str, str], log: Path, timeout_s: float = 180.0, cpus: set[int] | None = None):
    """`python -m flywheel.policy` on free ports; yields (grpc address, http url) once /health is 200.
    `cpus`: the only CPUs it may run on (as a pod's own cores, away from the load generator's)."""
    gport, hport = free_port(), free_port()
    cmd = [sys.executable, "-m", "flywheel.policy", "--grpc-port", str(gport), "--http-port", str(hport)]
    with open(log, "w") as f:
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, preexec_fn=pin)
    url = f"http://127.0.0.1:{hport}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the policy process exited ({proc.returncode}); see {log}")
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the policy process did not become healthy; see {log}")
            time.sleep(0.2)
        yield f"127.0.0.1:{gport}", url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def pin_service_cpus() -> set[int]:
    """The first half of this process's CPUs for the service; this process (clients, baselines) and
    what it starts later (broker, announcer) keep the rest, as a pod has its own cores in production."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    service = set(cpus[: len(cpus) // 2])
    os.sched_setaffinity(0, set(cpus) - service)
    return service


def service_env(bootstrap: str, root: Path, engine: dict[str, object]) -> dict[str, str]:
    prefix = f"bench{int(time.time() * 1000)}."
    env = {
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_MODEL_STORE": str(root / "store"),
        "FLYWHEEL_POLICY_STATE_DIR": str(root / "state"),
        "FLYWHEEL_HMAC_KEY": "bench-key-0123456789abcdef",
        "FLYWHEEL_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    }
    for t in ("interactions", "feedback", "preferences", "dlq"):
        env[f"FLYWHEEL_TOPIC_{t.upper()}"] = prefix + t
    env["FLYWHEEL_TOPIC_POLICY_UPDATES"] = prefix + "policy.updates"
    env["FLYWHEEL_TOPIC_REWARD_UPDATES"] = prefix + "reward.updates"
    return env | {f"FLYWHEEL_POLICY_{k.upper()}": str(v) for k, v in engine.items()}


def report(out: dict, path: str, root: Path) -> None:
    """Print a benchmark's result, write it to `path` if given, and delete its scratch folder
    `root` (kept when the run fails before this, with the service's log where there is one)."""
    print(json.dumps(out, indent=2))
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
    shutil.rmtree(root, ignore_errors=True)


def bench_hf(
    path: Path, prompts: list[str], new: int, device: torch.device, dtype: torch.dtype, repeat: int = 1
) -> dict:
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)

    def gen(batch: list[str]) -> int:
        enc = tok(batch, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
        return (out.shape[1] - enc.input_ids.shape[1]) * len(batch)

    def rate(fn: Callable[[], int]) -> float:
        t0 = time.perf_counter()
        return fn() / (time.perf_counter() - t0)

    gen(prompts[:1])
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "sequential_tok_s": [rate(lambda: sum(gen([p]) for p in prompts)) for _ in range(repeat)],
        "static_batch_tok_s": [rate(lambda: gen(prompts)) for _ in range(repeat)],
    }


async def stream_clients(addr: str, prompts: list[str], new: int, repeat: int = 1) -> dict:
    """Every prompt streamed by its own concurrent client, `repeat` waves one after the other:
    tokens/s of each wave, TTFT and ITL pooled over the waves."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)

        def req(p: str) -> policy_pb2.GenerateRequest:
            return policy_pb2.GenerateRequest(prompt=p, params=common_pb2.SamplingParams(max_new_tokens=new))

        await stub.Generate(req(prompts[0]))  # warm-up

        async def one(p: str) -> tuple[int, float, list[float]]:
            t0 = time.perf_counter()
            last, ttft, gaps, n = t0, 0.0, [], 0
            async for chunk in stub.GenerateStream(req(p)):
                now = time.perf_counter()
                if n == 0:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last, n = now, n + 1
                if chunk.HasField("final"):
                    n = chunk.final.generated_tokens
            return n, ttft, gaps

        rates, results = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            wave = await asyncio.gather(*(one(p) for p in prompts))
            rates.append(sum(r[0] for r in wave) / (time.perf_counter() - t0))
            results += wave
    ttfts, gaps = [r[1] for r in results], [g for r in results for g in r[2]]
    return {
        "tokens": sum(r[0] for r in results),
        "tok_s": rates,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p99_s": pct(ttfts, 0.99),
        "itl_p50_s": pct(gaps, 0.5),
        "itl_p99_s": pct(gaps, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for HF and the service (0: torch default)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="measure each of the three this many times and compare medians (one wave of 32 x 64 tokens took"
        " 0.3 s on 2 CPU cores, and single runs gave 3.9-6.6x)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the service on the first half of the CPUs; the clients, the HF baselines and the broker on the rest"
        " (sharing 2 cores, the service ran at 8k or 11.5k tokens/s from one run to the next)",
    )
    ap.add_argument("--bootstrap", default=os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", ""))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    service_cpus = pin_service_cpus() if args.pin else None
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-serving-"))
    path = make_model(root / "model", args.hidden, args.layers)
    prompts = [e.prompt for e in corpus.generate(args.clients, seed=1)]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    hf = bench_hf(path, prompts, args.new_tokens, device, dtype, args.repeat)
    engine = {"model": path, "device": args.device, "dtype": args.dtype, "max_concurrent": args.clients}
    engine |= {"max_new_tokens_cap": max(args.new_tokens, 64)}
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    with (
        broker(args.bootstrap) as bootstrap,
        policy_process(service_env(bootstrap, root, engine) | threads, root / "policy.log", cpus=service_cpus) as (
            addr,
            _,
        ),
    ):
        svc = asyncio.run(stream_clients(addr, prompts, args.new_tokens, args.repeat))
    seq, static, served = (
        statistics.median(x) for x in (hf["sequential_tok_s"], hf["static_batch_tok_s"], svc["tok_s"])
    )
    out = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "params": hf["params"],
        "clients": args.clients,
        "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
        "service_cpus": sorted(service_cpus) if service_cpus else "shared",
        "baselines": "HF generate greedy, same model/prompts/token counts, this run: one prompt at a time; "
        f"one static left-padded batch of {args.clients}",
        "repeat": args.repeat,
        "hf_sequential_tok_s": round(seq, 1),
        "hf_static_batch_tok_s": round(static, 1),
        "service_tok_s": round(served, 1),
        "service_vs_sequential": round(served / seq, 2),
        "service_vs_static_batch": round(served / static, 2),
        "each_run_tok_s": {
            k: [round(x) for x in v]
            for k, v in (
                ("hf_sequential", hf["sequential_tok_s"]),
                ("hf_static_batch", hf["static_batch_tok_s"]),
                ("service", svc["tok_s"]),
            )
        },
        "ttft_p50_ms": round(svc["ttft_p50_s"] * 1000, 1),
        "ttft_p99_ms": round(svc["ttft_p99_s"] * 1000, 1),
        "itl_p50_ms": round(svc["itl_p50_s"] * 1000, 2),
        "itl_p99_ms": round(svc["itl_p99_s"] * 1000, 2),
        "all_tokens_generated": svc["tokens"] == args.repeat * args.clients * args.new_tokens,
    }
    report(out, args.out, root)


if __name__ == "__main__":
    main()
