"""PPO, RLOO and GRPO: what each algorithm changes in a training step, chosen in one place.

They share the rollout, the clipped policy loss and the update (loop.py); they differ in the
advantages, in whether a critic is trained, and in where the KL to the reference goes (into
the reward, or a loss term). `algorithm(cfg)` is the one dispatch on `cfg.algo`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from flywheel.trainer import ppo
from flywheel.trainer.config import TrainerConfig


class Algorithm(Protocol):
    @property
    def critic(self) -> bool:
        """Whether a value head is trained (its values feed the advantages)."""
        ...

    def advantages(
        self,
        scores: torch.Tensor,
        kl: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        reduce: ppo.Reduce | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages (B, T), the critic's returns (B, T) or None) from scores (B,) and per-token KL (B, T).
        `reduce`: whitening sees every rank's batch (groups never straddle ranks)."""
        ...

    def kl_loss(
        self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A KL-to-the-reference term of the loss (`ppo.token_mean` over `n_tokens`), or None when the KL is
        in the reward."""
        ...


@dataclasses.dataclass(frozen=True)
class PPO:
    """Per-token KL in the reward (Ziegler et al. 2019), a critic and GAE (gamma 1, lam 0.95)."""

    gamma: float
    lam: float
    whiten: bool

    @property
    def critic(self) -> bool:
        return True

    def advantages(
        self,
        scores: torch.Tensor,
        kl: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        reduce: ppo.Reduce | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if values is None:
            raise ValueError("PPO needs the critic's values")
        rewards, _ = ppo.token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = ppo.gae(rewards, values, mask, self.gamma, self.lam)
        return (ppo.whiten(advantages, mask, reduce=reduce) if self.whiten else advantages), returns  # Huang24

    def kl_loss(
        self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        return None


@dataclasses.dataclass(frozen=True)
class RLOO:
    """Leave-one-out baseline on the KL-penalised sequence reward (Ahmadian et al. 2024); no critic."""

    group_size: int
    whiten: bool

    @property
    def critic(self) -> bool:
        return False

    def advantages(
        self,
        scores: torch.Tensor,
        kl: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        reduce: ppo.Reduce | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        advantages = ppo.rloo_advantages(scores - kl_coef * kl.sum(1), self.group_size).unsqueeze(1) * mask
        return (ppo.whiten(advantages, mask, reduce=reduce) if self.whiten else advantages), None

    def kl_loss(
        self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        return None


@dataclasses.dataclass(frozen=True)
class GRPO:
    """Group-normalised scores; the KL is a loss term (k3) weighted by beta instead (Shao et al. 2024)."""

    group_size: int
    beta: float

    @property
    def critic(self) -> bool:
        return False

    def advantages(
        self,
        scores: torch.Tensor,
        kl: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        reduce: ppo.Reduce | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ppo.grpo_advantages(scores, self.group_size).unsqueeze(1) * mask, None  # never whitened

    def kl_loss(
        self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.beta <= 0:
            return None
        return self.beta * ppo.token_mean(ppo.kl_per_token(logprobs, ref_logprobs, "k3"), mask, n_tokens)


def algorithm(cfg: TrainerConfig) -> Algorithm:
    """The algorithm `cfg.algo` names, with its settings."""
    match cfg.algo:
        case "ppo":
            return PPO(cfg.gamma, cfg.lam, cfg.whiten_advantages)
        case "rloo":
            return RLOO(cfg.group_size, cfg.whiten_advantages)
        case "grpo":
            return GRPO(cfg.group_size, cfg.grpo_beta)
