"""The trainer's in-memory state: the models, the optimizer and the counters that a step changes.

`build_training_state` is the one place the models come from (the policy and the frozen
reference out of the model store, a fresh value head and optimizer); `Checkpointer.restore`
calls it, then loads a saved checkpoint's state into it when there is one.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.trainer import ppo
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.rollout import ValueHead


@dataclasses.dataclass
class TrainingState:
    """What `Trainer.train_step` reads and changes; saved by checkpoints (weights and state.pt)."""

    policy: PreTrainedModel  # trained in place
    reference: PreTrainedModel  # frozen: the KL anchor
    value_head: ValueHead  # the critic (PPO only)
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer  # over the policy and the value head
    kl_ctl: ppo.AdaptiveKLController
    moments: ppo.RunningMoments  # of raw rewards, for reward normalization
    step: int  # updates taken
    version: int  # the store version the policy's weights were last loaded from or published as
    serving_version: int  # what the policy replicas were last told to serve
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last step
    warmup_left: int = 0  # steps of learning-rate warmup still to take (after a restart)

    def restart_from(self, version: int, policy: PreTrainedModel, cfg: TrainerConfig) -> None:
        """Train on from `policy` (the weights of `version`) with a fresh, warmed-up optimizer."""
        self.policy, self.version = policy, version
        self.optimizer = new_optimizer(policy, self.value_head, cfg)
        self.warmup_left = cfg.restart_warmup_steps

    def set_lr(self, cfg: TrainerConfig) -> None:
        """cfg.lr, or during a warmup a linear ramp from lr/10: a fresh Adam's first steps are full-size
        (its moment estimates start at zero), which after a restart threw the policy past the KL budget."""
        frac = self.warmup_left / cfg.restart_warmup_steps if cfg.restart_warmup_steps else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * (1.0 - 0.9 * frac)


def load_lm(store: ModelStore, cfg: TrainerConfig, version: int) -> PreTrainedModel:
    """A version of the trained model from the store (verified against its manifest), on cfg.device."""
    path = store.load_path(cfg.model, version)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # transformers wraps `to` with functools.wraps(nn.Module.to), which hides its bound signature.
    return model.to(torch.device(cfg.device))  # type: ignore[arg-type]


def new_optimizer(policy: PreTrainedModel, value_head: ValueHead, cfg: TrainerConfig) -> torch.optim.Optimizer:
    params = list(policy.parameters()) + list(value_head.parameters())
    # Huang et al. 2024: Adam eps 1e-5 (PyTorch's default 1e-8 differs from the TF original).
    return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0)


def kl_controller(cfg: TrainerConfig) -> ppo.AdaptiveKLController:
    if cfg.adaptive_kl:
        return ppo.AdaptiveKLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon, cfg.kl_min)
    return ppo.FixedKLController(cfg.kl_coef)


def build_training_state(cfg: TrainerConfig, store: ModelStore, start: int) -> TrainingState:
    """Fresh state with the policy at store version `start` and the reference at cfg.reference_version."""
    tok = AutoTokenizer.from_pretrained(store.load_path(cfg.model, start))
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise errors.FailedPrecondition(
            "the policy's tokenizer needs a pad token distinct from EOS (Huang et al. 2024)"
        )
    policy = load_lm(store, cfg, start)
    reference = load_lm(store, cfg, cfg.reference_version).eval().requires_grad_(False)
    value_head = ValueHead(policy.config.hidden_size).to(torch.device(cfg.device))
    return TrainingState(
        policy=policy,
        reference=reference,
        value_head=value_head,
        tokenizer=tok,
        optimizer=new_optimizer(policy, value_head, cfg),
        kl_ctl=kl_controller(cfg),
        moments=ppo.RunningMoments(),
        step=0,
        version=start,
        serving_version=start,
    )
