"""What serves: the gate's verdict on each checkpoint, announcing a version, promote and rollback.

gate.py measures a version on held-out prompts and decides; `Promoter` acts on the verdict
(record it, announce a passing version, ask for a restart from the serving weights after
`gate_patience` failures in a row) and carries the operator's Promote and Rollback, whose
FlywheelErrors say precisely why a call was refused. The Trainer calls it between two steps
(under its lock) and applies a requested restart before the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedModel

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore
from flywheel.trainer import gate
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.metrics import GAUGES, PROMOTED, REJECTED, RESTARTS
from flywheel.trainer.reward_source import RewardSource
from flywheel.trainer.training_state import TrainingState, load_lm

log = logging.getLogger(__name__)

Announce = Callable[[Any], None]  # takes a flywheel.v1.ModelUpdate


class Promoter:
    """Gate verdicts, announcements, Promote and Rollback for one trained model."""

    def __init__(
        self,
        cfg: TrainerConfig,
        store: ModelStore,
        reward: RewardSource,
        heldout: list[str],
        announce: Announce | None = None,
    ) -> None:
        self.cfg, self.store, self.reward, self.announce = cfg, store, reward, announce
        self.gate_prompts = [heldout[i % len(heldout)] for i in range(cfg.gate_prompts)]
        self.restart_version: int | None = None  # set: train on from these weights before the next step
        self._serving_eval: tuple[int, PreTrainedModel] | None = None  # (version, its model) cached
        self._serving_report_cache: tuple[tuple[int, int], gate.GateReport] | None = None
        self._gate_failures = 0  # in a row, since the last pass or restart
        self._ref_surprising: float | None = None

    # ------------------------------------------------------------------ the gate and announcing

    def _serving_report(self, st: TrainingState) -> gate.GateReport:
        """The serving version's held-out figures, measured again whenever the serving or the reward
        version changed. With both the same, the fixed gate seed would give the same report: reusing
        it halves the cost of a gate, a third of the trainer's time on a CPU."""
        v = st.serving_version
        reward_version = int(getattr(self.reward, "version", -1))  # a RewardSource need not know it
        key = (v, reward_version)
        if reward_version >= 0 and self._serving_report_cache is not None and self._serving_report_cache[0] == key:
            return self._serving_report_cache[1]
        report = self._measure_serving(st)
        self._serving_report_cache = (key, report)
        return report

    def _measure_serving(self, st: TrainingState) -> gate.GateReport:
        v = st.serving_version
        if v == self.cfg.reference_version:
            model = st.reference
        elif self._serving_eval is not None and self._serving_eval[0] == v:
            model = self._serving_eval[1]
        else:
            model = load_lm(self.store, self.cfg, v).eval()
            self._serving_eval = (v, model)
        return gate.evaluate(model, st.reference, st.tokenizer, self.gate_prompts, self.reward, self.cfg)

    def _reference_surprising(self, st: TrainingState, serving: gate.GateReport) -> float:
        """The reference's own share of surprising responses on the gate's prompts (measured once)."""
        if self._ref_surprising is None:
            if st.serving_version == self.cfg.reference_version:
                self._ref_surprising = serving.surprising
            else:
                report = gate.evaluate(
                    st.reference, st.reference, st.tokenizer, self.gate_prompts, self.reward, self.cfg
                )
                self._ref_surprising = report.surprising
        return self._ref_surprising

    def run_gate(self, manifest: Manifest, st: TrainingState) -> Manifest:
        """Gate `manifest` (the policy in memory): record the verdict; announce it if it passed."""
        t = time.perf_counter()
        st.policy.eval()
        try:
            cand = gate.evaluate(st.policy, st.reference, st.tokenizer, self.gate_prompts, self.reward, self.cfg)
            serving = self._serving_report(st)
        finally:
            st.policy.train()
        ref_surprising = self._reference_surprising(st, serving)
        passed, verdict = gate.decide(cand, serving, self.cfg, ref_surprising)
        metrics = {
            **cand.metrics(),
            **serving.metrics("gate.serving."),
            "gate.reference_surprising": ref_surprising,
            "gate.seconds": time.perf_counter() - t,
        }
        manifest = self.store.update(self.cfg.model, manifest.version, gate=verdict, metrics=metrics)
        log.info("gate v%d: %s", manifest.version, verdict)
        if passed:
            self._gate_failures = 0
            if not self.cfg.auto_promote:
                return manifest
            promoted = self._promote(manifest, "gate", st)
            # The candidate now serves: its report is the serving report (same weights, seed and reward).
            self._serving_report_cache = ((promoted.version, int(getattr(self.reward, "version", -1))), cand)
            return promoted
        REJECTED.inc()
        self._gate_failures += 1
        if self.cfg.restart_on_kl and not cand.kl < self.cfg.gate_kl_budget:
            # The policy drifted past the KL budget: every later checkpoint would be further out.
            self.request_restart(st.serving_version, "kl_budget")
        elif self.cfg.gate_patience and self._gate_failures >= self.cfg.gate_patience:
            # Early stopping with restarts: the held-out reward of the checkpoints has not beaten
            # the serving version's for `gate_patience` in a row, so the policy is drifting into what
            # the gate refuses (e.g. reward over-optimization). Start again from what serves.
            self.request_restart(st.serving_version, "gate_patience")
        return manifest

    def request_restart(self, version: int, reason: str) -> None:
        """Train on from `version`'s weights with a fresh optimizer before the next step (counted by reason)."""
        log.warning("training on from v%d with a fresh optimizer (%s)", version, reason)
        self.restart_version, self._gate_failures = version, 0
        RESTARTS.labels(reason).inc()

    def _promote(self, manifest: Manifest, reason: str, st: TrainingState) -> Manifest:
        gate_text = (
            manifest.gate if reason == "gate" else f"{reason}" + (f" ({manifest.gate})" if manifest.gate else "")
        )
        manifest = self.store.update(
            self.cfg.model, manifest.version, promoted=True, gate=gate_text, extra={"promoted_reason": reason}
        )
        if self.announce is not None:
            self.announce(self.store.to_update(manifest, reason))
        st.serving_version = manifest.version
        GAUGES["serving_version"].set(manifest.version)
        PROMOTED.labels(reason).inc()
        return manifest

    # ------------------------------------------------------------------ operator control

    def promote(self, version: int, reason: str, st: TrainingState, paused: bool) -> Manifest:
        """Announce `version` bypassing the gate. Refused while paused (a pause freezes what serves,
        except Rollback, the incident tool), for the version already serving, and for an unknown version."""
        m = self.store.get(self.cfg.model, version)  # NotFound names the known versions
        if paused:
            raise errors.FailedPrecondition(
                f"cannot promote v{version} while the trainer is paused: Resume first (Rollback works while paused)"
            )
        if version == st.serving_version:
            raise errors.FailedPrecondition(f"v{version} is already the serving version")
        self.store.verify(self.cfg.model, version)
        log.warning("manual promote of v%d (gate bypassed): %s", version, reason)
        return self._promote(m, "manual_promote", st)

    def rollback(self, version: int, reason: str, st: TrainingState) -> Manifest:
        """Serve an earlier promoted version (or the starter) again; training restarts from its weights."""
        m = self.store.get(self.cfg.model, version)
        promoted = [x.version for x in self.store.list_versions(self.cfg.model) if x.promoted]
        if not m.promoted and version != self.cfg.reference_version:
            raise errors.FailedPrecondition(
                f"v{version} was never promoted; Rollback only returns to a promoted version "
                f"({', '.join(f'v{v}' for v in promoted) or 'none yet'}) or the starter v{self.cfg.reference_version}; "
                "use Promote to serve an unpromoted version on purpose"
            )
        if version == st.serving_version:
            raise errors.FailedPrecondition(f"v{version} is already the serving version")
        self.store.verify(self.cfg.model, version)
        out = self._promote(m, "rollback", st)
        self.request_restart(version, "rollback")
        return out

    def take_restart(self) -> int | None:
        """The version to train on from, if a rollback or the gate asked for one (asked once)."""
        v, self.restart_version = self.restart_version, None
        return v
