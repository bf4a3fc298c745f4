"""Samples per second (rollout + update) of Flywheel's PPO / GRPO / RLOO against TRL's GRPOTrainer and RLOOTrainer.

Same tiny config-built Llama, same prompts, batch size, group size, generation length,
temperature, learning rate, one optimizer step per rollout, KL to a frozen reference, and
the same synthetic reward, all in this one process on this machine. Prints each system's
samples/s, the ratio to TRL, and our time per phase (generate, score, update).

    .venv/bin/python bench/ppo_vs_trl.py [--steps 6] [--batch 8] [--group 4] [--tokens 32]

Needs `trl` (1.x, installed next to transformers 4.57.6); without it only our figures print.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flywheel.core.modelstore import ModelStore
from flywheel.testing import tiny_policy
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts

TARGET = "help"


def reward_of(text: str) -> float:
    words = text.split()
    return sum(w == TARGET for w in words) / max(1, len(words))


class Reward:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [reward_of(r) for r in responses]


def ours(model_dir: Path, algo: str, a: argparse.Namespace, epochs: int) -> dict[str, float]:
    cfg = TrainerConfig(
        init_path=str(model_dir),
        algo=algo,
        batch_size=a.batch,
        group_size=a.group,
        epochs=epochs,
        max_new_tokens=a.tokens,
        temperature=a.temperature,
        lr=a.lr,
        prompt_source="pool",
        missing_eos_penalty=None,
        reward_norm="none",
        grpo_beta=a.beta,
        kl_coef=a.beta,
        whiten_advantages=algo == "ppo",
    )
    with tempfile.TemporaryDirectory() as d:
        t = build_trainer(cfg, ModelStore(d), Reward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS)
        t.setup()
        t.train_step()  # warm-up, not timed
        steps = [t.train_step() for _ in range(a.steps)]
    total = sum(m["time_generate"] + m["time_score"] + m["time_update"] for m in steps)
    return {
        "samples_per_s": a.batch * a.group * a.steps / total,
        "generate_s": statistics.mean(m["time_generate"] for m in steps),
        "score_s": statistics.mean(m["time_score"] for m in steps),
        "update_s": statistics.mean(m["time_update"] for m in steps),
        "reward_last": steps[-1]["reward_mean"],
        "mean_tokens": statistics.mean(m["response_tokens"] for m in steps),
    }


def trl_run(model_dir: Path, kind: str, a: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.times.append(time.perf_counter() - self._t)

    def reward_fn(completions: list[str], **kw: object) -> list[float]:
        return [reward_of(c) for c in completions]

    n = a.batch * a.group
    prompts = [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(a.batch * (a.steps + 1))]
    common = dict(
        per_device_train_batch_size=n,  # completions per step = batch prompts x group
        num_generations=a.group,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=a.tokens,
        temperature=a.temperature,
        top_k=0,
        top_p=1.0,
        learning_rate=a.lr,
        adam_epsilon=1e-5,
        beta=a.beta,
        max_steps=a.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        shuffle_dataset=False,
    )
    with tempfile.TemporaryDirectory() as out:
        if kind == "grpo":
            args, cls = GRPOConfig(output_dir=out, **common), GRPOTrainer
        else:
            args, cls = RLOOConfig(output_dir=out, **common), RLOOTrainer
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        timer = Timer()
        trainer = cls(
            model=model,
            reward_funcs=reward_fn,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            callbacks=[timer],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints its own summary dict
            trainer.train()
    times = timer.times[1:]  # first step is warm-up
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"samples_per_s": n * len(times) / sum(times), "step_s": statistics.mean(times), "mean_tokens": lengths[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per system (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per sample")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (GRPO/RLOO loss or PPO reward); both sides")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all systems; each system's best round counts")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.disable(logging.WARNING)
    model_dir = tiny_policy(Path(tempfile.mkdtemp()) / "model", seed=0, hidden=a.hidden, layers=a.layers)
    res: dict[str, dict[str, float]] = {}
    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
        print("trl is not installed: only Flywheel's figures follow", file=sys.stderr)
    # Interleave the systems so that a noisy neighbour on the CPUs hurts each alike.
    runs = [("flywheel_grpo", lambda: ours(model_dir, "grpo", a, 1))]
    runs += [("trl_grpo", lambda: trl_run(model_dir, "grpo", a))] if have_trl else []
    runs += [("flywheel_rloo", lambda: ours(model_dir, "rloo", a, 1))]
    runs += [("trl_rloo", lambda: trl_run(model_dir, "rloo", a))] if have_trl else []
    runs += [("flywheel_ppo_1epoch", lambda: ours(model_dir, "ppo", a, 1))]
    runs += [("flywheel_ppo_4epochs", lambda: ours(model_dir, "ppo", a, 4))]
    for rnd in range(a.rounds):
        for name, fn in runs:
            r = fn()
            print(
                f"round {rnd + 1} {name:22s} {r['samples_per_s']:8.1f} samples/s, {r['mean_tokens']:.1f} tokens",
                flush=True,
            )
            if name not in res or r["samples_per_s"] > res[name]["samples_per_s"]:
                res[name] = r
    print(
        f"\nsetup: {a.batch} prompts x {a.group} samples, {a.tokens} tokens, hidden {a.hidden}, {a.layers} layers, "
        f"{a.threads} threads, {a.steps} timed steps, best of {a.rounds} rounds, torch {torch.__version__}"
    )
    print(
        f"{'system':22s} {'samples/s':>10s} {'vs TRL GRPO':>12s} {'tokens':>7s} {'generate s':>11s} {'score s':>8s} {'update s':>9s}"
    )
    base = res.get("trl_grpo", {}).get("samples_per_s")
    for name, r in res.items():
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        phases = (
            f"{r['generate_s']:11.3f} {r['score_s']:8.4f} {r['update_s']:9.3f}"
            if "generate_s" in r
            else f"{'(step ' + format(r['step_s'], '.3f') + ' s)':>30s}"
        )
        print(f"{name:22s} {r['samples_per_s']:10.1f} {ratio:>12s} {r['mean_tokens']:7.1f} {phases}")
    if "trl_rloo" in res:
        print(
            f"\nFlywheel RLOO vs TRL RLOO: {res['flywheel_rloo']['samples_per_s'] / res['trl_rloo']['samples_per_s']:.2f}x"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
