"""The one training loop: rollouts -> scores -> KL-penalised rewards -> advantages -> clipped updates.

`Trainer.train_step` is the algorithm and reads top to bottom (CleanRL style); the pure math
is in ppo.py, generation and log-probs in rollout.py, the gate in gate.py, checkpoint state
in state.py. Sources are cited where each detail is used (see ppo.py for the list); PPO-ptx
is Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155) section 3.5.

Concurrency: `run()` owns the models in one thread; control calls (Pause, Promote, ...) from
the gRPC servicer take `self.lock`, so they act between two steps, never inside one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore, save_pretrained
from flywheel.trainer import gate, ppo, state
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.reward_source import RewardSource
from flywheel.trainer.rollout import ValueHead, forward, generate

log = logging.getLogger(__name__)

_G = {
    name: Gauge(f"flywheel_trainer_{name}", doc)
    for name, doc in {
        "step": "PPO updates taken.",
        "reward_mean": "Mean raw reward-model score of the last rollout.",
        "reward_std": "Std of raw scores of the last rollout.",
        "kl": "Mean sequence KL to the reference of the last rollout (nats).",
        "kl_coef": "Current KL coefficient.",
        "entropy": "Mean per-token policy entropy of the last update.",
        "clip_frac": "Fraction of tokens whose ratio was clipped.",
        "approx_kl": "Approximate KL between rollout and updated policy.",
        "value_loss": "Value loss of the last update.",
        "samples_per_second": "Sequences per second over rollout plus update.",
        "serving_version": "Version the policy replicas are told to serve.",
    }.items()
}
PHASE_SECONDS = Histogram(
    "flywheel_trainer_phase_seconds",
    "Time per phase of a step.",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
PROMOTED = Counter("flywheel_trainer_versions_promoted", "Versions announced to the policy replicas.", ["reason"])
REJECTED = Counter("flywheel_trainer_versions_rejected", "Checkpoints the gate refused.")
RESTARTS = Counter(
    "flywheel_trainer_restarts_from_serving", "Times training went back to the serving weights (gate_patience)."
)

Announce = Callable[[Any], None]  # takes a flywheel.v1.ModelUpdate


def sft_loss(model: Any, tok: Any, demos: list[tuple[str, str]], device: torch.device) -> torch.Tensor:
    """PPO-ptx (InstructGPT): next-token loss on the answer tokens of users' demonstrations."""
    rows = [
        (tok(p)["input_ids"], tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        for p, a in demos
    ]
    L = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, (p, a) in enumerate(rows):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        labels[b, len(p) : len(p) + len(a)] = torch.tensor(a)
    ids, labels = ids.to(device), labels.to(device)
    return model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss


class Trainer:
    """Continuous PPO / RLOO / GRPO against a RewardSource, with checkpoints, the gate and control."""

    def __init__(
        self,
        cfg: TrainerConfig,
        store: ModelStore,
        reward: RewardSource,
        prompts: Any,  # a PoolPrompts or KafkaPrompts (take, position, seek, commit, lag)
        announce: Announce | None = None,
        keep_last: int = 5,
        reward_info: Callable[[], Any] | None = None,
        heldout: list[str] | None = None,
    ) -> None:
        self.cfg, self.store, self.reward, self.prompts = cfg, store, reward, prompts
        self.announce, self.keep_last, self.reward_info = announce, keep_last, reward_info
        self.dir = state.trainer_dir(store.root, cfg.model)
        self.active = state.ActiveLock(self.dir)
        self.lock = threading.RLock()
        self.status = "starting"
        self.step, self.version, self.serving_version = 0, 0, 0
        self.paused = bool(state.load_control(self.dir).get("paused", False))
        self.metrics: dict[str, float] = {}
        self.device = torch.device(cfg.device)
        self.kl_ctl = (
            ppo.AdaptiveKLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon, cfg.kl_min)
            if cfg.adaptive_kl
            else ppo.FixedKLController(cfg.kl_coef)
        )
        self.moments = ppo.RunningMoments()
        # Held-out gate prompts: given (split_pool of the pool), else the pool itself.
        self.gate_prompts = list(heldout or prompts.pool)
        self.gate_prompts = [self.gate_prompts[i % len(self.gate_prompts)] for i in range(cfg.gate_prompts)]
        self.last_lag = 0
        self._serving_eval: tuple[int, Any] | None = None
        self._reset_to: int | None = None
        self._gate_failures = 0  # in a row, since the last pass or reset

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
        _G["step"].set(self.step)
        _G["serving_version"].set(self.serving_version)
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

    # ------------------------------------------------------------------ the algorithm

    def _normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Reward normalization (Huang et al. 2024: scores with mean 0, std 1 on policy samples)."""
        cfg = self.cfg
        self.moments.update(raw)
        mean, std = self.moments.mean, self.moments.std
        if cfg.reward_norm == "none":
            return raw
        if cfg.reward_norm == "info" and self.reward_info is not None:
            info = self.reward_info()
            if info is not None and info.score_std > 0:
                mean, std = info.score_mean, info.score_std
        if self.moments.count < 2 and cfg.reward_norm == "running":
            return raw - mean
        return ((raw - mean) / max(std, 1e-6)).clamp(-cfg.reward_clip, cfg.reward_clip)

    def train_step(self) -> dict[str, float]:
        """One rollout and one update; returns its metrics."""
        cfg, dev, k = self.cfg, self.device, self.cfg.group_size
        t0 = time.perf_counter()

        # 1. Rollout: prompts (live traffic first), k samples each with our own policy copy.
        prompts = [p for p in self.prompts.take(cfg.batch_size) for _ in range(k)]  # prompt-major groups
        batch = generate(self.policy, self.tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_tokens)
        t1 = time.perf_counter()

        # 2. Score with the reward model; normalize; EOS trick (Huang et al. 2024).
        raw = torch.tensor(self.reward.score(batch.prompts, batch.responses), dtype=torch.float32, device=dev)  # (B,)
        scores = ppo.apply_eos_trick(self._normalize(raw), batch.has_eos, cfg.missing_eos_penalty)  # (B,)
        t2 = time.perf_counter()

        # 3. Log-probs under the rollout policy and the frozen reference, values; per-token KL.
        use_critic = cfg.algo == "ppo"
        head = self.value_head if use_critic else None
        B = len(batch)
        mb_size = cfg.minibatch_size or B
        # One epoch over one minibatch is on-policy: the rollout log-probs and values are the
        # update's own, detached (TRL does the same with num_iterations=1); one forward saved.
        single_pass = cfg.epochs == 1 and mb_size == B
        with torch.no_grad():
            batch.ref_logprobs, _, _ = forward(self.reference, batch, cfg.temperature)
            if not single_pass:
                batch.logprobs, batch.values, _ = forward(self.policy, batch, cfg.temperature, head)
        if single_pass:
            live = forward(self.policy, batch, cfg.temperature, head, with_entropy=True)  # with grad
            batch.logprobs = live[0].detach()
            batch.values = live[1].detach() if use_critic else None
        mask = batch.response_mask  # (B, T)
        kl = ppo.kl_per_token(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator) * mask  # (B, T)
        seq_kl = kl.sum(1)  # (B,)

        # 4. Advantages.
        returns = None
        if cfg.algo == "ppo":  # per-token KL in the reward (Ziegler et al. 2019), GAE (gamma 1, lam 0.95)
            rewards, _ = ppo.token_rewards(scores, kl, mask, self.kl_ctl.value)
            advantages, returns = ppo.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        elif cfg.algo == "rloo":  # leave-one-out baseline on the KL-penalised sequence reward (Ahmadian et al. 2024)
            advantages = ppo.rloo_advantages(scores - self.kl_ctl.value * seq_kl, k).unsqueeze(1) * mask
        else:  # GRPO: group-normalised scores; KL is a loss term instead (Shao et al. 2024)
            advantages = ppo.grpo_advantages(scores, k).unsqueeze(1) * mask
        if cfg.whiten_advantages and cfg.algo != "grpo":
            advantages = ppo.whiten(advantages, mask)  # Huang et al. 2024: whitened advantages

        # 5. Update: `epochs` passes of clipped PPO over shuffled minibatches (Schulman et al. 2017).
        demos = self.prompts.demonstrations() if cfg.ptx_coef > 0 else []
        stats: dict[str, list[float]] = {
            "pg_loss": [],
            "value_loss": [],
            "clip_frac": [],
            "approx_kl": [],
            "entropy": [],
        }
        for _ in range(cfg.epochs):
            for idx in torch.randperm(B).split(mb_size):
                mb, mb_mask = batch.index(idx), mask[idx]
                if single_pass:
                    logprobs, values, entropy = (x[idx] if x is not None else None for x in live)
                else:
                    logprobs, values, entropy = forward(self.policy, mb, cfg.temperature, head, with_entropy=True)
                pg, st = ppo.policy_loss(logprobs, mb.logprobs, advantages[idx], mb_mask, cfg.clip_policy)
                loss = pg
                if use_critic:
                    vl, _ = ppo.value_loss(values, mb.values, returns[idx], mb_mask, cfg.clip_value)
                    loss = loss + cfg.vf_coef * vl
                    stats["value_loss"].append(float(vl.detach()))
                if cfg.algo == "grpo" and cfg.grpo_beta > 0:
                    loss = loss + cfg.grpo_beta * ppo.masked_mean(
                        ppo.kl_per_token(logprobs, mb.ref_logprobs, "k3"), mb_mask
                    )
                if demos:  # PPO-ptx (InstructGPT): keep the policy close to what users demonstrated
                    pick = random.sample(demos, min(len(demos), len(idx)))
                    loss = loss + cfg.ptx_coef * sft_loss(self.policy, self.tok, pick, dev)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                self.optimizer.step()
                stats["pg_loss"].append(float(pg.detach()))
                stats["clip_frac"].append(float(st["clip_frac"]))
                stats["approx_kl"].append(float(st["approx_kl"]))
                stats["entropy"].append(float(ppo.masked_mean(entropy.detach(), mb_mask)))
        # Adaptive KL (Ziegler et al. 2019) is fed the mean sequence KL of this rollout.
        self.kl_ctl.update(float(seq_kl.mean()), B)
        t3 = time.perf_counter()

        self.step += 1
        m = {
            "reward_mean": float(raw.mean()),
            "reward_std": float(raw.std()) if B > 1 else 0.0,
            "score_norm_mean": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": self.kl_ctl.value,
            "eos_rate": float(batch.has_eos.float().mean()),
            "response_tokens": float(mask.sum(1).mean()),
            "samples_per_second": B / (t3 - t0),
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_update": t3 - t2,
            **{name: sum(v) / len(v) for name, v in stats.items() if v},
        }
        self.metrics = m
        self._export(m, t0, t1, t2, t3)
        return m

    def _export(self, m: dict[str, float], t0: float, t1: float, t2: float, t3: float) -> None:
        for name, g in _G.items():
            if name in m:
                g.set(m[name])
        _G["step"].set(self.step)
        for phase, dt in (("generate", t1 - t0), ("score", t2 - t1), ("update", t3 - t2)):
            PHASE_SECONDS.labels(phase).observe(dt)

    # ------------------------------------------------------------------ checkpoints and the gate

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
        _G["serving_version"].set(manifest.version)
        PROMOTED.labels(reason).inc()
        return manifest

    # ------------------------------------------------------------------ control (gRPC servicer)

    def _require_active(self, what: str) -> None:
        if self.status in ("standby", "starting", "stopped"):
            raise errors.FailedPrecondition(f"cannot {what}: this trainer is {self.status}, not the active one")

    def pause(self, reason: str = "") -> None:
        """Stop taking steps after the current one (persisted: a restarted trainer stays paused)."""
        self._require_active("pause")
        self.paused = True
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

    # ------------------------------------------------------------------ the service loop

    def run(self, stop: threading.Event) -> None:
        """Wait for the active lock (standby), set up, then train until `stop` or max_steps."""
        self.status = "standby"
        if not self.active.wait(stop, self.cfg.standby_poll_s):
            self.status = "stopped"
            return
        try:
            with self.lock:
                self.setup()
                self.status = "paused" if self.paused else "training"
            backoff = 1.0
            while not stop.is_set():
                if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                    break
                if self.paused:
                    self.status = "paused"
                    stop.wait(0.2)
                    continue
                with self.lock:
                    self.status = "training"
                    self._apply_reset()
                    try:
                        self.train_step()
                        self.last_lag = self.prompts.lag()  # Kafka clients are not thread-safe: read it here
                        backoff = 1.0
                    except errors.Unavailable as e:  # the reward service or Kafka is away: wait, retry
                        log.warning("step failed, retrying in %.0fs: %s", backoff, e)
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    if self.step % self.cfg.checkpoint_every == 0:
                        self.checkpoint()
        finally:
            self.status = "stopped"
            self.active.release()
