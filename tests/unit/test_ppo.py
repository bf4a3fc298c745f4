"""PPO math against values computed by hand (each number below is worked out in the comment)."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.trainer import ppo
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.rollout import mask_after_eos

T = torch.tensor


def close(a: torch.Tensor, b: list | float, tol: float = 1e-5) -> None:
    assert torch.allclose(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=tol), (a, b)


def test_gae_hand_computed() -> None:
    # gamma 1, lam 0.5; V = [.5, .2, .1], r = [0, 0, 1]
    # t2: d = 1 - .1 = .9, A = .9;  t1: d = .1 - .2 = -.1, A = -.1 + .5 * .9 = .35
    # t0: d = .2 - .5 = -.3, A = -.3 + .5 * .35 = -.125;  returns = A + V
    adv, ret = ppo.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.2, 0.1]]), torch.ones(1, 3), gamma=1.0, lam=0.5)
    close(adv, [[-0.125, 0.35, 0.9]])
    close(ret, [[0.375, 0.55, 1.0]])


def test_gae_treats_padding_as_terminal_and_discounts() -> None:
    # mask [1, 1, 0]: the padded value 5 must not leak in. gamma 1, lam 1:
    # t1: d = 2 + 0 - 1 = 1, A = 1; t0: d = 0 + 1 - 1 = 0, A = 0 + 1 = 1
    adv, _ = ppo.gae(T([[0.0, 2.0, 9.0]]), T([[1.0, 1.0, 5.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    close(adv, [[1.0, 1.0, 0.0]])
    # gamma .5, lam 1, V = 0, r = [0, 0, 4]: A = [1, 2, 4]
    adv, _ = ppo.gae(T([[0.0, 0.0, 4.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(adv, [[1.0, 2.0, 4.0]])


def test_clipped_policy_loss_hand_computed() -> None:
    # ratios 1.5, .5, .5 with A = +1, +1, -1 and eps .2:
    # a: max(-1.5, -1.2) = -1.2 (clipped); b: max(-.5, -.8) = -.5; c: max(.5, .8) = .8 (clipped)
    old = torch.zeros(1, 3)
    new = torch.log(T([[1.5, 0.5, 0.5]]))
    loss, st = ppo.policy_loss(new, old, T([[1.0, 1.0, -1.0]]), torch.ones(1, 3), clip=0.2)
    close(loss, (-1.2 - 0.5 + 0.8) / 3)
    close(st["clip_frac"], 2 / 3)
    # approx KL (k3 of the ratio): mean(r - 1 - log r)
    want = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5)) / 3
    close(st["approx_kl"], want)


def test_policy_loss_ignores_masked_tokens() -> None:
    loss, _ = ppo.policy_loss(T([[0.0, 5.0]]), T([[0.0, 0.0]]), T([[1.0, 100.0]]), T([[1.0, 0.0]]))
    close(loss, -1.0)


def test_clipped_value_loss_hand_computed() -> None:
    # V=1.5, old=1, R=2: V_clip = 1.2, se = .25, se_clip = .64 -> .64
    # V=.9, old=1, R=0: inside the clip range: .81
    loss, frac = ppo.value_loss(T([[1.5, 0.9]]), T([[1.0, 1.0]]), T([[2.0, 0.0]]), torch.ones(1, 2), clip=0.2)
    close(loss, 0.5 * (0.64 + 0.81) / 2)
    close(frac, 0.5)


def test_kl_estimators_hand_computed() -> None:
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    close(ppo.kl_per_token(lp, ref, "k1"), [math.log(2)])
    close(ppo.kl_per_token(lp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(ppo.kl_per_token(lp, ref, "k3"), [0.5 - 1 + math.log(2)])
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        ppo.kl_per_token(lp, ref, "k4")


def test_adaptive_kl_controller_ziegler() -> None:
    # init .15, target 6, horizon 10000, 100 samples per batch.
    c = ppo.AdaptiveKLController(0.15, 6.0, 10_000)
    assert c.update(12.0, 100) == pytest.approx(0.15 * (1 + 0.2 * 0.01))  # error clipped to +.2
    c = ppo.AdaptiveKLController(0.15, 6.0, 10_000)
    assert c.update(3.0, 100) == pytest.approx(0.15 * (1 - 0.2 * 0.01))  # error clipped to -.2
    c = ppo.AdaptiveKLController(0.15, 6.0, 10_000)
    assert c.update(6.6, 100) == pytest.approx(0.15 * (1 + 0.1 * 0.01))  # error .1
    s = c.state_dict()
    d = ppo.AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(s)
    assert d.update(6.6, 100) == pytest.approx(0.15 * 1.001**2)
    assert ppo.FixedKLController(0.05).update(100.0, 100) == 0.05


def test_adaptive_kl_floor_only_tightens() -> None:
    # floor .1 = init: under the target it stays at .1; over it, it grows as Ziegler's (x1.08 a batch here).
    c = ppo.AdaptiveKLController(0.1, 3.0, 40, floor=0.1)
    assert [c.update(1.0, 16) for _ in range(5)] == [0.1] * 5
    assert c.update(6.0, 16) == pytest.approx(0.1 * 1.08)
    d = ppo.AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert d.floor == 0.1 and d.update(0.0, 16) == 0.1
    d.load_state_dict({"value": 0.5, "target": 3.0, "horizon": 40})  # an older checkpoint: no floor
    assert d.floor == 0.0


def test_token_rewards_put_score_on_last_real_token() -> None:
    # coef .5, kl [.1, .2, (pad)], score 1: [-.05, -.1 + 1, 0]
    r, non_score = ppo.token_rewards(T([1.0]), T([[0.1, 0.2, 0.3]]), T([[1.0, 1.0, 0.0]]), 0.5)
    close(r, [[-0.05, 0.9, 0.0]])
    close(non_score, [[-0.05, -0.1, 0.0]])


def test_eos_trick() -> None:
    close(ppo.apply_eos_trick(T([0.3, 0.7]), T([True, False]), -1.0), [0.3, -1.0])
    close(ppo.apply_eos_trick(T([0.3, 0.7]), T([True, False]), None), [0.3, 0.7])


def test_rloo_and_grpo_advantages() -> None:
    # group [1, 2, 3]: leave-one-out baselines 2.5, 2, 1.5 -> [-1.5, 0, 1.5]; second group constant -> 0
    close(ppo.rloo_advantages(T([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]), 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # mean 2, std 1 -> [-1, 0, 1] / (1 + 1e-4)
    close(ppo.grpo_advantages(T([1.0, 2.0, 3.0]), 3), [-1 / 1.0001, 0.0, 1 / 1.0001])


def test_whiten_entropy_logprobs() -> None:
    close(ppo.whiten(T([1.0, 2.0, 3.0, 50.0]), T([1.0, 1.0, 1.0, 0.0])), [-1.0, 0.0, 1.0, 0.0], tol=1e-4)
    close(ppo.entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    close(ppo.logprobs_from_logits(torch.zeros(1, 2, 4), T([[0, 3]])), [[-math.log(4)] * 2])


def test_running_moments() -> None:
    m = ppo.RunningMoments()
    m.update(T([1.0, 2.0]))
    m.update(T([3.0, 4.0, 5.0]))
    assert m.mean == pytest.approx(3.0) and m.var == pytest.approx(2.0) and m.count == 5


def test_mask_after_eos() -> None:
    ids, mask, has_eos = mask_after_eos(T([[5, 2, 7, 8], [5, 6, 7, 8]]), eos_id=2, pad_id=0)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False]


def test_config_validation_names_the_fix() -> None:
    from flywheel.core.config import ConfigError

    with pytest.raises(ConfigError, match="grpo needs 2 or more"):
        TrainerConfig(algo="grpo", group_size=1)
    with pytest.raises(ConfigError, match="divisor"):
        TrainerConfig(batch_size=8, minibatch_size=3)
    assert TrainerConfig().adam_eps == 1e-5 and TrainerConfig().lam == 0.95 and TrainerConfig().gamma == 1.0
