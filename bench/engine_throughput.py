"""Generated tokens/s of the continuous-batching engine against transformers `generate`.

Same model, same prompts, same number of new tokens per request (the engine with ignore_eos,
`generate` with min_new_tokens), greedy, all measured in one run:
  1. `model.generate` one prompt at a time (what a naive server does),
  2. `model.generate` on all prompts as one static left-padded batch,
  3. the engine with every request submitted concurrently.

    .venv/bin/python bench/engine_throughput.py                      # the starter architecture
    .venv/bin/python bench/engine_throughput.py --hidden 256 --layers 4  # a bigger random model
    .venv/bin/python bench/engine_throughput.py --model PATH --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from flywheel.policy import corpus
from flywheel.policy.config import EngineConfig
from flywheel.policy.engine import Engine, GenerationRequest
from flywheel.policy.kvbatch import resolve_device, resolve_dtype
from flywheel.policy.starter import build_tokenizer, model_config


def make_model(out: Path, hidden: int, layers: int) -> str:
    """A random-init model of the starter's architecture (throughput does not depend on training)."""
    tok = build_tokenizer([f"{e.prompt} {e.answer}" for e in corpus.generate(2000, 0)])
    torch.manual_seed(0)
    LlamaForCausalLM(model_config(tok, hidden, layers)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_hf(path: str, prompts: list[str], new: int, device: torch.device, dtype: torch.dtype) -> dict:
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)

    def gen(batch: list[str]) -> int:
        enc = tok(batch, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
        return (out.shape[1] - enc.input_ids.shape[1]) * len(batch)

    gen(prompts[:1])  # warm-up
    t0 = time.perf_counter()
    tokens = sum(gen([p]) for p in prompts)
    sequential = tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    tokens = gen(prompts)
    static = tokens / (time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "sequential_tok_s": sequential, "static_batch_tok_s": static}


def bench_engine(path: str, prompts: list[str], new: int, cfg: EngineConfig) -> dict:
    engine = Engine(cfg)
    engine.start()
    engine.load_version(path, 0)

    async def run() -> tuple[float, list]:
        def req(p: str) -> GenerationRequest:
            return GenerationRequest(prompt=p, temperature=0.0, max_new_tokens=new, ignore_eos=True)

        await engine.generate(req(prompts[0]))  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*[engine.generate(req(p)) for p in prompts])
        return time.perf_counter() - t0, results

    try:
        elapsed, results = asyncio.run(run())
    finally:
        engine.stop()
    tokens = sum(r.generated_tokens for r in results)
    ttft = [r.time_to_first_token_s for r in results]
    itl = [(r.total_time_s - r.time_to_first_token_s) / max(1, r.generated_tokens - 1) for r in results]
    return {
        "engine_tok_s": tokens / elapsed,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_mean_p50_s": statistics.median(itl),
        "itl_mean_p99_s": pct(itl, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="from_pretrained path; empty: a random model of the starter's shape")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the random model")
    ap.add_argument("--layers", type=int, default=2, help="layers of the random model")
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_model(Path(tmp), args.hidden, args.layers)
        all_prompts = corpus.prompts()
        prompts = [all_prompts[i % len(all_prompts)] for i in range(args.requests)]
        cfg = EngineConfig(
            device=args.device,
            dtype=args.dtype,
            max_concurrent_sequences=max(args.requests, 1),
            max_tokens_per_step=4096,
        )
        device = resolve_device(args.device)
        hf = bench_hf(path, prompts, args.new_tokens, device, resolve_dtype(args.dtype, device))
        eng = bench_engine(path, prompts, args.new_tokens, cfg)
    figures = {
        "model": args.model or f"random starter-shaped Llama (hidden {args.hidden}, {args.layers} layers)",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        **hf,
        **eng,
        "ratio_vs_sequential": eng["engine_tok_s"] / hf["sequential_tok_s"],
        "ratio_vs_static_batch": eng["engine_tok_s"] / hf["static_batch_tok_s"],
    }
    for k, v in figures.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
