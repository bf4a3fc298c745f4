"""The trainer's in-memory state: the models, the optimizer and the counters that a step changes.

`build_training_state` is the one place the models come from (the policy and the frozen
reference out of the model store, a fresh value head and optimizer); `Checkpointer.restore`
calls it, then loads a saved checkpoint's state into it when there is one. With
trainer.adapter = lora (adapters.py) the policy is the reference version's weights with a LoRA
adapter injected, and the reference is the same modules with the adapter switched off.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from peft import PeftModel

from flywheel.core import errors
from flywheel.core.modelstore import BaseRef, Manifest, ModelStore
from flywheel.trainer import adapters, ppo
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.rollout import ValueHead


@dataclasses.dataclass
class TrainingState:
    """What `Trainer.train_step` reads and changes; saved by checkpoints (weights and state.pt)."""

    policy: PreTrainedModel  # trained in place (with LoRA: the base with the adapter's layers injected)
    reference: adapters.Policy  # frozen: the KL anchor (with LoRA: the policy with its adapter switched off)
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
    adapter: PeftModel | None = None  # with trainer.adapter = lora: the peft model over the frozen base

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


def base_dtype(cfg: TrainerConfig) -> torch.dtype:
    """The frozen LoRA base's dtype (trainer.base_dtype): bfloat16 where CUDA supports it under auto."""
    if cfg.base_dtype == "auto":
        dev = torch.device(cfg.device)
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, cfg.base_dtype)


def load_lm(
    store: ModelStore, cfg: TrainerConfig, version: int, model: str = "", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A version of the trained model (or of `model`) from the store (verified against its manifest), on
    cfg.device. An adapter version comes merged into a copy of its base (the gate's serving copy)."""
    name = model or cfg.model
    m = store.get(name, version)
    if m.base is not None:
        base = adapters.base_of(store, m)
        peft = adapters.load_adapter(
            load_lm(store, cfg, base.version, base.model), store.load_path(name, version), False
        )
        merged: PreTrainedModel = peft.merge_and_unload()
        return merged
    path = store.load_path(name, version)
    lm: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # transformers wraps `to` with functools.wraps(nn.Module.to), which hides its bound signature.
    return lm.to(torch.device(cfg.device))  # type: ignore[arg-type]


def checkpointed(policy: PreTrainedModel, cfg: TrainerConfig) -> PreTrainedModel:
    """`policy` with gradient checkpointing where trainer.gradient_checkpointing asks for it. Non-reentrant:
    it needs no input that requires grad, which a frozen LoRA base's embeddings never give."""
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def load_policy(st: TrainingState, store: ModelStore, cfg: TrainerConfig, version: int) -> PreTrainedModel:
    """The policy at store `version`, for a restart: whole weights loaded anew, or with LoRA the adapter's
    tensors set in place (the base stays; `version` is an adapter on it or the base itself)."""
    if st.adapter is None:
        return checkpointed(load_lm(store, cfg, version), cfg)
    set_lora_weights(st.adapter, store, cfg, version)
    return st.policy


def set_lora_weights(peft: PeftModel, store: ModelStore, cfg: TrainerConfig, version: int) -> None:
    """The adapter of store `version` into `peft` (a fresh one for the base version itself)."""
    m, base = store.get(cfg.model, version), lora_base(store, cfg)
    if m.base is None:
        if version != cfg.reference_version:
            raise errors.FailedPrecondition(
                f"trainer.adapter = lora trains adapters on the reference version v{cfg.reference_version}, but "
                f"v{version} holds whole weights (trained without an adapter): set trainer.reference_version = "
                f"{version} to train adapters on it, or roll back to v{cfg.reference_version} or an adapter version"
            )
        adapters.reset_adapter(peft)
        return
    if m.base != BaseRef.of(base):
        raise errors.FailedPrecondition(
            f"{cfg.model} v{version} is an adapter for {m.base}, not for trainer.reference_version's "
            f"{BaseRef.of(base)}: set trainer.reference_version to its base, or roll back to v{cfg.reference_version}"
        )
    path = store.load_path(cfg.model, version)
    adapters.check_adapter_config(path, cfg, version)
    adapters.set_adapter_state(peft, adapters.read_adapter(path))


def lora_base(store: ModelStore, cfg: TrainerConfig) -> Manifest:
    """The reference version's manifest, which LoRA adapters are trained on (whole weights)."""
    base = store.get(cfg.model, cfg.reference_version)
    if base.base is not None:
        raise errors.FailedPrecondition(
            f"trainer.reference_version = {cfg.reference_version} is an adapter version: with trainer.adapter = "
            "lora it must be whole weights (the base the adapters are trained on)"
        )
    return base


def new_optimizer(policy: PreTrainedModel, value_head: ValueHead, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW over what trains: the whole policy, or with LoRA only the adapter (the frozen base has
    requires_grad off and no optimizer state), plus the value head."""
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
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
    peft: PeftModel | None = None
    reference: adapters.Policy
    if cfg.adapter == "lora":
        lora_base(store, cfg)
        base = load_lm(store, cfg, cfg.reference_version, dtype=base_dtype(cfg))
        dev = torch.device(cfg.device)
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # a fresh adapter's init is the seed's, whatever ran before in the process
            peft = adapters.attach_lora(base, cfg)
            set_lora_weights(peft, store, cfg, start)
        # Train mode from the start: LoRA's dropout then acts in every update, not only after the first
        # gate (which leaves the policy in train mode), so a resumed run takes the very same steps.
        policy = adapters.base_model(peft).train()
        reference = adapters.AdapterOff(peft)
    else:
        policy = load_lm(store, cfg, start)
        reference = load_lm(store, cfg, cfg.reference_version).eval().requires_grad_(False)
    policy = checkpointed(policy, cfg)
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
        adapter=peft,
    )
