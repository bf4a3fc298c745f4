"""Setup, resume and checkpoints: the trainer's weights and state going into and out of the model store.

A checkpoint is a model-store version (the weights the policy replicas load) plus the trainer
state saved next to it (state.py). `checkpoint` publishes the version, saves the state, commits
the consumed offsets, then hands the version to the gate (promotion.py). `setup` resumes from
the last saved state (or publishes the starter on a first run), and `_recover` cleans up after
a crash between publishing and saving.

`CheckpointMixin` is one part of `loop.Trainer`, whose `__init__` sets the attributes used here.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, save_pretrained
from flywheel.trainer import state
from flywheel.trainer.metrics import GAUGES
from flywheel.trainer.rollout import ValueHead

log = logging.getLogger(__name__)


class CheckpointMixin:
    """The Trainer's setup, resume after a crash, and checkpoint publishing."""

    # ------------------------------------------------------------------ setup and resume

    def _load_lm(self, version: int) -> Any:
        path = self.store.load_path(self.cfg.model, version)  # verified against its manifest
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)

    def setup(self) -> None:
        """Load models and, if there is one, the last checkpoint's state (call with the active lock held)."""
        cfg = self.cfg
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if not self.store.list_versions(cfg.model):
            if not cfg.init_path:
                raise errors.FailedPrecondition(
                    f"model store {self.store.root} has no {cfg.model!r} version: build the starter (flywheel models init) "
                    "or set FLYWHEEL_TRAINER_INIT_PATH"
                )
            self._publish_starter(cfg.init_path)
        saved = state.load_state(self.dir)
        start = saved["version"] if saved else self._serving_from_store()
        self.tok = AutoTokenizer.from_pretrained(self.store.load_path(cfg.model, start))
        if self.tok.pad_token_id is None or self.tok.pad_token_id == self.tok.eos_token_id:
            raise errors.FailedPrecondition(
                "the policy's tokenizer needs a pad token distinct from EOS (Huang et al. 2024)"
            )
        self.policy = self._load_lm(start)
        self.reference = self._load_lm(cfg.reference_version).eval().requires_grad_(False)
        self.value_head = ValueHead(self.policy.config.hidden_size).to(self.device)
        self._new_optimizer()
        self.version = start
        if saved is None:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            self.serving_version = start
            self.prompts.seek({})
        else:
            self.step, self.serving_version = saved["step"], saved["serving_version"]
            self.value_head.load_state_dict(saved["value_head"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.kl_ctl.load_state_dict(saved["kl_ctl"])
            self.moments.load_state_dict(saved["moments"])
            self.metrics = dict(saved.get("metrics", {}))
            self.prompts.seek(saved["offsets"])
            state.set_rng_state(saved["rng"])
            self._recover(saved)
        GAUGES["step"].set(self.step)
        GAUGES["serving_version"].set(self.serving_version)
        log.info("trainer ready at step %d, version %d, serving %d", self.step, self.version, self.serving_version)

    def _publish_starter(self, path: str) -> None:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path)

        self.store.publish(
            self.cfg.model,
            lambda d: save_pretrained(lm, tok, d),
            parent=None,
            version=0,
            extra={"lineage": [], "source": path},
        )

    def _serving_from_store(self) -> int:
        latest = self.store.latest(self.cfg.model, promoted_only=True)
        return latest.version if latest is not None else self.cfg.reference_version

    def _recover(self, saved: dict[str, Any]) -> None:
        """After a crash: mark orphan versions, and gate the last checkpoint if the gate never ran."""
        for m in self.store.list_versions(self.cfg.model):
            if m.version > saved["version"] and not m.gate and "trainer_step" in m.extra:
                self.store.update(
                    self.cfg.model, m.version, gate="failed: orphaned (the trainer stopped before saving its state)"
                )
        m = self.store.get(self.cfg.model, saved["version"])
        if m.version != self.cfg.reference_version and not m.gate:
            self.run_gate(m)

    def _new_optimizer(self) -> None:
        params = list(self.policy.parameters()) + list(self.value_head.parameters())
        # Huang et al. 2024: Adam eps 1e-5 (PyTorch's default 1e-8 differs from the TF original).
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, eps=self.cfg.adam_eps, weight_decay=0.0)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Manifest:
        """Publish the weights as a new version, save the trainer state, commit offsets, then gate."""
        cfg = self.cfg
        parent = self.store.get(cfg.model, self.version)

        def write(d: Any) -> None:
            save_pretrained(self.policy, self.tok, d)

        extra = {
            "trainer_step": self.step,
            "algo": cfg.algo,
            "reference_version": cfg.reference_version,
            "lineage": [*parent.extra.get("lineage", []), parent.version],
            "reward_version": int(getattr(self.reward, "version", -1)),
        }
        metrics = {f"train.{k}": v for k, v in self.metrics.items()}
        manifest = self.store.publish(cfg.model, write, parent=self.version, metrics=metrics, extra=extra)
        self.version = manifest.version
        offsets = self.prompts.position()
        state.save_state(
            self.dir,
            {
                "step": self.step,
                "version": self.version,
                "serving_version": self.serving_version,
                "value_head": self.value_head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(),
                "moments": self.moments.state_dict(),
                "rng": state.rng_state(),
                "offsets": offsets,
                "metrics": self.metrics,
                "config": dataclasses.asdict(cfg),
            },
        )
        self.prompts.commit(offsets)  # only now is the consumed work durable
        manifest = self.run_gate(manifest)
        self.store.retain(cfg.model, self.keep_last)
        return manifest
