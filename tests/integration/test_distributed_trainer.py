"""The data-parallel trainer (flywheel/trainer/distributed.py) under the real torchrun with gloo: PPO, RLOO
and GRPO on 2 ranks end their steps with the weights they end with on 1 rank (same global batch and seed),
and only rank 0 writes to the model store. A rank SIGKILLed mid-run (rank 0 or another): torchrun's agent
restarts the group, every rank resumes from the last checkpoint, and the run ends where an uninterrupted
one does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flywheel.core.modelstore import ModelStore
from flywheel.testing import tiny_policy

pytestmark = pytest.mark.timeout(300)
ALGOS = ("ppo", "rloo", "grpo")
STEPS = 3

DRIVER = textwrap.dedent(
    """
    import json, sys, threading
    import torch
    from flywheel.core.modelstore import ModelStore
    from flywheel.trainer.config import TrainerConfig
    from flywheel.trainer.distributed import group_for
    from flywheel.trainer.loop import build_trainer
    from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
    init, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    algos = sys.argv[4].split(",")
    kill_rank, kill_after = (int(x) for x in sys.argv[5].split(":")) if len(sys.argv) > 5 else (-1, 0)

    class Reward:  # a deterministic reward: the share of "help" among the answer's words
        def score(self, prompts, responses):
            return [sum(w == "help" for w in r.split()) / max(1, len(r.split())) for r in responses]

    group = group_for("cpu")
    for algo in algos:
        cfg = TrainerConfig(
            init_path=init, algo=algo, group_size=1 if algo == "ppo" else 2, batch_size=4, max_new_tokens=8,
            lr=1e-3, epochs=2, prompt_source="pool", missing_eos_penalty=None, reward_norm="running",
            torch_threads=1, gate_prompts=2, checkpoint_every=2, max_steps=steps, auto_promote=False, seed=3,
        )
        store = ModelStore(f"{out}/{algo}/store")
        t = build_trainer(cfg, store, Reward(), PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS[:2], group=group)
        if group.rank == kill_rank:  # SIGKILL this rank once, after step `kill_after` (not checkpointed)
            import os, pathlib, signal
            step, marker = t.train_step, pathlib.Path(out) / "killed"

            def step_then_die(*args):
                m = step(*args)
                if t.step == kill_after and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                return m

            t.train_step = step_then_die
        if group.main:
            t.run(threading.Event())
            trained = {n: p.detach() for n, p in t.state.policy.named_parameters()}
            trained |= {"value_head." + n: p.detach() for n, p in t.state.value_head.named_parameters()}
            torch.save(trained, f"{out}/{algo}/weights.pt")
            with open(f"{out}/{algo}/metrics.json", "w") as f:
                json.dump(t.metrics, f)
        else:
            t.follow()
    """
)


def torchrun(
    tmp: Path, init: Path, ranks: int, algos: tuple[str, ...] = ALGOS, kill: str = "", steps: int = STEPS
) -> Path:
    out = tmp / f"ranks-{ranks}{'-kill-' + kill.replace(':', '-') if kill else ''}"
    out.mkdir()
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["--max-restarts=1"] if kill else []
    cmd += [str(script), str(init), str(out), str(steps), ",".join(algos)] + ([kill] if kill else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_ranks_train_as_one_and_only_rank_0_writes(tmp_path: Path) -> None:
    init = tiny_policy(tmp_path / "init", seed=0)
    one, two = torchrun(tmp_path, init, 1), torchrun(tmp_path, init, 2)
    for algo in ALGOS:
        a, b = torch.load(one / algo / "weights.pt"), torch.load(two / algo / "weights.pt")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=f"{algo}: {name}")
        # Rank 0 alone checkpointed (at step 2): the same versions, one trainer state, on both.
        versions = [[m.version for m in ModelStore(d / algo / "store").list_versions("policy")] for d in (one, two)]
        assert versions[0] == versions[1] == [0, 1], versions
    # The weights moved: the comparison is not of two untouched starters.
    starter = dict(tiny_policy_weights(init))
    moved = torch.load(one / "rloo" / "weights.pt")
    assert any(not torch.equal(moved[n], starter[n]) for n in starter)


def tiny_policy_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


def test_a_rank_killed_mid_run_resumes_with_the_whole_group(tmp_path: Path) -> None:
    """Step 3 done, not checkpointed (every 2 steps): SIGKILL of rank 0, then in another run of rank 1. The
    group restarts once, resumes from step 2's checkpoint (weights, optimizer, KL controller, moments, prompt
    position, RNG) and ends at step 4 with the uninterrupted run's weights."""
    init = tiny_policy(tmp_path / "init", seed=0)
    ref = torchrun(tmp_path, init, 2, ("rloo",), steps=4)
    want = torch.load(ref / "rloo" / "weights.pt")
    for victim in (0, 1):
        hit = torchrun(tmp_path, init, 2, ("rloo",), kill=f"{victim}:3", steps=4)
        assert (hit / "killed").exists(), f"rank {victim} did not die"
        got = torch.load(hit / "rloo" / "weights.pt")
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=f"rank {victim}: {name}")
        versions = [[m.version for m in ModelStore(d / "rloo" / "store").list_versions("policy")] for d in (ref, hit)]
        assert versions[0] == versions[1] == [0, 1, 2], versions
