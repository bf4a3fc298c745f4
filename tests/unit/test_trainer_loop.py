"""The training loop on a tiny config-built policy and a synthetic reward: learning, the gate, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.testing import tiny_policy, wait_for
from flywheel.trainer import gate, state
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import Trainer, build_trainer
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts, PromptSource

pytestmark = pytest.mark.timeout(120)
TARGET = "help"


class TargetReward:
    """Synthetic reward: the fraction of response words that are the target word."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.calls += 1
        return [sum(w == TARGET for w in r.split()) / max(1, len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "init", seed=0)


def make(
    tmp_path: Path, init_path: Path, announced: list | None = None, prompts: PromptSource | None = None, **kw
) -> Trainer:
    torch.set_num_threads(1)
    opts = dict(  # the mechanics of PPO on a tiny model and a synthetic reward (not the shipped defaults)
        init_path=str(init_path),
        algo="ppo",
        group_size=1,
        adaptive_kl=False,
        temperature=0.7,
        gate_kl_budget=12.0,
        gate_patience=0,
        batch_size=8,
        max_new_tokens=10,
        lr=2e-3,
        prompt_source="pool",
        missing_eos_penalty=None,
        reward_norm="running",
        gate_prompts=8,
        checkpoint_every=1000,
    )
    opts.update(kw)
    cfg = TrainerConfig(**opts)
    sink = announced.append if announced is not None else None
    source = prompts if prompts is not None else PoolPrompts(FALLBACK_PROMPTS)
    t = build_trainer(cfg, ModelStore(tmp_path / "store"), TargetReward(), source, FALLBACK_PROMPTS, announce=sink)
    t.setup()
    return t


def test_sampler_matches_hf_generate_and_forward_matches_hf_masking(init_path: Path) -> None:
    """Our KV-cache sampler draws exactly what transformers' generate() draws with the same seed,
    and forward()'s ready-made 4D mask gives the log-probs of HF's own left-padding path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.trainer.rollout import forward, generate

    model, tok = AutoModelForCausalLM.from_pretrained(init_path), AutoTokenizer.from_pretrained(init_path)
    prompts = [FALLBACK_PROMPTS[i % 8] for i in range(12)]  # prompts of different lengths: left padding
    torch.manual_seed(3)
    ours = generate(model, tok, prompts, 12, 0.7, 96)
    torch.manual_seed(3)
    theirs = generate(model, tok, prompts, 12, 0.7, 96, use_hf_generate=True)
    assert torch.equal(ours.response_ids, theirs.response_ids) and ours.responses == theirs.responses
    assert ours.response_mask.sum() > 12  # not all empty
    lp, _, _ = forward(model, ours, 0.7)
    ids = torch.cat([ours.query_ids, ours.response_ids], 1)
    attn = torch.cat([ours.query_mask, ours.response_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    P = ours.query_ids.shape[1]
    want = torch.log_softmax(logits[:, P - 1 : -1].float() / 0.7, -1).gather(2, ours.response_ids[..., None])[..., 0]
    assert torch.allclose(lp * ours.response_mask, want * ours.response_mask, atol=1e-5)


def test_reward_rises_while_kl_stays_in_budget(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path, init_path, kl_coef=0.2)
    hist = [t.train_step() for _ in range(14)]
    rewards, kls = [m["reward_mean"] for m in hist], [m["kl"] for m in hist]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, f"reward did not rise: {rewards}"
    assert max(kls) < 6.0, f"KL left its budget: {kls}"
    for key in ("entropy", "clip_frac", "approx_kl", "value_loss", "samples_per_second", "time_generate"):
        assert key in hist[-1]


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_critic_free_algorithms_learn(tmp_path: Path, init_path: Path, algo: str) -> None:
    # grpo with 1 epoch takes the single-pass path (old log-probs = the update's own, detached)
    t = make(tmp_path, init_path, algo=algo, batch_size=4, group_size=4, epochs=2 if algo == "rloo" else 1, lr=3e-3)
    before = [p.detach().clone() for p in t.state.policy.parameters()]
    hist = [t.train_step() for _ in range(10)]
    assert any(not torch.equal(a, b) for a, b in zip(before, t.state.policy.parameters(), strict=True))
    rewards = [m["reward_mean"] for m in hist]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    assert "value_loss" not in hist[-1]  # no critic


def test_ppo_ptx_learns_users_demonstrations(tmp_path: Path, init_path: Path) -> None:
    from flywheel.trainer.loop import sft_loss

    demo = [("where is my order?", "your order is here today thanks")]

    class DemoPool(PoolPrompts):
        def demonstrations(self) -> list[tuple[str, str]]:
            return demo

    def run(ptx: float) -> float:
        t = make(tmp_path / str(ptx), init_path, prompts=DemoPool(FALLBACK_PROMPTS), ptx_coef=ptx, epochs=1)
        torch.manual_seed(0)
        for _ in range(5):
            t.train_step()
        with torch.no_grad():
            return float(sft_loss(t.state.policy, t.state.tokenizer, demo, t.device))

    assert run(1.0) < run(0.0) - 0.5  # the supervised term pulls the policy toward the demonstration


def _degenerate(t: Trainer, token: str = TARGET, steps: int = 40) -> None:
    """Fine-tune the in-memory policy to answer every prompt with one token repeated (reward hacking)."""
    policy, tok = t.state.policy, t.state.tokenizer
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    tid = tok.convert_tokens_to_ids(token)
    ids = torch.cat([tok(FALLBACK_PROMPTS[0], return_tensors="pt")["input_ids"], torch.full((1, 12), tid)], 1)
    for _ in range(steps):
        loss = policy(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_gate_refuses_a_degenerate_checkpoint(tmp_path: Path, init_path: Path) -> None:
    announced: list = []
    t = make(tmp_path, init_path, announced, gate_kl_budget=1e9)
    _degenerate(t)
    st = t.state
    report = gate.evaluate(st.policy, st.reference, st.tokenizer, t.promoter.gate_prompts, t.reward, t.cfg)
    assert report.repeat > 0.8 and report.reward_mean > 0.5  # the reward model loves it ...
    m = t.checkpoint()
    assert m.gate.startswith("failed:") and "degenerate" in m.gate, m.gate  # ... the gate does not
    assert "reward" not in m.gate.split("failed:")[1].split(";")[0]  # it beat the serving reward
    assert not m.promoted and announced == [] and t.serving_version == 0
    assert t.checkpointer.store.get("policy", m.version).metrics["gate.repeat"] > 0.8  # kept, with its figures
    # The same gate passes a healthy candidate that beats the serving version (so it can fail above).
    ok = gate.GateReport(reward_mean=0.5, kl=1.0, mean_tokens=6, repeat=0.3, distinct2=0.9, eos_rate=1.0)
    serving = gate.GateReport(reward_mean=0.1, kl=0.0, mean_tokens=6, repeat=0.3, distinct2=0.9, eos_rate=1.0)
    assert gate.decide(ok, serving, t.cfg) == (True, "passed")
    assert not gate.decide(serving, ok, t.cfg)[0]


def test_after_gate_patience_failures_in_a_row_training_restarts_from_the_serving_weights(
    tmp_path: Path, init_path: Path
) -> None:
    t = make(tmp_path, init_path, gate_margin=1e9, gate_patience=2)  # every checkpoint fails the gate
    serving = {k: v.clone() for k, v in t.state.policy.state_dict().items()}
    t.train_step()
    t.checkpoint()
    t.apply_restart()
    assert any(not torch.equal(v, serving[k]) for k, v in t.state.policy.state_dict().items())  # 1 failure: drifts on
    t.train_step()
    t.checkpoint()  # the second in a row
    t.apply_restart()
    assert all(torch.equal(v, serving[k]) for k, v in t.state.policy.state_dict().items())  # back to v0's weights
    assert t.version == 0 and t.serving_version == 0 and not t.state.optimizer.state  # and a fresh optimizer
    t.train_step()
    t.checkpoint()
    t.apply_restart()
    assert any(not torch.equal(v, serving[k]) for k, v in t.state.policy.state_dict().items())  # the count restarted


def test_the_serving_version_is_measured_again_only_when_it_or_the_reward_version_changed(
    tmp_path: Path, init_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[object] = []  # the model of each gate.evaluate call
    real = gate.evaluate
    monkeypatch.setattr(gate, "evaluate", lambda model, *a, **k: measured.append(model) or real(model, *a, **k))
    t = make(tmp_path, init_path, gate_max_repeat=1.0, gate_min_distinct2=0.0, gate_kl_budget=1e9, gate_max_tokens=100)
    t.reward.version = 7  # what GrpcReward reports after each ScoreBatch
    promoter = t.promoter

    def gate_once(margin: float) -> int:
        promoter.cfg.gate_margin = margin
        before = len(measured)
        t.train_step()
        t.checkpoint()
        return len(measured) - before

    assert gate_once(1e9) == 2  # the candidate, and the serving version (v0) measured once
    assert gate_once(1e9) == 1  # same serving and reward version: the report is reused
    t.reward.version = 8
    assert gate_once(1e9) == 2  # the reward model moved: measured again
    assert gate_once(-1e9) == 1 and t.serving_version > 0  # passed and promoted: its report is the serving one
    assert gate_once(1e9) == 1


def test_passing_checkpoint_is_promoted_with_lineage(tmp_path: Path, init_path: Path) -> None:
    announced: list = []
    t = make(
        tmp_path,
        init_path,
        announced,
        gate_max_repeat=1.0,
        gate_min_distinct2=0.0,
        gate_kl_budget=1e9,
        gate_max_tokens=100,
    )
    for _ in range(6):
        t.train_step()
    m = t.checkpoint()
    assert m.gate == "passed", m.gate
    assert m.promoted and t.serving_version == m.version and [u.version for u in announced] == [m.version]
    assert announced[0].reason == "gate" and announced[0].files  # a pointer plus digests
    assert m.parent == 0 and m.extra["lineage"] == [0] and m.extra["trainer_step"] == 6


def test_control_errors_are_precise(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path, init_path, gate_margin=1e9)  # every checkpoint fails the gate
    t.status = "training"
    t.train_step()
    m = t.checkpoint()
    assert not m.promoted
    with pytest.raises(errors.NotFound, match="version 42 is not in the model store"):
        t.promote(42)
    with pytest.raises(errors.FailedPrecondition, match="never promoted"):
        t.rollback(m.version)
    with pytest.raises(errors.FailedPrecondition, match="already the serving version"):
        t.rollback(0)
    t.pause("incident")
    with pytest.raises(errors.FailedPrecondition, match="paused: Resume first"):
        t.promote(m.version)
    assert state.load_control(t.dir)["paused"] is True  # survives a restart
    t.resume()
    t.promote(m.version, "operator knows best")
    assert t.serving_version == m.version and t.checkpointer.store.get("policy", m.version).promoted
    t.rollback(0)
    assert t.serving_version == 0 and t.promoter.restart_version == 0


def test_pause_returns_after_the_step_in_progress(tmp_path: Path, init_path: Path, monkeypatch) -> None:
    """Pause waits for the running step; after it returns, no step starts (its status is final)."""
    t = make(tmp_path, init_path)
    t.setup = lambda: None  # type: ignore[method-assign]  # already set up by make()
    in_step, release, steps = threading.Event(), threading.Event(), []

    def slow_step() -> dict:
        steps.append(t.step)
        in_step.set()
        release.wait(10)
        t.state.step += 1
        return {}

    monkeypatch.setattr(t, "train_step", slow_step)
    stop = threading.Event()
    loop = threading.Thread(target=t.run, args=(stop,))
    loop.start()
    try:
        assert in_step.wait(10)
        paused = threading.Thread(target=t.pause, args=("final evaluation",))
        paused.start()
        paused.join(0.3)
        assert paused.is_alive()  # still inside the step
        release.set()
        paused.join(10)
        assert not paused.is_alive() and t.step == 1
        wait_for(lambda: t.status == "paused", 10, "the loop to report paused")
        assert steps == [0]
    finally:
        stop.set()
        release.set()
        loop.join(10)


def test_second_trainer_waits_as_standby(tmp_path: Path) -> None:
    d = state.trainer_dir(tmp_path, "policy")
    a, b = state.ActiveLock(d), state.ActiveLock(d)
    assert a.try_acquire() and not b.try_acquire()
    stop = threading.Event()
    got: list[bool] = []
    th = threading.Thread(target=lambda: got.append(b.wait(stop, 0.05)))
    th.start()
    th.join(0.3)
    assert th.is_alive() and got == []  # still waiting
    a.release()
    th.join(5)
    assert got == [True] and b.held


RUNNER = textwrap.dedent(
    """
    import hashlib, json, sys, threading
    from flywheel.core.modelstore import ModelStore
    from flywheel.trainer.config import TrainerConfig
    from flywheel.trainer.loop import build_trainer
    from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
    store, init, log_path, max_steps, halt_after = sys.argv[1:6]

    class Reward:
        def score(self, prompts, responses):
            return [sum(w == "help" for w in r.split()) / max(1, len(r.split())) for r in responses]

    cfg = TrainerConfig(init_path=init, batch_size=4, max_new_tokens=8, lr=2e-3, prompt_source="pool",
                        checkpoint_every=2, max_steps=int(max_steps), torch_threads=1, gate_prompts=2,
                        missing_eos_penalty=None, reward_norm="running", epochs=2)
    prompts = PoolPrompts(FALLBACK_PROMPTS)
    t = build_trainer(cfg, ModelStore(store), Reward(), prompts, FALLBACK_PROMPTS)
    train_step = t.train_step

    def logged_step():
        before = prompts.cursor
        m = train_step()
        h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.state.policy.parameters())).hexdigest()
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": t.step, "cursor": before, "hash": h, "reward": m["reward_mean"]}) + "\\n")
        if t.step == int(halt_after):
            threading.Event().wait()  # hold here, after the step and before its checkpoint, for the SIGKILL
        return m

    t.train_step = logged_step
    t.run(threading.Event())
    """
)


def _spawn(tmp_path: Path, store: Path, init: Path, log: Path, steps: int, halt_after: int = 0) -> subprocess.Popen:
    """A trainer process logging each step; `halt_after` > 0: it stops after that step until killed."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(store), str(init), str(log), str(steps), str(halt_after)]
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE)


