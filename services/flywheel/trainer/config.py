"""The trainer's typed configuration (CleanRL's Args idea: every field carries its help text).

The defaults are the settings measured to learn from users' feedback (`flywheel bench
learning`; docs/ARCHITECTURE.md, "Training defaults worth knowing"); the implementation details
follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (arXiv 2403.17031) and
Ziegler et al. 2019 (arXiv 1909.08593). Why these values:
- RLOO (Ahmadian et al. 2024) with 4 samples a prompt at lr 3e-5: against the panel's own
  utility (an oracle reward) it reached a 0.89 win-rate in 250 updates with 95% of answers well
  formed, where PPO at lr 1e-4 plateaued near 0.70 and garbled a quarter of its answers.
- Temperature 1 (the policy as it is) and 96 new tokens: the starter's answers run to ~85.
- The win-rate peaks at 2-4 nats of KL; past that the policy over-optimizes the reward model.
  Fixed KL coefficients drifted (0.05 to 6.4 nats, 0.1 to 7.4, 0.2 to 5.5); the published
  adaptive controller shrank its coefficient ~10x while KL was under target, then could not grow
  it back in time. So: adaptive with a floor at its start value (it only tightens), target 3
  nats, a short horizon; the gate refuses versions past 6 nats.
- Training waits for a reward model that has learned something (reward_min_*), and a policy
  that drifts where the gate refuses it restarts from the serving weights (gate_patience,
  restart_on_kl) with a warmed-up fresh optimizer.
Every field can be set from the `trainer:` section of the YAML config file or from its
FLYWHEEL_TRAINER_* environment variable.
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
Adapter = Literal["none", "lora"]
ADAPTERS: tuple[Adapter, ...] = ("none", "lora")
BaseDtype = Literal["auto", "float32", "bfloat16"]
BASE_DTYPES: tuple[BaseDtype, ...] = ("auto", "float32", "bfloat16")
# Every linear layer of a Llama/Qwen-style decoder block (attention and MLP): LoRA on all of them
# learns close to a full fine-tune at the same rank (Hu et al. 2021; QLoRA, Dettmers et al. 2023).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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

    # --- adapters (docs/ARCHITECTURE.md, "LoRA adapter versions") ------------------------------
    adapter: Adapter = setting(
        "none",
        "none: train and publish whole weights. lora: train a LoRA adapter (peft) over the reference version's "
        "weights, which stay frozen and double as the KL reference (the adapter switched off: no second copy); "
        "each checkpoint is an adapter version of a few MB that names that base.",
    )
    lora_rank: int = setting(16, "LoRA rank r (trainer.adapter = lora).")
    lora_alpha: int = setting(32, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    lora_dropout: float = setting(
        0.05,
        "Dropout on the LoRA path's input in the update's forwards (0: none, and PPO's ratio at the first "
        "epoch is then exactly 1).",
    )
    lora_target_modules: list[str] = setting(
        list(LORA_TARGETS),
        "Module names (their last dotted part) that get a LoRA adapter; the default suits Llama/Qwen-style models.",
    )
    base_dtype: BaseDtype = setting(
        "auto",
        "dtype of the frozen base with trainer.adapter = lora: auto is bfloat16 on a CUDA device that supports it "
        "and float32 elsewhere. The adapter and the value head always train in float32 (mixed precision).",
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute the policy's activations in the backward pass instead of keeping them: much less memory for "
        "long answers or large models, about a third more compute per update.",
    )

    # --- algorithm --------------------------------------------------------------------------
    algo: Algo = setting(
        "rloo",
        "ppo (critic + GAE, Huang et al. 2024), rloo (Ahmadian et al. 2024) or grpo (Shao et al. 2024).",
    )
    batch_size: int = setting(4, "Prompts per rollout batch.")
    group_size: int = setting(4, "Samples per prompt (RLOO and GRPO need 2 or more; PPO usually 1).")
    minibatch_size: int = setting(0, "Sequences per optimizer step inside an epoch (0: the whole rollout).")
    epochs: int = setting(4, "Passes over each rollout (Huang et al. 2024: 4).")
    lr: float = setting(
        3e-5, "AdamW learning rate (constant; warmed up again after a restart, see restart_warmup_steps)."
    )
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
    adaptive_kl: bool = setting(True, "Adaptive KL controller (Ziegler et al. 2019): init kl_init, target, horizon.")
    kl_init: float = setting(0.1, "Adaptive controller's initial coefficient.")
    kl_target: float = setting(3.0, "Adaptive controller's target KL per sequence, in nats.")
    kl_horizon: int = setting(40, "Adaptive controller's horizon, in samples.")
    kl_min: float = setting(
        0.1,
        "Adaptive controller's smallest coefficient (0: none). kl_min = kl_init only ever tightens the leash.",
    )
    kl_estimator: str = setting("k1", "Per-token KL estimator in the reward: k1, k2 or k3 (Schulman 2020).")
    grpo_beta: float = setting(0.04, "GRPO's KL loss weight (k3 estimator as a loss term, Shao et al. 2024).")

    # --- rollouts and reward ------------------------------------------------------------------
    max_new_tokens: int = setting(96, "Tokens generated per response.")
    max_prompt_tokens: int = setting(96, "Prompts are truncated on the left to this many tokens.")
    temperature: float = setting(1.0, "Sampling temperature; log-probs use the same temperature-scaled logits.")
    missing_eos_penalty: float | None = setting(
        -1.0,
        "EOS trick (Huang et al. 2024): a response with no EOS gets this (normalized) score. None: off.",
    )
    empty_response_score: float = setting(
        -2.0,
        "Normalized score of a response with no text: given without asking the reward service (which "
        "refuses empty text), so a policy that collapses to empty answers is pushed away from them.",
    )
    surprise_logprob: float = setting(
        -8.0,
        "A response token whose log-prob under the reference (at the sampling temperature) is below this makes "
        "the response surprising: text the starter would never write. On the starter corpus every such answer "
        "was garbled and every garbled answer had one. Check `gate.reference_surprising` in a version's metrics: "
        "the reference's own share should be small.",
    )
    surprise_score: float | None = setting(
        -2.0,
        "Normalized score of a surprising response in training (a perplexity-under-the-reference defence against "
        "reward over-optimization, like the EOS trick's fixed score). None: off.",
    )
    reward_norm: str = setting(
        "info",
        "Reward normalization: info (Reward.GetInfo score mean/std, running stats until it has them), "
        "running (running mean/std of scores), none.",
    )
    reward_clip: float = setting(10.0, "Normalized scores are clipped to +-this.")
    ptx_coef: float = setting(
        0.0,
        "Weight of a supervised loss on demonstrations (InstructGPT's PPO-ptx, Ouyang et al. 2022). 0: off.",
    )
    ptx_data: str = setting(
        "",
        "PPO-ptx's data: empty for users' demonstrations (Kafka); `corpus` for the built-in starter's training "
        "corpus (InstructGPT mixes in the pretraining distribution); or a JSONL file of {prompt, answer} lines.",
    )

    # --- reward readiness: train only against a reward model that has learned something -------
    reward_min_pairs: int = setting(
        50,
        "Train only once the serving reward version was trained on this many preference pairs (0: no minimum).",
    )
    reward_min_unseen_pairs: int = setting(
        40,
        "... and its accuracy was measured on this many pairs it had not trained on: the held-out split plus the "
        "online window (new pairs scored before training on them; reward `online_window`). 0: no minimum.",
    )
    reward_min_accuracy: float = setting(
        0.7,
        "... with at least this pairwise accuracy on those unseen pairs (0: any). PPO against an untrained reward "
        "head only drifts the policy; the trainer waits and says why (status waiting_for, metric, log).",
    )
    reward_keep_accuracy: float = setting(
        0.65,
        "Once training, it goes on while that accuracy stays at or above this (the held-out set grows and shifts "
        "with the policy, so its accuracy moves); below it, or for a version trained on fewer than "
        "reward_min_pairs (a rollback to the starter), training waits again.",
    )
    reward_poll_s: float = setting(2.0, "How often a trainer waiting for its reward model asks again.")

    # --- prompts --------------------------------------------------------------------------------
    prompt_source: str = setting(
        "kafka",
        "kafka: flywheel.interactions, topped up from the pool; pool: the pool only.",
    )
    prompt_pool: list[str] = setting([], "Fallback prompts (empty: the policy corpus' prompts, else a built-in list).")
    consumer_group: str = setting("flywheel-trainer", "Kafka group for consumer lag.")
    poll_timeout_ms: int = setting(200, "How long a batch waits for live prompts.")

    # --- versions and the gate ------------------------------------------------------------------
    checkpoint_every: int = setting(5, "Updates between checkpoints (each one is gated).")
    max_steps: int = setting(0, "Stop after this many updates (0: run until stopped).")
    gate_prompts: int = setting(32, "Held-out prompts the gate evaluates.")
    gate_margin: float = setting(0.0, "Candidate's mean raw reward must beat the serving version's by more than this.")
    gate_kl_budget: float = setting(6.0, "Largest mean KL (nats per response) to the reference a candidate may have.")
    gate_min_tokens: float = setting(2.0, "Smallest mean response length, in tokens.")
    gate_max_tokens: float = setting(0.0, "Largest mean response length (0: 0.95 * max_new_tokens).")
    gate_max_repeat: float = setting(0.5, "Largest mean share of a response taken by its most frequent token.")
    gate_min_distinct2: float = setting(0.3, "Smallest mean share of distinct bigrams in a response.")
    gate_max_surprising_increase: float = setting(
        0.1,
        "Largest share of responses with a surprising token (see surprise_logprob) beyond the reference's own "
        "share on the gate's prompts (1: off).",
    )
    gate_seed: int = setting(1234, "Sampling seed of the gate's generations (same for both versions).")
    gate_patience: int = setting(
        5,
        "After this many gate failures in a row, train on from the serving version's weights with a fresh "
        "optimizer (0: never): a policy that drifted where the gate refuses it stops drifting further. A "
        "checkpoint refused for its KL to the reference restarts at once (restart_on_kl).",
    )
    restart_on_kl: bool = setting(
        True, "Restart from the serving weights as soon as the gate refuses a checkpoint for its KL budget."
    )
    restart_warmup_steps: int = setting(
        10,
        "After a restart the learning rate climbs linearly from lr/10 to lr over this many steps: a fresh Adam "
        "otherwise takes full-size first steps (0: none).",
    )
    max_failed_steps: int = setting(
        5,
        "After this many failed steps in a row (errors other than an unavailable reward service), restart from "
        "the serving weights instead of failing the same way again.",
    )
    auto_promote: bool = setting(True, "Announce a candidate that passes the gate.")
    standby_poll_s: float = setting(2.0, "How often a standby trainer retries the active lock.")

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.algo in ALGOS, n, "algo", self.algo, f"use one of {', '.join(ALGOS)}")
        require(self.adapter in ADAPTERS, n, "adapter", self.adapter, "use none (whole weights) or lora")
        require(self.base_dtype in BASE_DTYPES, n, "base_dtype", self.base_dtype, "use auto, float32 or bfloat16")
        require(
            self.base_dtype != "bfloat16" or self.adapter == "lora",
            n,
            "base_dtype",
            self.base_dtype,
            "bfloat16 is for the frozen base under trainer.adapter = lora: whole weights train in float32",
        )
        require(self.lora_rank >= 1, n, "lora_rank", self.lora_rank, "use 1 or more (16 is a good start)")
        require(self.lora_alpha > 0, n, "lora_alpha", self.lora_alpha, "use 1 or more (e.g. 2 * lora_rank)")
        require(0 <= self.lora_dropout < 1, n, "lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        require(
            bool(self.lora_target_modules) and all(m.strip() for m in self.lora_target_modules),
            n,
            "lora_target_modules",
            self.lora_target_modules,
            f"list module names, e.g. {','.join(LORA_TARGETS)}",
        )
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
        require(
            0 <= self.gate_max_surprising_increase <= 1,
            n,
            "gate_max_surprising_increase",
            self.gate_max_surprising_increase,
            "use a share in [0, 1] (1: off)",
        )
        require(0 <= self.gate_min_distinct2 <= 1, n, "gate_min_distinct2", self.gate_min_distinct2, "use 0..1")
        require(self.reward_min_pairs >= 0, n, "reward_min_pairs", self.reward_min_pairs, "use 0 or more")
        require(
            self.reward_min_unseen_pairs >= 0,
            n,
            "reward_min_unseen_pairs",
            self.reward_min_unseen_pairs,
            "use 0 or more",
        )
        require(0 <= self.reward_min_accuracy <= 1, n, "reward_min_accuracy", self.reward_min_accuracy, "use 0..1")
        require(0 <= self.reward_keep_accuracy <= 1, n, "reward_keep_accuracy", self.reward_keep_accuracy, "use 0..1")
        require(self.reward_poll_s > 0, n, "reward_poll_s", self.reward_poll_s, "use a positive number of seconds")
        require(self.restart_warmup_steps >= 0, n, "restart_warmup_steps", self.restart_warmup_steps, "use 0 or more")
        require(self.max_failed_steps >= 1, n, "max_failed_steps", self.max_failed_steps, "use 1 or more")
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
