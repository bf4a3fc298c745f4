"""What serves: the gate's verdict on each checkpoint, announcing a version, and operator control.

gate.py measures a version on held-out prompts and decides; this module acts on the verdict
(record it, announce a passing version, restart from the serving weights after `gate_patience`
failures in a row) and carries the control calls of the gRPC servicer (pause, resume, promote,
rollback), whose FlywheelErrors say precisely why a call was refused.

`PromotionMixin` is one part of `loop.Trainer`, whose `__init__` sets the attributes used here.
"""

from __future__ import annotations

import logging
import time

from flywheel.core import errors
from flywheel.core.modelstore import Manifest
from flywheel.trainer import gate, state
from flywheel.trainer.metrics import GAUGES, PROMOTED, REJECTED, RESTARTS

log = logging.getLogger(__name__)


class PromotionMixin:
    """The Trainer's gate verdicts, announcements and control (pause, resume, promote, rollback)."""

    # ------------------------------------------------------------------ the gate and announcing

    def _serving_report(self) -> gate.GateReport:
        """The serving version's held-out figures (recomputed each time: the reward model moves)."""
        v = self.serving_version
        if v == self.cfg.reference_version:
            model = self.reference
        elif self._serving_eval is not None and self._serving_eval[0] == v:
            model = self._serving_eval[1]
        else:
            model = self._load_lm(v).eval()
            self._serving_eval = (v, model)
        return gate.evaluate(model, self.reference, self.tok, self.gate_prompts, self.reward, self.cfg)

    def run_gate(self, manifest: Manifest) -> Manifest:
        """Gate `manifest` (the policy in memory): record the verdict; announce it if it passed."""
        t = time.perf_counter()
        self.policy.eval()
        try:
            cand = gate.evaluate(self.policy, self.reference, self.tok, self.gate_prompts, self.reward, self.cfg)
            serving = self._serving_report()
        finally:
            self.policy.train()
        passed, verdict = gate.decide(cand, serving, self.cfg)
        metrics = {**cand.metrics(), **serving.metrics("gate.serving."), "gate.seconds": time.perf_counter() - t}
        manifest = self.store.update(self.cfg.model, manifest.version, gate=verdict, metrics=metrics)
        log.info("gate v%d: %s", manifest.version, verdict)
        if passed:
            self._gate_failures = 0
            return self._promote(manifest, "gate") if self.cfg.auto_promote else manifest
        REJECTED.inc()
        self._gate_failures += 1
        if self.cfg.gate_patience and self._gate_failures >= self.cfg.gate_patience:
            # Early stopping with restarts: the held-out reward of the checkpoints has not beaten
            # the serving version's for `gate_patience` in a row, so the policy is drifting into what
            # the gate refuses (e.g. reward over-optimization). Start again from what serves.
            log.info(
                "%d gate failures in a row: training on from serving v%d", self._gate_failures, self.serving_version
            )
            self._reset_to, self._gate_failures = self.serving_version, 0
            RESTARTS.inc()
        return manifest

    def _promote(self, manifest: Manifest, reason: str) -> Manifest:
        gate_text = (
            manifest.gate if reason == "gate" else f"{reason}" + (f" ({manifest.gate})" if manifest.gate else "")
        )
        manifest = self.store.update(
            self.cfg.model, manifest.version, promoted=True, gate=gate_text, extra={"promoted_reason": reason}
        )
        if self.announce is not None:
            self.announce(self.store.to_update(manifest, reason))
        self.serving_version = manifest.version
        GAUGES["serving_version"].set(manifest.version)
        PROMOTED.labels(reason).inc()
        return manifest

    # ------------------------------------------------------------------ control (gRPC servicer)

    def _require_active(self, what: str) -> None:
        if self.status in ("standby", "starting", "stopped"):
            raise errors.FailedPrecondition(f"cannot {what}: this trainer is {self.status}, not the active one")

    def pause(self, reason: str = "") -> None:
        """Stop taking steps; returns once the step in progress (and any version it promotes) is done.

        Persisted: a restarted trainer stays paused. The flag is set before the lock is taken, so
        the loop starts no step after the current one while the caller waits.
        """
        self._require_active("pause")
        self.paused = True
        with self.lock:
            state.save_control(self.dir, {"paused": True, "reason": reason})
        log.warning("paused: %s", reason or "(no reason given)")

    def resume(self) -> None:
        self._require_active("resume")
        self.paused = False
        state.save_control(self.dir, {"paused": False})

    def promote(self, version: int, reason: str = "") -> Manifest:
        """Announce `version` bypassing the gate. Refused while paused (a pause freezes what serves,
        except Rollback, the incident tool), for the version already serving, and for an unknown version."""
        with self.lock:
            self._require_active("promote")
            m = self.store.get(self.cfg.model, version)  # NotFound names the known versions
            if self.paused:
                raise errors.FailedPrecondition(
                    f"cannot promote v{version} while the trainer is paused: Resume first (Rollback works while paused)"
                )
            if version == self.serving_version:
                raise errors.FailedPrecondition(f"v{version} is already the serving version")
            self.store.verify(self.cfg.model, version)
            log.warning("manual promote of v%d (gate bypassed): %s", version, reason)
            return self._promote(m, "manual_promote")

    def rollback(self, version: int, reason: str = "") -> Manifest:
        """Serve an earlier promoted version (or the starter) again; training restarts from its weights."""
        with self.lock:
            self._require_active("roll back")
            m = self.store.get(self.cfg.model, version)
            promoted = [x.version for x in self.store.list_versions(self.cfg.model) if x.promoted]
            if not m.promoted and version != self.cfg.reference_version:
                raise errors.FailedPrecondition(
                    f"v{version} was never promoted; Rollback only returns to a promoted version "
                    f"({', '.join(f'v{v}' for v in promoted) or 'none yet'}) or the starter v{self.cfg.reference_version}; "
                    "use Promote to serve an unpromoted version on purpose"
                )
            if version == self.serving_version:
                raise errors.FailedPrecondition(f"v{version} is already the serving version")
            self.store.verify(self.cfg.model, version)
            out = self._promote(m, "rollback")
            self._reset_to = version
            return out

    def _apply_reset(self) -> None:
        """After a rollback (or gate_patience failures), train on from those weights with a fresh optimizer."""
        if self._reset_to is None:
            return
        v, self._reset_to = self._reset_to, None
        self.policy = self._load_lm(v)
        self.version = v
        self._new_optimizer()
