"""The trainer's typed configuration (CleanRL's Args idea: every field carries its help text).

Defaults follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO"
(arXiv 2403.17031) and Ziegler et al. 2019 (arXiv 1909.08593); see docs/ARCHITECTURE.md, "Training
defaults worth knowing". Every field can be set from the `trainer:` section of the YAML
config file or from its FLYWHEEL_TRAINER_* environment variable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from flywheel.core.config import require, setting

Algo = Literal["ppo", "rloo", "grpo"]
ALGOS: tuple[Algo, ...] = ("ppo", "rloo", "grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
REWARD_NORMS = ("info", "running", "none")
PROMPT_SOURCES = ("kafka", "pool")


@dataclasses.dataclass
class TrainerConfig:
    """Everything the PPO loop, the gate and checkpointing need; validated in __post_init__."""

    SECTION: ClassVar[str] = "trainer"

    # --- models -----------------------------------------------------------------------------
    model: str = setting("policy", "Model name in the model store that the trainer trains.")
    init_path: str = setting(
        "",
        "A from_pretrained path to start from when the store has no version of `model` yet "
        "(it is published as version 0, the starter). Empty: the store must hold version 0.",
    )
    reference_version: int = setting(0, "Store version of the frozen KL reference (the starter).")
    device: str = setting("cpu", "torch device: cpu, cuda, cuda:1, ...")
    seed: int = setting(0, "Seed of torch and Python RNGs (saved and restored on resume).")
    torch_threads: int = setting(0, "torch intra-op threads (0: torch's default).")
    reward_addr: str = setting(
        "localhost:50053",
        "gRPC address (host:port) of the reward service that scores rollouts.",
        alias="FLYWHEEL_REWARD_ADDR",
    )

    # --- algorithm --------------------------------------------------------------------------
    algo: Algo = setting(
        "ppo",
        "ppo (critic + GAE, Huang et al. 2024), rloo (Ahmadian et al. 2024) or grpo (Shao et al. 2024).",
    )
    batch_size: int = setting(8, "Prompts per rollout batch.")
    group_size: int = setting(1, "Samples per prompt (RLOO and GRPO need 2 or more; PPO usually 1).")
    minibatch_size: int = setting(0, "Sequences per optimizer step inside an epoch (0: the whole rollout).")
    epochs: int = setting(4, "Passes over each rollout (Huang et al. 2024: 4).")
    lr: float = setting(1e-4, "AdamW learning rate (constant).")
    adam_eps: float = setting(1e-5, "AdamW epsilon (Huang et al. 2024: 1e-5, not PyTorch's 1e-8).")
    max_grad_norm: float = setting(1.0, "Gradient clipping by global norm.")
    gamma: float = setting(1.0, "Discount (Huang et al. 2024: 1).")
    lam: float = setting(0.95, "GAE lambda (Huang et al. 2024: 0.95).")
    clip_policy: float = setting(0.2, "PPO ratio clip epsilon (Schulman et al. 2017).")
    clip_value: float = setting(0.2, "Value clip range around the rollout's values.")
    vf_coef: float = setting(0.1, "Value loss weight (shared backbone).")
    whiten_advantages: bool = setting(
        True, "Whiten advantages over the batch's response tokens.", alias="FLYWHEEL_TRAINER_WHITEN"
    )

    # --- KL to the reference ----------------------------------------------------------------
    kl_coef: float = setting(
        0.05, "Per-token KL penalty in the reward (fixed controller; the start value if adaptive)."
    )
    adaptive_kl: bool = setting(False, "Adaptive KL controller (Ziegler et al. 2019): init kl_init, target, horizon.")
    kl_init: float = setting(0.15, "Adaptive controller's initial coefficient.")
    kl_target: float = setting(6.0, "Adaptive controller's target KL per sequence, in nats.")
    kl_horizon: int = setting(10_000, "Adaptive controller's horizon, in samples.")
    kl_min: float = setting(
        0.0,
        "Adaptive controller's smallest coefficient (0: none). kl_min = kl_init only ever tightens the leash.",
    )
    kl_estimator: str = setting("k1", "Per-token KL estimator in the reward: k1, k2 or k3 (Schulman 2020).")
    grpo_beta: float = setting(0.04, "GRPO's KL loss weight (k3 estimator as a loss term, Shao et al. 2024).")

    # --- rollouts and reward ------------------------------------------------------------------
    max_new_tokens: int = setting(32, "Tokens generated per response.")
    max_prompt_tokens: int = setting(96, "Prompts are truncated on the left to this many tokens.")
    temperature: float = setting(0.7, "Sampling temperature; log-probs use the same temperature-scaled logits.")
    missing_eos_penalty: float | None = setting(
        -1.0,
        "EOS trick (Huang et al. 2024): a response with no EOS gets this (normalized) score. None: off.",
    )
    reward_norm: str = setting(
        "info",
        "Reward normalization: info (Reward.GetInfo score mean/std, running stats until it has them), "
        "running (running mean/std of scores), none.",
    )
    reward_clip: float = setting(10.0, "Normalized scores are clipped to +-this.")
    ptx_coef: float = setting(
        0.0,
        "Weight of a supervised loss on users' demonstrations (InstructGPT's PPO-ptx, Ouyang et al. 2022). 0: off.",
    )

    # --- prompts --------------------------------------------------------------------------------
    prompt_source: str = setting(
        "kafka",
        "kafka: flywheel.interactions, topped up from the pool; pool: the pool only.",
    )
    prompt_pool: list[str] = setting([], "Fallback prompts (empty: the policy corpus' prompts, else a built-in list).")
    consumer_group: str = setting("flywheel-trainer", "Kafka group for consumer lag.")
    poll_timeout_ms: int = setting(200, "How long a batch waits for live prompts.")

    # --- versions and the gate ------------------------------------------------------------------
    checkpoint_every: int = setting(10, "Updates between checkpoints (each one is gated).")
    max_steps: int = setting(0, "Stop after this many updates (0: run until stopped).")
    gate_prompts: int = setting(16, "Held-out prompts the gate evaluates.")
    gate_margin: float = setting(0.0, "Candidate's mean raw reward must beat the serving version's by more than this.")
    gate_kl_budget: float = setting(12.0, "Largest mean KL (nats per response) to the reference a candidate may have.")
    gate_min_tokens: float = setting(2.0, "Smallest mean response length, in tokens.")
    gate_max_tokens: float = setting(0.0, "Largest mean response length (0: 0.95 * max_new_tokens).")
    gate_max_repeat: float = setting(0.5, "Largest mean share of a response taken by its most frequent token.")
    gate_min_distinct2: float = setting(0.3, "Smallest mean share of distinct bigrams in a response.")
    gate_seed: int = setting(1234, "Sampling seed of the gate's generations (same for both versions).")
    gate_patience: int = setting(
        0,
        "After this many gate failures in a row, train on from the serving version's weights with a fresh "
        "optimizer (0: never): a policy that drifted where the gate refuses it stops drifting further.",
    )
    auto_promote: bool = setting(True, "Announce a candidate that passes the gate.")
    standby_poll_s: float = setting(2.0, "How often a standby trainer retries the active lock.")

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.algo in ALGOS, n, "algo", self.algo, f"use one of {', '.join(ALGOS)}")
        require(self.batch_size >= 1, n, "batch_size", self.batch_size, "use 1 or more")
        require(self.group_size >= 1, n, "group_size", self.group_size, "use 1 or more")
        if self.algo in ("rloo", "grpo"):
            require(
                self.group_size >= 2,
                n,
                "group_size",
                self.group_size,
                f"{self.algo} needs 2 or more samples per prompt",
            )
        rollout = self.batch_size * self.group_size
        require(
            self.minibatch_size == 0 or (1 <= self.minibatch_size <= rollout and rollout % self.minibatch_size == 0),
            n,
            "minibatch_size",
            self.minibatch_size,
            f"use 0 or a divisor of batch_size * group_size = {rollout}",
        )
        require(self.epochs >= 1, n, "epochs", self.epochs, "use 1 or more")
        require(self.lr > 0, n, "lr", self.lr, "use a positive learning rate")
        require(0 <= self.gamma <= 1, n, "gamma", self.gamma, "use 0..1")
        require(0 <= self.lam <= 1, n, "lam", self.lam, "use 0..1")
        require(self.clip_policy > 0, n, "clip_policy", self.clip_policy, "use a positive value such as 0.2")
        require(self.clip_value > 0, n, "clip_value", self.clip_value, "use a positive value such as 0.2")
        require(self.kl_coef >= 0, n, "kl_coef", self.kl_coef, "use 0 or more")
        require(self.kl_target > 0, n, "kl_target", self.kl_target, "use a positive number of nats")
        require(self.kl_horizon >= 1, n, "kl_horizon", self.kl_horizon, "use 1 or more samples")
        require(0 <= self.kl_min <= self.kl_init, n, "kl_min", self.kl_min, "use 0 (no floor) up to kl_init")
        require(self.kl_estimator in KL_ESTIMATORS, n, "kl_estimator", self.kl_estimator, "use k1, k2 or k3")
        require(self.max_new_tokens >= 1, n, "max_new_tokens", self.max_new_tokens, "use 1 or more")
        require(self.max_prompt_tokens >= 1, n, "max_prompt_tokens", self.max_prompt_tokens, "use 1 or more")
        require(self.temperature > 0, n, "temperature", self.temperature, "use a positive temperature (e.g. 0.7)")
        require(self.reward_norm in REWARD_NORMS, n, "reward_norm", self.reward_norm, "use info, running or none")
        require(self.reward_clip > 0, n, "reward_clip", self.reward_clip, "use a positive value")
        require(self.ptx_coef >= 0, n, "ptx_coef", self.ptx_coef, "use 0 (off) or more")
        require(self.prompt_source in PROMPT_SOURCES, n, "prompt_source", self.prompt_source, "use kafka or pool")
        require(self.checkpoint_every >= 1, n, "checkpoint_every", self.checkpoint_every, "use 1 or more")
        require(self.max_steps >= 0, n, "max_steps", self.max_steps, "use 0 (no limit) or more")
        require(self.gate_prompts >= 1, n, "gate_prompts", self.gate_prompts, "use 1 or more")
        require(self.gate_kl_budget > 0, n, "gate_kl_budget", self.gate_kl_budget, "use a positive number of nats")
        require(0 < self.gate_max_repeat <= 1, n, "gate_max_repeat", self.gate_max_repeat, "use a share in (0, 1]")
        require(0 <= self.gate_min_distinct2 <= 1, n, "gate_min_distinct2", self.gate_min_distinct2, "use 0..1")
        require(
            self.gate_patience >= 0, n, "gate_patience", self.gate_patience, "use 0 (off) or a count of checkpoints"
        )

    @property
    def rollout_size(self) -> int:
        """Sequences per rollout: batch_size prompts times group_size samples."""
        return self.batch_size * self.group_size

    @property
    def max_mean_tokens(self) -> float:
        return self.gate_max_tokens or 0.95 * self.max_new_tokens