def _lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_sigkill_then_restart_resumes_exactly(tmp_path: Path, init_path: Path) -> None:
    steps = 6
    ref_log, run_log = tmp_path / "ref.jsonl", tmp_path / "run.jsonl"
    ref = _spawn(tmp_path, tmp_path / "ref_store", init_path, ref_log, steps)  # uninterrupted
    victim = _spawn(tmp_path, tmp_path / "store", init_path, run_log, steps, halt_after=3)

    def victim_did_step_3() -> bool:
        assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
        return any(x["step"] == 3 for x in _lines(run_log))

    wait_for(victim_did_step_3, 90, "the victim's step 3")
    os.kill(victim.pid, signal.SIGKILL)  # step 3 is done but not checkpointed (checkpoint_every=2)
    victim.wait()
    saved = state.load_state(state.trainer_dir(tmp_path / "store", "policy"))
    assert saved is not None and saved.step == 2 and saved.offsets == {"pool": 8}
    killed_at = len(_lines(run_log))

    restart = _spawn(tmp_path, tmp_path / "store", init_path, run_log, steps)
    assert restart.wait(90) == 0, restart.stderr.read().decode()[-2000:]
    assert ref.wait(90) == 0, ref.stderr.read().decode()[-2000:]
    want, after = _lines(ref_log), _lines(run_log)[killed_at:]
    # The restart redoes exactly the uncommitted steps 3..6: same prompts, same weights after each.
    assert [x["step"] for x in after] == [3, 4, 5, 6]
    assert [(x["cursor"], x["hash"]) for x in after] == [(x["cursor"], x["hash"]) for x in want[2:]]
    final = state.load_state(state.trainer_dir(tmp_path / "store", "policy"))
    assert final is not None and final.step == steps and final.offsets == {"pool": 4 * steps}
    assert float(final.optimizer["state"][0]["step"]) == steps * 2  # AdamW continued: 2 epochs per step
    versions = [m.version for m in ModelStore(tmp_path / "store").list_versions("policy")]
    assert versions == [0, 1, 2, 3]  # one version per checkpoint, none orphaned or repeated
