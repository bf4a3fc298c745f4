"""PPO for RLHF as pure functions: advantages, losses, KL estimators and the KL controller.

Sources, cited where each trick is used:
  [Huang24]    Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (arXiv 2403.17031)
  [Ziegler19]  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593)
  [Schulman17] Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347)
  [Schulman16] Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv 1506.02438)
  [Schulman20] J. Schulman 2020, "Approximating KL Divergence" (k1, k2, k3 estimators)
  [Ahmadian24] Ahmadian et al. 2024, "Back to Basics: REINFORCE Style Optimization" (RLOO, arXiv 2402.14740)
  [Shao24]     Shao et al. 2024, "DeepSeekMath" (GRPO, arXiv 2402.03300)

Shapes: B sequences, T response tokens. `mask` is 1.0 on real response tokens (up to and
including the first EOS) and 0.0 on padding after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (Bessel-corrected like [Huang24]'s whiten)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


Reduce = Callable[[torch.Tensor], torch.Tensor]  # the sum over every rank's batch (distributed.Group.sum)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions; [Huang24] whitens advantages (shift_mean=True). `reduce`:
    the statistics are those of every rank's batch together (the data-parallel trainer)."""
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = reduce(mask.sum())
        mean = reduce((x * mask).sum()) / n.clamp(min=1.0)
        var = reduce(((x - mean) ** 2 * mask).sum()) / n.clamp(min=1.0)
        var = var * n / (n - 1) if n > 1 else var
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------------- KL


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi, (B, T) -> (B, T).

    [Schulman20]: k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2 (low variance,
    biased), k3 = (r' - 1) - log r' with r' = ref/pi (unbiased, always >= 0; GRPO's choice
    [Shao24]). Here log r = logprobs - ref_logprobs.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


class AdaptiveKLController:
    """[Ziegler19] section 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2), K_beta = n / horizon.

    `floor` bounds beta from below (0: Ziegler's controller as published). With floor = init the
    controller only tightens the leash: while an online run's KL is still under its target it
    would otherwise shrink beta for hundreds of updates, and then need as many to grow it back
    when the policy starts to over-optimize the reward model (seen in the demo: 10x down, then
    KL 6-11 nats for a 2.5 target).
    """

    def __init__(self, init: float, target: float, horizon: int, floor: float = 0.0) -> None:
        self.value, self.target, self.horizon, self.floor = float(init), float(target), int(horizon), float(floor)

    def update(self, current_kl: float, n_samples: int) -> float:
        """Feed the mean sequence KL of a batch of `n_samples`; returns the new coefficient."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.floor, self.value * (1.0 + error * n_samples / self.horizon))
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "floor": self.floor}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
        self.floor = float(state.get("floor", 0.0))  # checkpoints written before the floor existed


class FixedKLController(AdaptiveKLController):
    """A constant coefficient ([Huang24]'s default 0.05)."""

    def __init__(self, value: float) -> None:
        super().__init__(value, 1.0, 1)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value


# ----------------------------------------------------------------------------------- rewards


def apply_eos_trick(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """[Huang24] "EOS trick": a response truncated before EOS gets the fixed score `penalty`, (B,) -> (B,)."""
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def surprising(ref_logprobs: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, T) -> (B,) bool: responses holding a token the reference finds less likely than exp(threshold).
    A perplexity-under-the-reference test: reward over-optimization writes text the starter never would
    (Gao et al. 2023 measure the same drift as KL; a per-token minimum does not average it away)."""
    return (ref_logprobs.masked_fill(~mask.bool(), 0.0) < threshold).any(1)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every token, plus the score on the last real token.

    [Ziegler19] eq. 2 and [Huang24]: the KL penalty is part of the reward, per token, and the
    sequence-level reward-model score lands on the final token. Returns (rewards (B, T), the
    non-score part (B, T)).
    """
    non_score = -kl_coef * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards = non_score.clone()
    rewards[torch.arange(scores.shape[0]), last] += scores
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation [Schulman16] over response tokens, (B, T) -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t; A_t = delta_t + gamma * lam * A_{t+1}. Positions
    after the last real token count as terminal (V = 0, A = 0). Returns = A + V, the value
    target ([Huang24]: gamma = 1, lam = 0.95).
    """
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        adv[:, t] = last_gae
    return adv, adv + values


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[Ahmadian24] RLOO: A_i = r_i - mean_{j != i} r_j within each prompt's group, (B*k,) -> (B*k,).

    Rewards are laid out prompt-major: samples of prompt p are rows p*k .. p*k+k-1.
    """
    r = rewards.view(-1, group_size)  # (B, k)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[Shao24] GRPO outcome supervision: A_i = (r_i - mean(r)) / (std(r) + eps) within each group, (B*k,) -> (B*k,)."""
    r = rewards.view(-1, group_size)  # (B, k)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).reshape(-1)


class RunningMoments:
    """Running mean and std of reward scores (Chan et al. parallel update) for reward normalization."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = float(x.mean()), float(x.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(s["mean"]), float(s["var"]), int(s["count"])


# ----------------------------------------------------------------------------------- losses


def token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """A loss's token-level mean: over this batch's masked positions, or their sum over `n_tokens` (every
    rank's tokens, so that the ranks' averaged gradients are the whole batch's)."""
    return masked_mean(x, mask) if n_tokens is None else (x * mask).sum() / n_tokens.clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[Schulman17] clipped surrogate, token-level masked mean (`token_mean`), (B, T) -> scalar.

    L = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))). Also returns the clip
    fraction and the approximate KL to the rollout policy (k3, [Schulman20]) for monitoring.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ([Huang24], from OpenAI's baselines): 0.5 * mean(max((V - R)^2, (V_clip - R)^2)).

    V_clip = V_old + clip(V - V_old, -c, c). Returns (loss, fraction of tokens where the clipped term won).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    se, se_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(se, se_clipped), mask, n_tokens)
    return loss, masked_mean((se_clipped > se).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution of each position, (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) from logits, (B, T, V) and (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)
