"""Reward model: losses against hand-computed values, learning a synthetic preference, store round trip."""

from __future__ import annotations

import math
import random
import threading
from types import SimpleNamespace

import pytest
import torch

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.reward.model import (
    RewardModel,
    Scorer,
    Stopped,
    binary_loss,
    bradley_terry_loss,
    evaluate,
    pairwise_accuracy,
    train_only_top_layers,
    train_step,
)
from flywheel.testing import tiny_reward_model

WORDS = "the a river stone green quick model answer light table house blue seven market paper garden".split()


def synthetic_pairs(n: int, seed: int) -> list[SimpleNamespace]:
    """Answers that say "please" are preferred over answers that do not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "tell me about " + " ".join(rng.choices(WORDS, k=3))
        a, b = (" ".join(rng.choices(WORDS, k=rng.randint(4, 8))) for _ in range(2))
        words = a.split()
        words.insert(rng.randint(0, len(words)), "please")
        out.append(SimpleNamespace(prompt=prompt, chosen=" ".join(words), rejected=b, weight=1.0, margin=0.0))
    return out


def test_bradley_terry_loss_matches_hand_computation() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = 0.31326, -log sigmoid(-1) = 1.31326
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)
    w = torch.tensor([3.0, 1.0])
    assert bradley_terry_loss(rc, rr, w).item() == pytest.approx((3 * 0.313262 + 1.313262) / 4, abs=1e-5)
    m = torch.tensor([1.0, 0.0])  # margin 1 on the first: -log sigmoid(0) = log 2
    assert bradley_terry_loss(rc, rr, None, m).item() == pytest.approx((math.log(2) + 1.313262) / 2, abs=1e-5)
    assert pairwise_accuracy(rc, rr) == 0.5


def test_binary_loss_matches_hand_computation() -> None:
    r, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    # BCE(sigmoid(0), 1) = log 2; BCE(sigmoid(2), 0) = -log(1 - sigmoid(2)) = 2.126928
    assert binary_loss(r, y).item() == pytest.approx((math.log(2) + 2.126928) / 2, abs=1e-5)
    assert binary_loss(r, y, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2), abs=1e-5)


def test_tiny_model_learns_a_synthetic_preference(tmp_path) -> None:
    torch.manual_seed(0)
    rm = RewardModel.load(tiny_reward_model(tmp_path / "tiny"), max_length=64)
    train, heldout = synthetic_pairs(1200, seed=1), synthetic_pairs(200, seed=2)
    before = evaluate(rm, heldout)["heldout_accuracy"]
    opt = torch.optim.AdamW(rm.model.parameters(), lr=2e-3, eps=1e-5)
    labels = [SimpleNamespace(prompt=p.prompt, response=p.chosen, label=1.0) for p in train[:50]]
    fresh = []  # (correct, n) of the first epoch's pairs, scored before training on them
    for step in range(150):
        batch = train[(step * 16) % 1200 : (step * 16) % 1200 + 16]
        first_epoch = step < 75
        out = train_step(rm, opt, batch, labels[step % 50 : step % 50 + 2], binary_weight=0.1, fresh=16 * first_epoch)
        assert math.isfinite(out["loss"])
        assert out["fresh_n"] == 16 * first_epoch
        fresh.append((out["fresh_correct"], out["fresh_n"]))
    after = evaluate(rm, heldout)
    assert after["heldout_accuracy"] >= 0.9, (before, after)
    assert before < 0.8  # it was learned, not given

    def online(steps: list) -> float:
        return sum(c for c, _ in steps) / sum(n for _, n in steps)

    # Progressive validation tracks held-out accuracy: near chance at first, near held-out at the end.
    assert abs(online(fresh[:5]) - before) < 0.25, (fresh[:5], before)
    assert online(fresh[60:75]) >= after["heldout_accuracy"] - 0.1, (fresh[60:75], after)
    stop = threading.Event()
    assert evaluate(rm, heldout, chunk_size=64, stop=stop) == after  # not stopped: the same pass
    stop.set()
    with pytest.raises(Stopped, match="after 0 of 200 items"):  # a stopping service does not wait for it
        evaluate(rm, heldout, chunk_size=64, stop=stop)


def test_store_round_trip_and_scorer_hot_swap(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    v0 = store.publish("reward", lambda d: tiny_reward_model(d, seed=0), parent=None, version=0)
    v1 = store.publish("reward", lambda d: tiny_reward_model(d, seed=1), parent=0, metrics={"heldout_accuracy": 0.75})
    scorer = Scorer(max_length=64)
    with pytest.raises(errors.Unavailable):
        scorer.score(["p"], ["r"])
    scorer.load(store.load_path("reward", 0), 0)
    s0, ver = scorer.score(["hello", "hello"], ["a b", "c d"])
    assert ver == 0 and len(s0) == 2
    assert scorer.apply_update(store.to_update(v1, "trained"), store)
    s1, ver = scorer.score(["hello", "hello"], ["a b", "c d"])
    assert ver == 1 and s1 != s0 and scorer.metrics["heldout_accuracy"] == 0.75
    # the same weights loaded directly score the same
    direct = RewardModel.load(store.load_path("reward", 1), max_length=64).score(["hello", "hello"], ["a b", "c d"])
    assert direct == pytest.approx(s1, abs=1e-5)
    # a corrupted checkpoint is refused and version 1 keeps scoring
    bad = store.to_update(v0, "rollback")
    (v0.path / "model.safetensors").write_bytes(b"garbage")
    assert not scorer.apply_update(bad, store)
    assert scorer.score(["hello"], ["a b"])[1] == 1 and "sha256" in scorer.last_error or "bytes" in scorer.last_error
    mean, std = scorer.stats()
    assert std >= 0 and math.isfinite(mean)


def test_real_minilm_starter_builds_and_scores(tmp_path) -> None:
    from flywheel.reward.config import RewardModelConfig
    from flywheel.reward.starter import ensure_starter

    store = ModelStore(tmp_path / "store")
    m = ensure_starter(store, RewardModelConfig(max_length=64))
    assert m.version == 0 and m.parent is None and "model.safetensors" in m.files
    assert ensure_starter(store, RewardModelConfig()).created_at == m.created_at  # built once
    rm = RewardModel.load(store.load_path("reward", 0), max_length=64)
    assert rm.model.config.model_type == "bert" and rm.model.config.hidden_size == 384
    scores = rm.score(["What is the capital of France?"] * 2, ["Paris.", "I like turtles."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


def test_training_only_the_top_layers_leaves_the_rest_as_pretrained(tmp_path) -> None:
    rm = RewardModel.load(tiny_reward_model(tmp_path / "tiny", layers=4), max_length=64)
    before = {n: p.detach().clone() for n, p in rm.model.named_parameters()}
    trained = train_only_top_layers(rm.model, 1)
    names = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("bert.encoder.layer.3.", "bert.pooler.", "classifier.")) for n in names)
    assert len(trained) == len(names)
    opt = torch.optim.AdamW(trained, lr=1e-2)
    train_step(rm, opt, synthetic_pairs(8, seed=3), [], 0.0)
    changed = {n for n, p in rm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names  # nothing below the top layer moved
    assert any(n.startswith("bert.encoder.layer.3.") for n in changed)
    # 0, or as many layers as the model has: everything trains.
    rm2 = RewardModel.load(tiny_reward_model(tmp_path / "tiny2", layers=2), max_length=64)
    assert len(train_only_top_layers(rm2.model, 2)) == len(list(rm2.model.parameters()))
    assert len(train_only_top_layers(rm2.model, 0)) == len(list(rm2.model.parameters()))
