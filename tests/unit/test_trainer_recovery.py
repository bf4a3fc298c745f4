"""The trainer never stalls: it waits for a reward model worth training against, scores empty or
refused answers without failing a step, and recovers from failing steps and drift (tiny real model)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.testing import tiny_policy
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.loop import Trainer, build_trainer
from flywheel.trainer.metrics import FAILED_STEPS, RESTARTS
from flywheel.trainer.prompt_sources import FALLBACK_PROMPTS, PoolPrompts
from flywheel.trainer.reward_source import RewardInfo, RewardSource, not_ready, score_each

pytestmark = pytest.mark.timeout(120)


class PickyReward:
    """Like the reward service: refuses an empty response and, here, any response of even length
    (a whole batch refused for one item); otherwise the share of 'e's."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.batches.append(list(responses))
        for i, r in enumerate(responses):
            if not r.strip():
                raise errors.InvalidArgument(f"item {i}: response is empty; score a non-empty response")
            if len(r) % 2 == 0:
                raise errors.InvalidArgument(f"item {i}: refused")
        return [r.count("e") / len(r) for r in responses]


class BrokenReward:
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise RuntimeError("boom: probability tensor contains inf")


@pytest.fixture(scope="module")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "init", seed=0)


def make(tmp_path: Path, init_path: Path, reward: RewardSource, **kw) -> Trainer:
    torch.set_num_threads(1)
    opts = dict(init_path=str(init_path), max_new_tokens=8, prompt_source="pool", gate_prompts=4, checkpoint_every=1000)
    cfg = TrainerConfig(**{**opts, **kw})
    t = build_trainer(cfg, ModelStore(tmp_path / "store"), reward, PoolPrompts(FALLBACK_PROMPTS), FALLBACK_PROMPTS)
    t.setup()
    return t


def info(
    pairs: int = 500, heldout: int = 50, accuracy: float = 0.9, version: int = 3, online: float = -1.0, window: int = 0
) -> RewardInfo:
    return RewardInfo(version, 0.0, 1.0, accuracy, pairs, heldout, online, window)


def test_not_ready_says_why_and_tolerates_a_dip_once_training() -> None:
    cfg = TrainerConfig()
    assert not_ready(None, cfg) == "the reward service does not answer GetInfo"
    assert not_ready(info(pairs=40), cfg) == "reward v3 was trained on 40 pairs; training starts at 50"
    assert (
        not_ready(info(heldout=4), cfg)
        == "reward v3 was measured on 4 unseen pairs (held-out and online); training starts at 40"
    )
    assert "measured on 0 unseen pairs" in not_ready(info(accuracy=-1), cfg)
    assert (
        not_ready(info(accuracy=0.6), cfg) == "reward v3 accuracy on 50 unseen pairs is 0.60; training starts at 0.70"
    )
    assert not_ready(info(), cfg) == ""
    assert not_ready(info(accuracy=0.68), cfg, training=True) == ""  # the held-out set moves with the policy
    assert "goes on at 0.65" in not_ready(info(accuracy=0.6), cfg, training=True)
    # A rollback to the starter reward model: back to waiting.
    assert "trained on 0 pairs" in not_ready(info(pairs=0, heldout=0, accuracy=-1, version=0), cfg, training=True)


def test_readiness_pools_the_held_out_split_with_the_online_window() -> None:
    cfg = TrainerConfig()
    # 10 held-out pairs are too few alone; with 100 online pairs the evidence is enough.
    assert "measured on 10 unseen" in not_ready(info(heldout=10, accuracy=0.8), cfg)
    assert not_ready(info(heldout=10, accuracy=0.8, online=0.7, window=100), cfg) == ""
    # Pooled, weighted by pairs: (0.9 * 10 + 0.6 * 90) / 100 = 0.63.
    assert "is 0.63" in not_ready(info(heldout=10, accuracy=0.9, online=0.6, window=90), cfg)
    # Online alone (no held-out split measured yet) counts too.
    assert not_ready(info(heldout=0, accuracy=-1, online=0.75, window=100), cfg) == ""
    off = TrainerConfig(reward_min_pairs=0, reward_min_unseen_pairs=0, reward_min_accuracy=0)
    assert not_ready(info(pairs=0, heldout=0, accuracy=-1), off) == ""


def test_score_each_scores_around_empty_and_refused_answers() -> None:
    r = PickyReward()
    got = score_each(r, ["p"] * 5, ["abc", "", "abcd", "  ", "eee"])
    assert got[0] == 0.0 and got[4] == 1.0 and all(math.isnan(got[i]) for i in (1, 2, 3))
    assert not [x for b in r.batches for x in b if not x.strip()]  # an empty answer is never sent
    assert r.batches[0] == ["abc", "abcd", "eee"] and r.batches[1:] == [["abc"], ["abcd"], ["eee"]]
    assert all(math.isnan(x) for x in score_each(r, ["p", "p"], ["", " "]))
    assert r.batches[-1] == ["eee"]  # (nothing sent for the all-empty batch)


def test_a_step_with_refused_answers_succeeds_with_the_configured_score(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path, init_path, PickyReward())
    shares = [t.train_step()["unscored_share"] for _ in range(3)]
    assert t.step == 3 and max(shares) > 0, shares  # refused samples cost themselves, not the step


def test_failing_steps_restart_from_serving_then_stop_the_loop(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path, init_path, BrokenReward(), max_failed_steps=2)
    before = RESTARTS.labels("failing_steps")._value.get()
    failed = FAILED_STEPS.labels("error")._value.get()
    died: list[BaseException] = []

    def run() -> None:
        try:
            t.run(threading.Event())
        except BaseException as e:
            died.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not th.is_alive() and died and "boom" in str(died[0])  # 2 x max_failed_steps: the loop ends
    assert RESTARTS.labels("failing_steps")._value.get() == before + 1  # after max_failed_steps: from serving
    assert FAILED_STEPS.labels("error")._value.get() == failed + 4
    assert t.failing_steps == 4 and t.last_error.startswith("RuntimeError: boom") and t.status == "stopped"


def test_a_kl_refusal_restarts_at_once_with_a_warmed_up_optimizer(tmp_path: Path, init_path: Path) -> None:
    t = make(tmp_path, init_path, PickyReward(), gate_kl_budget=1e-3, gate_patience=0, lr=2e-2)
    before = RESTARTS.labels("kl_budget")._value.get()
    for _ in range(3):
        t.train_step()
    m = t.checkpoint()
    assert "over budget" in m.gate and t.promoter.restart_version == 0
    assert RESTARTS.labels("kl_budget")._value.get() == before + 1
    t.apply_restart()
    assert t.state.warmup_left == 10 and not t.state.optimizer.state
    t.state.set_lr(t.cfg)
    assert t.state.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)  # lr / 10 first
    for _ in range(5):
        t.train_step()
    assert t.state.optimizer.param_groups[0]["lr"] == pytest.approx(2e-2 * (1 - 0.9 * 6 / 10))
    t.state.warmup_left = 0
    t.state.set_lr(t.cfg)
    assert t.state.optimizer.param_groups[0]["lr"] == pytest.approx(2e-2)
