"""Data-parallel trainer scaling: samples per second on 2 ranks against 1 rank, in one run (torchrun, gloo here).

Each run is `torchrun --standalone --nproc-per-node N` of this file's worker: the real Trainer
(`build_trainer` with `distributed.group_for`) on a random-init Llama (--hidden/--layers) with the starter's
tokenizer, RLOO with the shipped batch shape (--batch prompts x --group samples, --tokens new tokens) and a
local deterministic reward (no reward service: the trainer's own scaling is measured), one torch thread per
rank. It runs --warmup steps, then --steps measured steps; the figure is the median over those steps of the
global batch's samples / step seconds, and where a step's time goes (rollout, scoring, update: the
update includes DDP's gradient all-reduce, which overlaps the backward pass). Target here: >= 1.5x.

    flywheel bench trainer_scaling                     # 2 vs 1 rank on this machine's CPUs
    .venv/bin/python bench/trainer_scaling.py --ranks 4 --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def make_model(out: Path, hidden: int, layers: int) -> int:
    """A random-init Llama with the starter's tokenizer, saved to `out`; its parameter count."""
    from transformers import LlamaForCausalLM

    from flywheel.policy import corpus
    from flywheel.policy.starter import build_tokenizer, model_config

    tok = build_tokenizer([f"{e.prompt} {e.answer}" for e in corpus.generate(2000, 0)])
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(tok, hidden, layers))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


class LengthReward:
    """A deterministic stand-in for the reward service: longer answers up to 12 words score higher."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [min(len(r.split()), 12) / 12 for r in responses]


def worker(init: str, out: str, args: argparse.Namespace) -> None:
    """One rank: train warmup + steps, rank 0 writes each step's metrics."""
    from flywheel.core.modelstore import ModelStore
    from flywheel.trainer.config import TrainerConfig
    from flywheel.trainer.distributed import group_for
    from flywheel.trainer.loop import build_trainer
    from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts

    group = group_for("cpu")
    cfg = TrainerConfig(
        init_path=init,
        algo="rloo",
        batch_size=args.batch,
        group_size=args.group,
        max_new_tokens=args.tokens,
        prompt_source="pool",
        torch_threads=1,
        gate_prompts=2,
        checkpoint_every=10_000,
        max_steps=args.warmup + args.steps,
        auto_promote=False,
    )
    store = ModelStore(Path(out) / "store")
    t = build_trainer(cfg, store, LengthReward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS[:2], group=group)
    if not group.main:
        t.follow()
        return
    steps: list[dict[str, float]] = []
    train_step = t.train_step

    def measured(prompts: list[str] | None = None) -> dict[str, float]:
        m = train_step(prompts)
        steps.append(m)
        return m

    t.train_step = measured  # type: ignore[method-assign]
    t.run(threading.Event())
    (Path(out) / "steps.json").write_text(json.dumps(steps[args.warmup :]))


def run(ranks: int, init: Path, root: Path, args: argparse.Namespace) -> dict:
    out = root / f"ranks-{ranks}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__]
    cmd += ["--worker", str(init), str(out)] + [f"--{k}={getattr(args, k)}" for k in KNOBS]
    t0 = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    wall = time.perf_counter() - t0
    steps = json.loads((out / "steps.json").read_text())
    phases = {p: statistics.median(s[f"time_{p}"] for s in steps) for p in ("generate", "score", "update")}
    return {
        "ranks": ranks,
        "samples_per_second": statistics.median(s["samples_per_second"] for s in steps),
        "median_phase_s": phases,
        "wall_s": wall,
    }


KNOBS = ("batch", "group", "tokens", "warmup", "steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run (against 1)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (trainer.batch_size)")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (trainer.group_size)")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per sample")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="", help="write the result as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("INIT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args)
        return
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-scaling-"))
    try:
        params = make_model(root / "init", args.hidden, args.layers)
        print(
            f"model: {params / 1e6:.1f}M parameters; {args.batch} prompts x {args.group} samples x {args.tokens} tokens"
        )
        runs = [run(n, root / "init", root, args) for n in (1, args.ranks)]
        for r in runs:
            ph = r["median_phase_s"]
            print(
                f"{r['ranks']} rank(s): {r['samples_per_second']:.2f} samples/s; a step's median seconds: rollout "
                f"{ph['generate']:.2f}, scoring {ph['score']:.3f}, update (backward + all-reduce) {ph['update']:.2f}",
                flush=True,
            )
        ratio = runs[1]["samples_per_second"] / runs[0]["samples_per_second"]
        print(f"{args.ranks} ranks / 1 rank: {ratio:.2f}x samples per second (target here >= 1.5x)")
        result = {
            "device": "cpu",
            "backend": "gloo",
            "params": params,
            "shape": {"hidden": args.hidden, "layers": args.layers},
            "batch": {k: getattr(args, k) for k in KNOBS},
            "runs": runs,
            "speedup": round(ratio, 3),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
