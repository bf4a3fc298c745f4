"""The one training loop: rollouts -> scores -> KL-penalised rewards -> advantages -> clipped updates.

`Trainer.train_step` is the algorithm and reads top to bottom (CleanRL style) over a typed
`TrainingState` (training_state.py: the policy, reference, value head, tokenizer, optimizer,
KL controller and reward moments, built in one place). The pure math is in ppo.py, what differs
between PPO, RLOO and GRPO in algorithms.py, generation and log-probs in rollout.py, prompts in
prompt_sources.py, scores in reward_source.py. The Trainer holds two collaborators: a
`Checkpointer` (checkpoints.py: restore, publish, the state file of state.py) and a `Promoter`
(promotion.py: the gate's verdicts, announcing, Promote and Rollback; the gate's measures are in
gate.py). Its Prometheus metrics are in metrics.py; `build_trainer` wires it all. Sources are
cited where each detail is used (see ppo.py for the list); PPO-ptx is Ouyang et al. 2022
(InstructGPT, arXiv 2203.02155) section 3.5.

Never stalling: `run()` takes no step until the reward model is worth training against
(reward_source.not_ready), scores empty or refused answers without failing the step
(reward_source.score_each), counts failed steps, and after `max_failed_steps` in a row restarts
from the serving weights (as the Promoter asks after a KL refusal or `gate_patience` refusals).

Concurrency: `run()` owns the models in one thread; control calls (Pause, Promote, ...) from
the gRPC servicer take `self.lock`, so they act between two steps, never inside one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore
from flywheel.trainer import ppo
from flywheel.trainer.algorithms import algorithm
from flywheel.trainer.checkpoints import Checkpointer
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.metrics import FAILED_STEPS, GAUGES, PHASE_SECONDS
from flywheel.trainer.promotion import Announce, Promoter
from flywheel.trainer.prompt_sources import PromptSource, ptx_examples
from flywheel.trainer.reward_source import RewardInfo, RewardSource, not_ready, score_each
from flywheel.trainer.rollout import forward, generate
from flywheel.trainer.state import ActiveLock, load_control, save_control, trainer_dir
from flywheel.trainer.training_state import TrainingState, load_policy

log = logging.getLogger(__name__)

Status = Literal["starting", "standby", "waiting", "training", "paused", "stopped"]


def sft_loss(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, demos: list[tuple[str, str]], device: torch.device
) -> torch.Tensor:
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
    loss: torch.Tensor = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
    return loss


class Trainer:
    """Continuous PPO / RLOO / GRPO against a RewardSource, with checkpoints, the gate and control."""

    def __init__(
        self,
        cfg: TrainerConfig,
        prompts: PromptSource,
        reward: RewardSource,
        checkpointer: Checkpointer,
        promoter: Promoter,
        directory: Path,  # the trainer's own folder in the store (trainer_dir)
        reward_info: Callable[[], RewardInfo | None] | None = None,
        ptx_data: list[tuple[str, str]] | None = None,  # PPO-ptx examples (else users' demonstrations)
    ) -> None:
        self.cfg, self.prompts, self.reward, self.reward_info = cfg, prompts, reward, reward_info
        self.ptx_data = ptx_data or []
        self.checkpointer, self.promoter = checkpointer, promoter
        self.algorithm = algorithm(cfg)
        self.dir = directory
        self.active = ActiveLock(directory)
        self.lock = threading.RLock()
        self.status: Status = "starting"
        self.paused = bool(load_control(directory).get("paused", False))
        self.device = torch.device(cfg.device)
        self.last_lag = 0
        self.waiting_for = ""  # why training waits for the reward model ("" when it does not)
        self.failing_steps, self.last_error = 0, ""  # steps failed in a row, and the last one's error
        self._state: TrainingState | None = None

    @property
    def state(self) -> TrainingState:
        """The models and counters; there once `setup` ran (in `run`, after the active lock)."""
        if self._state is None:
            raise errors.FailedPrecondition(f"the trainer is {self.status}: its models are not loaded yet")
        return self._state

    # What the status RPC reports, also before the models are loaded.
    @property
    def step(self) -> int:
        return self._state.step if self._state else 0

    @property
    def version(self) -> int:
        return self._state.version if self._state else 0

    @property
    def serving_version(self) -> int:
        return self._state.serving_version if self._state else 0

    @property
    def metrics(self) -> dict[str, float]:
        return self._state.metrics if self._state else {}

    def setup(self) -> None:
        """Load the training state (resuming the last checkpoint if any); call with the active lock held."""
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        restored = self.checkpointer.restore()
        self._state = restored.state
        if restored.ungated is not None:  # the trainer stopped between saving a checkpoint and gating it
            self.promoter.run_gate(restored.ungated, restored.state)
        GAUGES["step"].set(self.step)
        GAUGES["serving_version"].set(self.serving_version)
        log.info("trainer ready at step %d, version %d, serving %d", self.step, self.version, self.serving_version)

    # ------------------------------------------------------------------ the algorithm

    def _normalize(self, raw: torch.Tensor, moments: ppo.RunningMoments, info: RewardInfo | None) -> torch.Tensor:
        """Reward normalization (Huang et al. 2024: scores with mean 0, std 1 on policy samples).
        NaN (an unscored sample) stays NaN."""
        cfg = self.cfg
        moments.update(raw[~raw.isnan()])
        mean, std = moments.mean, moments.std
        if cfg.reward_norm == "none":
            return raw
        if cfg.reward_norm == "info" and info is not None and info.score_std > 0:
            mean, std = info.score_mean, info.score_std
        if moments.count < 2 and cfg.reward_norm == "running":
            return raw - mean
        return ((raw - mean) / max(std, 1e-6)).clamp(-cfg.reward_clip, cfg.reward_clip)

    def _reward_info(self) -> RewardInfo | None:
        return self.reward_info() if self.reward_info is not None else None

    def waiting_for_reward(self) -> str:
        """Why training waits for the reward model now ("" when it may train; see reward_source.not_ready)."""
        if self.reward_info is None:  # a RewardSource without GetInfo (tests): nothing to wait for
            return ""
        return not_ready(self._reward_info(), self.cfg, training=self.step > 0 and not self.waiting_for)

    def train_step(self) -> dict[str, float]:
        """One rollout and one update; returns its metrics."""
        st, algo = self.state, self.algorithm
        cfg, dev, k = self.cfg, self.device, self.cfg.group_size
        t0 = time.perf_counter()

        # 1. Rollout: prompts (live traffic first), k samples each with our own policy copy.
        prompts = [p for p in self.prompts.take(cfg.batch_size) for _ in range(k)]  # prompt-major groups
        batch = generate(st.policy, st.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_tokens)
        t1 = time.perf_counter()

        # 2. Score with the reward model; normalize; EOS trick (Huang et al. 2024). An empty answer
        # (or one the reward service refuses) is a legitimate sample with a fixed, low score.
        raw = torch.tensor(score_each(self.reward, batch.prompts, batch.responses), dtype=torch.float32, device=dev)
        unscored = raw.isnan()  # (B,)
        scores = self._normalize(raw, st.moments, self._reward_info() if cfg.reward_norm == "info" else None)
        scores = ppo.apply_eos_trick(scores, batch.has_eos, cfg.missing_eos_penalty)
        scores = torch.where(unscored, torch.full_like(scores, cfg.empty_response_score), scores)  # (B,)
        raw = raw[~unscored]  # the reward model's own scores, for the metrics
        t2 = time.perf_counter()

        # 3. Log-probs under the rollout policy and the frozen reference, values; per-token KL.
        head = st.value_head if algo.critic else None
        B = len(batch)
        mb_size = cfg.minibatch_size or B
        # One epoch over one minibatch is on-policy: the rollout log-probs and values are the
        # update's own, detached (TRL does the same with num_iterations=1); one forward saved.
        single_pass = cfg.epochs == 1 and mb_size == B
        with torch.no_grad():
            ref_logprobs, _, _ = forward(st.reference, batch, cfg.temperature)
            if not single_pass:
                old_logprobs, old_values, _ = forward(st.policy, batch, cfg.temperature, head)
        if single_pass:
            live = forward(st.policy, batch, cfg.temperature, head, with_entropy=True)  # with grad
            old_logprobs = live[0].detach()
            old_values = live[1].detach() if live[1] is not None else None
        mask = batch.response_mask  # (B, T)
        kl = ppo.kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, T)
        seq_kl = kl.sum(1)  # (B,)
        # Text the reference would never write gets a fixed low score, whatever the reward model thinks
        # of it: the garbled answers reward over-optimization finds (see ppo.surprising).
        surprising = ppo.surprising(ref_logprobs, mask, cfg.surprise_logprob)  # (B,)
        if cfg.surprise_score is not None:
            scores = torch.where(surprising & ~unscored, torch.full_like(scores, cfg.surprise_score), scores)

        # 4. Advantages: the algorithm's own (PPO: KL in the reward and GAE; RLOO; GRPO).
        advantages, returns = algo.advantages(scores, kl, mask, old_values, st.kl_ctl.value)

        # 5. Update: `epochs` passes of clipped PPO over shuffled minibatches (Schulman et al. 2017).
        demos = (self.ptx_data or self.prompts.demonstrations()) if cfg.ptx_coef > 0 else []
        stats: dict[str, list[float]] = {
            "pg_loss": [],
            "value_loss": [],
            "clip_frac": [],
            "approx_kl": [],
            "entropy": [],
        }
        st.set_lr(cfg)
        for _ in range(cfg.epochs):
            for idx in torch.randperm(B).split(mb_size):
                mb_mask = mask[idx]
                if single_pass:
                    logprobs, values, entropy = (x[idx] if x is not None else None for x in live)
                else:
                    logprobs, values, entropy = forward(
                        st.policy, batch.index(idx), cfg.temperature, head, with_entropy=True
                    )
                assert logprobs is not None and entropy is not None  # with_entropy=True
                pg, pg_stats = ppo.policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb_mask, cfg.clip_policy)
                loss = pg
                if returns is not None and values is not None and old_values is not None:  # the critic (PPO)
                    vl, _ = ppo.value_loss(values, old_values[idx], returns[idx], mb_mask, cfg.clip_value)
                    loss = loss + cfg.vf_coef * vl
                    stats["value_loss"].append(float(vl.detach()))
                kl_loss = algo.kl_loss(logprobs, ref_logprobs[idx], mb_mask)
                if kl_loss is not None:  # GRPO: the KL to the reference as a loss term
                    loss = loss + kl_loss
                if demos:  # PPO-ptx (InstructGPT): keep the policy close to what users demonstrated
                    pick = random.sample(demos, min(len(demos), len(idx)))
                    loss = loss + cfg.ptx_coef * sft_loss(st.policy, st.tokenizer, pick, dev)
                st.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(st.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                st.optimizer.step()
                stats["pg_loss"].append(float(pg.detach()))
                stats["clip_frac"].append(float(pg_stats["clip_frac"]))
                stats["approx_kl"].append(float(pg_stats["approx_kl"]))
                stats["entropy"].append(float(ppo.masked_mean(entropy.detach(), mb_mask)))
        # Adaptive KL (Ziegler et al. 2019) is fed the mean sequence KL of this rollout.
        st.kl_ctl.update(float(seq_kl.mean()), B)
        t3 = time.perf_counter()

        st.step += 1
        st.warmup_left = max(0, st.warmup_left - 1)
        m = {
            "reward_mean": float(raw.mean()) if len(raw) else float("nan"),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "unscored_share": float(unscored.float().mean()),
            "surprising_share": float(surprising.float().mean()),
            "score_norm_mean": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": st.kl_ctl.value,
            "eos_rate": float(batch.has_eos.float().mean()),
            "response_tokens": float(mask.sum(1).mean()),
            "samples_per_second": B / (t3 - t0),
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_update": t3 - t2,
            **{name: sum(v) / len(v) for name, v in stats.items() if v},
        }
        st.metrics = m
        self._export(m, t0, t1, t2, t3)
        return m

    def _export(self, m: dict[str, float], t0: float, t1: float, t2: float, t3: float) -> None:
        for name, g in GAUGES.items():
            if name in m:
                g.set(m[name])
        GAUGES["step"].set(self.step)
        for phase, dt in (("generate", t1 - t0), ("score", t2 - t1), ("update", t3 - t2)):
            PHASE_SECONDS.labels(phase).observe(dt)

    # ------------------------------------------------------------------ checkpoints and restarts

    def checkpoint(self) -> Manifest:
        """Publish the weights as a new version, save the trainer state, commit offsets, then gate."""
        manifest = self.checkpointer.save(self.state)
        manifest = self.promoter.run_gate(manifest, self.state)
        self.checkpointer.retain()
        return manifest

    def apply_restart(self) -> None:
        """After a rollback (or gate_patience failures), train on from those weights with a fresh optimizer."""
        version = self.promoter.take_restart()
        if version is not None:
            policy = load_policy(self.state, self.checkpointer.store, self.cfg, version)
            self.state.restart_from(version, policy, self.cfg)

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
            while not stop.is_set():
                if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                    break
                if self.paused:
                    self.status = "paused"
                    stop.wait(0.2)
                    continue
                if self._waits_for_reward():
                    stop.wait(self.cfg.reward_poll_s)
                    continue
                with self.lock:
                    if self.paused:  # paused while this thread waited for the lock
                        continue
                    self.status = "training"
                    self.apply_restart()
                    try:
                        self.train_step()
                        self.last_lag = self.prompts.lag()  # Kafka clients are not thread-safe: read it here
                    except Exception as e:
                        delay = self._step_failed(e)
                    else:
                        delay = self._step_succeeded()
                        if self.step % self.cfg.checkpoint_every == 0:
                            self.checkpoint()
                if delay:  # outside the lock: control calls go on meanwhile
                    stop.wait(delay)
        finally:
            self.status = "stopped"
            self.active.release()

    def _waits_for_reward(self) -> bool:
        """Check the reward model (before each step); say once when training starts or stops waiting."""
        why = self.waiting_for_reward()
        if why and not self.waiting_for:
            log.warning("training waits for the reward model: %s", why)
        elif self.waiting_for and not why:
            log.info("the reward model is ready: training (was: %s)", self.waiting_for)
        self.waiting_for = why
        GAUGES["waiting_for_reward"].set(1 if why else 0)
        if why:
            self.status = "waiting"
        return bool(why)

    def _step_succeeded(self) -> float:
        self.failing_steps, self.last_error = 0, ""
        GAUGES["failing_steps"].set(0)
        return 0.0

    def _step_failed(self, e: Exception) -> float:
        """Count and report a failed step; the seconds to wait before the next. An unavailable reward
        service is waited for with backoff; any other error, `max_failed_steps` in a row, restarts from
        the serving weights, and if it goes on as many again after that, the loop stops (the service
        exits and is restarted: a crash loop is louder than a trainer that fails quietly)."""
        self.failing_steps += 1
        self.last_error = f"{type(e).__name__}: {e}"
        GAUGES["failing_steps"].set(self.failing_steps)
        backoff = min(2.0 ** (self.failing_steps - 1), 30.0)
        if isinstance(e, errors.Unavailable):  # the reward service or Kafka is away: wait, retry
            FAILED_STEPS.labels("unavailable").inc()
            log.warning("step failed, retrying in %.0fs: %s", backoff, e)
            return backoff
        FAILED_STEPS.labels("error").inc()
        log.warning("step failed (%d in a row): %s", self.failing_steps, self.last_error, exc_info=e)
        n = self.cfg.max_failed_steps
        if self.failing_steps >= 2 * n:
            raise e
        if self.failing_steps == n:
            self.promoter.request_restart(self.serving_version, "failing_steps")
        return backoff

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
            save_control(self.dir, {"paused": True, "reason": reason})
        log.warning("paused: %s", reason or "(no reason given)")

    def resume(self) -> None:
        self._require_active("resume")
        self.paused = False
        save_control(self.dir, {"paused": False})

    def promote(self, version: int, reason: str = "") -> Manifest:
        """Announce `version` bypassing the gate (see Promoter.promote for when it is refused)."""
        with self.lock:
            self._require_active("promote")
            return self.promoter.promote(version, reason, self.state, self.paused)

    def rollback(self, version: int, reason: str = "") -> Manifest:
        """Serve an earlier promoted version (or the starter) again; training restarts from its weights."""
        with self.lock:
            self._require_active("roll back")
            return self.promoter.rollback(version, reason, self.state)

    def versions(self) -> list[Manifest]:
        """Every stored version of the trained model, oldest first."""
        return self.checkpointer.store.list_versions(self.cfg.model)


def build_trainer(
    cfg: TrainerConfig,
    store: ModelStore,
    reward: RewardSource,
    prompts: PromptSource,
    heldout: list[str],
    announce: Announce | None = None,
    keep_last: int = 5,
    reward_info: Callable[[], RewardInfo | None] | None = None,
) -> Trainer:
    """A Trainer of `cfg.model` in `store`, gated on the `heldout` prompts (split_pool's second part)."""
    directory = trainer_dir(store.root, cfg.model)
    checkpointer = Checkpointer(cfg, store, prompts, reward, directory, keep_last)
    promoter = Promoter(cfg, store, reward, heldout, announce)
    ptx = ptx_examples(cfg.ptx_data, cfg.seed) if cfg.ptx_coef > 0 else []
    return Trainer(cfg, prompts, reward, checkpointer, promoter, directory, reward_info, ptx)
