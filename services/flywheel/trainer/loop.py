"""The one training loop: rollouts -> scores -> KL-penalised rewards -> advantages -> clipped updates.

`Trainer.train_step` is the algorithm and reads top to bottom (CleanRL style); the pure math
is in ppo.py, generation and log-probs in rollout.py, prompts in prompt_sources.py, scores in
reward_source.py. The rest of the Trainer comes from two mixins: setup, resume and checkpoints
in checkpoints.py (the state file in state.py), and the gate's verdicts, announcing and control
in promotion.py (the gate's measures in gate.py); its Prometheus metrics are in metrics.py.
Sources are cited where each detail is used (see ppo.py for the list); PPO-ptx is Ouyang et
al. 2022 (InstructGPT, arXiv 2203.02155) section 3.5.

Concurrency: `run()` owns the models in one thread; control calls (Pause, Promote, ...) from
the gRPC servicer take `self.lock`, so they act between two steps, never inside one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from flywheel.core import errors
from flywheel.core.modelstore import ModelStore
from flywheel.trainer import ppo, state
from flywheel.trainer.checkpoints import CheckpointMixin
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.metrics import GAUGES, PHASE_SECONDS
from flywheel.trainer.promotion import PromotionMixin
from flywheel.trainer.reward_source import RewardSource
from flywheel.trainer.rollout import forward, generate

log = logging.getLogger(__name__)

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


class Trainer(CheckpointMixin, PromotionMixin):
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
        for name, g in GAUGES.items():
            if name in m:
                g.set(m[name])
        GAUGES["step"].set(self.step)
        for phase, dt in (("generate", t1 - t0), ("score", t2 - t1), ("update", t3 - t2)):
            PHASE_SECONDS.labels(phase).observe(dt)

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
                    if self.paused:  # paused while this thread waited for the lock
                        continue
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
