"""LoRA adapters for the trainer (trainer.adapter = lora): the policy is a peft model over a frozen base.

The base is the store's `reference_version` (whole weights); the policy is that model with LoRA
layers injected by peft (`attach_lora`); the KL reference is the same modules with the adapter
switched off (`AdapterOff`), so the base is in memory once. Only the adapter's parameters (and
the value head, for PPO) train. A checkpoint is an adapter version: `adapter_model.safetensors` +
`adapter_config.json` exactly as `PeftModel.save_pretrained` writes them (so `PeftModel.from_pretrained`
and vLLM's LoRA loading read them unchanged), plus the tokenizer, with the base named in the
manifest (`modelstore.BaseRef`: model, version and the digest of its files).

peft is imported only here and only when an adapter is used: the whole-weights path never loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core import errors
from flywheel.core.modelstore import MAX_SHARD_SIZE, BaseRef, Manifest, ModelStore
from flywheel.trainer.config import TrainerConfig

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterOff:
    """The KL reference under LoRA: the policy's own modules with its adapter switched off.

    Not a model: `as_model` enters peft's `disable_adapter()` around each use, so a forward of the
    reference is the base's forward and no second copy of the weights exists."""

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft = peft_model

    @contextlib.contextmanager
    def model(self) -> Iterator[PreTrainedModel]:
        with self.peft.disable_adapter():
            yield base_model(self.peft)


def base_model(peft_model: PeftModel) -> PreTrainedModel:
    """The transformers model under the peft wrapper, with the LoRA layers injected in its modules."""
    model = peft_model.get_base_model()
    assert isinstance(model, PreTrainedModel)
    return model


Policy = PreTrainedModel | AdapterOff  # what rollout.generate and rollout.forward accept


@contextlib.contextmanager
def as_model(model: Policy) -> Iterator[PreTrainedModel]:
    """`model` itself, or for an AdapterOff the base with the adapter switched off while the block runs."""
    if isinstance(model, AdapterOff):
        with model.model() as m:
            yield m
    else:
        yield model


def lora_config(cfg: TrainerConfig) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def attach_lora(base: PreTrainedModel, cfg: TrainerConfig) -> PeftModel:
    """A fresh LoRA adapter over `base` (its B matrices are zero: the policy starts as the base)."""
    from peft import get_peft_model

    try:
        return get_peft_model(base, lora_config(cfg))
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        raise errors.FailedPrecondition(
            f"trainer.lora_target_modules = {cfg.lora_target_modules}: {e}. This model's linear layers are "
            f"named {', '.join(linear)}: set FLYWHEEL_TRAINER_LORA_TARGET_MODULES to some of them"
        ) from None


def check_adapter_config(path: str | os.PathLike, cfg: TrainerConfig, version: int) -> None:
    """Refuse to train on an adapter version whose rank, alpha or targets differ from the config's:
    the settings would be accepted and not honoured (the loaded adapter keeps its own)."""
    saved = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    got = (saved.get("r"), float(saved.get("lora_alpha") or 0), sorted(saved.get("target_modules") or []))
    want = (cfg.lora_rank, float(cfg.lora_alpha), sorted(cfg.lora_target_modules))
    if got != want:
        raise errors.FailedPrecondition(
            f"adapter version {version} was trained with (rank, alpha, targets) = {got}; the config says "
            f"{want}: set trainer.lora_* back to the adapter's, or roll back to the base "
            "version to start a new adapter"
        )


def load_adapter(base: PreTrainedModel, path: str | os.PathLike, trainable: bool) -> PeftModel:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)


def adapter_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors (what adapter_model.safetensors holds), detached copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def set_adapter_state(peft_model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (adapter_state's names) into the policy's adapter, in place."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors)  # torch's (missing_keys, unexpected_keys)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise errors.FailedPrecondition(
            f"adapter tensors do not fit this policy's adapter (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): same base and lora_* settings are needed"
        )


def read_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / ADAPTER_WEIGHTS))


def reset_adapter(peft_model: PeftModel) -> None:
    """Fresh adapter weights (B = 0): the policy equals its base again (a restart from the base)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", True)


def save_adapter(peft_model: PeftModel, tok: PreTrainedTokenizerBase, out: str | os.PathLike) -> None:
    """An adapter version's files: PEFT's own layout (safetensors + adapter config) and the tokenizer."""
    peft_model.save_pretrained(str(out), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tok.save_pretrained(str(out))


def base_of(store: ModelStore, m: Manifest) -> Manifest:
    """The full version adapter version `m` applies to, checked to be the very weights it was trained on."""
    ref = m.base
    assert ref is not None
    base = store.get(ref.model, ref.version)
    if BaseRef.of(base) != ref:
        raise errors.FailedPrecondition(
            f"{m.model} v{m.version} is an adapter for {ref}, but the store's {ref.model} v{ref.version} holds "
            f"other weights ({BaseRef.of(base)}): it cannot be applied"
        )
    if base.base is not None:
        raise errors.FailedPrecondition(f"{m.model} v{m.version}'s base {ref} is itself an adapter version")
    return base
