"""Checkpoints: the trainer's weights and state going into and out of the model store.

A checkpoint is a model-store version (the weights the policy replicas load; with
trainer.adapter = lora an adapter version naming its base, adapters.py) plus the trainer
state saved next to it (state.py). `Checkpointer.save` publishes the version, saves the state
and commits the consumed offsets (the Trainer then hands the version to the gate);
`Checkpointer.restore` resumes from the last saved state, or publishes the starter and starts
fresh on a first run, and cleans up after a crash between publishing and saving.

Each version's manifest records its lineage (`extra.lineage`, its ancestors; `reward_version`)
and `extra.offsets`: per "topic:partition" of the prompt source (and "pool", the cursor in the
fixed pool), the range [from, to) of offsets consumed since the previous checkpoint (or since
start-up), `from` None where it could not be read. `flywheel models lineage` prints them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.core import errors
from flywheel.core.modelstore import BaseRef, Manifest, ModelStore, save_pretrained
from flywheel.trainer import state
from flywheel.trainer.adapters import adapter_state, save_adapter, set_adapter_state
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.prompt_sources import PromptSource
from flywheel.trainer.reward_source import RewardSource
from flywheel.trainer.training_state import TrainingState, build_training_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` found."""

    state: TrainingState
    ungated: Manifest | None  # the last checkpoint, when the trainer stopped before gating it


class Checkpointer:
    """Publishes checkpoints to the model store and restores the training state from the last one."""

    def __init__(
        self,
        cfg: TrainerConfig,
        store: ModelStore,
        prompts: PromptSource,
        reward: RewardSource,
        directory: Path,
        keep_last: int = 5,
    ) -> None:
        self.cfg, self.store, self.prompts, self.reward = cfg, store, prompts, reward
        self.dir, self.keep_last = directory, keep_last
        self._since: dict[str, int] = {}  # the prompt source's position at the last checkpoint (or start)

    # ------------------------------------------------------------------ restore

    def restore(self, writes: bool = True) -> Restored:
        """The training state: from the last saved checkpoint, else fresh from the serving version.

        Also positions the prompt source and the RNGs (call with the active lock held). `writes=False`: a
        data-parallel trainer's other ranks, which read what rank 0's restore left and change nothing.
        """
        cfg = self.cfg
        if writes and not self.store.list_versions(cfg.model):
            if not cfg.init_path:
                raise errors.FailedPrecondition(
                    f"model store {self.store.root} has no {cfg.model!r} version: build the starter (flywheel models init) "
                    "or set FLYWHEEL_TRAINER_INIT_PATH"
                )
            self._publish_starter(cfg.init_path)
        saved = state.load_state(self.dir)
        if saved is None:
            st = build_training_state(cfg, self.store, self._serving_from_store())
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            self.prompts.seek({})
            self._since = self._position()
            return Restored(st, ungated=None)
        written_with = saved.config.get("adapter", "none")
        if written_with != cfg.adapter:
            raise errors.FailedPrecondition(
                f"the trainer state in {self.dir / state.STATE_FILE} was written with trainer.adapter = "
                f"{written_with}, the config says {cfg.adapter}: set it back, or move the file away to start "
                "afresh from the serving version"
            )
        st = build_training_state(cfg, self.store, saved.version)
        if st.adapter is not None:
            set_adapter_state(st.adapter, saved.adapter)
        st.step, st.serving_version, st.metrics = saved.step, saved.serving_version, dict(saved.metrics)
        st.value_head.load_state_dict(saved.value_head)
        st.optimizer.load_state_dict(saved.optimizer)
        st.kl_ctl.load_state_dict(saved.kl_ctl)
        st.moments.load_state_dict(saved.moments)
        self.prompts.seek(saved.offsets)
        self._since = dict(saved.offsets)
        saved.rng.restore()
        if writes:
            self._mark_orphans(saved.version)
        last = self.store.get(cfg.model, saved.version)
        ungated = last if last.version != cfg.reference_version and not last.gate else None
        return Restored(st, ungated)

    def _position(self) -> dict[str, int]:
        """Where the prompt source starts reading (a Kafka call on a fresh start: it may fail)."""
        try:
            return dict(self.prompts.position())
        except Exception as e:  # only the lineage record loses its start
            log.warning("the prompt source's start position is unknown (%s): lineage ranges start unknown", e)
            return {}

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

    def _mark_orphans(self, saved_version: int) -> None:
        """Versions published after the saved state (a crash before state.pt was written) are never served."""
        for m in self.store.list_versions(self.cfg.model):
            if m.version > saved_version and not m.gate and "trainer_step" in m.extra:
                self.store.update(
                    self.cfg.model, m.version, gate="failed: orphaned (the trainer stopped before saving its state)"
                )

    # ------------------------------------------------------------------ save

    def save(self, st: TrainingState) -> Manifest:
        """Publish the policy as a new version, save state.pt, then commit the consumed offsets."""
        cfg = self.cfg
        parent = self.store.get(cfg.model, st.version)
        offsets = self.prompts.position()
        extra: dict[str, Any] = {
            "trainer_step": st.step,
            "algo": cfg.algo,
            "reference_version": cfg.reference_version,
            "lineage": [*parent.extra.get("lineage", []), parent.version],
            "reward_version": int(getattr(self.reward, "version", -1)),  # a RewardSource need not know it
            "offsets": {key: [self._since.get(key), end] for key, end in sorted(offsets.items())},
        }
        metrics = {f"train.{k}": v for k, v in st.metrics.items()}
        adapter = st.adapter
        if adapter is not None:  # an adapter version: only the adapter, naming the base it applies to
            extra["base"] = BaseRef.of(self.store.get(cfg.model, cfg.reference_version)).to_dict()
        manifest = self.store.publish(
            cfg.model,
            lambda d: (
                save_pretrained(st.policy, st.tokenizer, d)
                if adapter is None
                else save_adapter(adapter, st.tokenizer, d)
            ),
            parent=st.version,
            metrics=metrics,
            extra=extra,
        )
        st.version = manifest.version
        state.save_state(
            self.dir,
            state.SavedState(
                step=st.step,
                version=st.version,
                serving_version=st.serving_version,
                value_head=st.value_head.state_dict(),
                optimizer=st.optimizer.state_dict(),
                kl_ctl=st.kl_ctl.state_dict(),
                moments=st.moments.state_dict(),
                rng=state.RngState.capture(),
                offsets=offsets,
                metrics=st.metrics,
                config=dataclasses.asdict(cfg),
                adapter=adapter_state(adapter) if adapter is not None else {},
            ),
        )
        self.prompts.commit(offsets)  # only now is the consumed work durable
        self._since = dict(offsets)
        return manifest

    def retain(self) -> None:
        """Delete old versions except the last `keep_last`, the promoted ones and the starter."""
        self.store.retain(self.cfg.model, self.keep_last)
