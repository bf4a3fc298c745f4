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
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core import errors
from flywheel.core.modelstore import Manifest, ModelStore
from flywheel.trainer import ppo
from flywheel.trainer.algorithms import algorithm
from flywheel.trainer.checkpoints import Checkpointer
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.distributed import Alone, Command, Group, row_seed
from flywheel.trainer.metrics import FAILED_STEPS, GAUGES, PHASE_SECONDS
from flywheel.trainer.promotion import Announce, Promoter
from flywheel.trainer.prompt_sources import PromptSource, ptx_examples
from flywheel.trainer.reward_source import RewardInfo, RewardSource, not_ready, score_each
from flywheel.trainer.rollout import PolicyForward, forward, generate
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
        group: Group | None = None,  # the ranks of a data-parallel trainer (distributed.py); alone by default
    ) -> None:
        self.cfg, self.prompts, self.reward, self.reward_info = cfg, prompts, reward, reward_info
        self.group: Group = group or Alone()
        # ((ids of the policy and the head), their DDP-wrapped forward)
        self._trainable: tuple[tuple[int, int], nn.Module] | None = None
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

    def _normalize(
        self, raw: torch.Tensor, moments: ppo.RunningMoments, info: RewardInfo | None, everyone: torch.Tensor
    ) -> torch.Tensor:
        """Reward normalization (Huang et al. 2024: scores with mean 0, std 1 on policy samples), its
        statistics fed `everyone`'s scores (every rank's). NaN (an unscored sample) stays NaN."""
        cfg = self.cfg
        moments.update(everyone[~everyone.isnan()])
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

    def train_step(self, prompts: list[str] | None = None) -> dict[str, float]:
        """One rollout and one update on `prompts` (else the prompt source's next batch); returns its metrics.
        With several ranks (distributed.py) each runs it on the same prompts, its own share of the rows."""
        st, algo, group = self.state, self.algorithm, self.group
        cfg, dev, k = self.cfg, self.device, self.cfg.group_size
        t0 = time.perf_counter()

        # 1. Rollout: prompts (live traffic first), k samples each with our own policy copy; this rank's
        # share of whole groups. Data parallel, each row samples from its own generator seeded by its place
        # in the whole batch, so the rollout is the same on any number of ranks.
        everyone = [p for p in (prompts or self.prompts.take(cfg.batch_size)) for _ in range(k)]  # prompt-major
        share = len(everyone) // group.world
        first = group.rank * share
        seeds = [row_seed(cfg.seed, st.step, first + i) for i in range(share)] if group.row_seeded else None
        batch = generate(
            st.policy,
            st.tokenizer,
            everyone[first : first + share],
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.max_prompt_tokens,
            row_seeds=seeds,
        )
        t1 = time.perf_counter()

        # 2. Score with the reward model; normalize; EOS trick (Huang et al. 2024). An empty answer
        # (or one the reward service refuses) is a legitimate sample with a fixed, low score.
        raw = torch.tensor(score_each(self.reward, batch.prompts, batch.responses), dtype=torch.float32, device=dev)
        unscored = raw.isnan()  # (B,)
        all_raw = group.gather(raw)  # every rank's scores: the normalization's statistics see the whole batch
        info = self._reward_info() if cfg.reward_norm == "info" else None
        scores = self._normalize(raw, st.moments, info, all_raw)
        scores = ppo.apply_eos_trick(scores, batch.has_eos, cfg.missing_eos_penalty)
        scores = torch.where(unscored, torch.full_like(scores, cfg.empty_response_score), scores)  # (B,)
        t2 = time.perf_counter()

        # 3. Log-probs under the rollout policy and the frozen reference, values; per-token KL.
        head = st.value_head if algo.critic else None
        trainable = self._trainable_forward(head)
        many = group.world > 1
        B = len(batch)
        mb_size = cfg.minibatch_size // group.world if cfg.minibatch_size else B
        # One epoch over one minibatch is on-policy: the rollout log-probs and values are the
        # update's own, detached (TRL does the same with num_iterations=1); one forward saved.
        single_pass = cfg.epochs == 1 and mb_size == B
        with torch.no_grad():
            ref_logprobs, _, _ = forward(st.reference, batch, cfg.temperature)
            if not single_pass:
                old_logprobs, old_values, _ = forward(st.policy, batch, cfg.temperature, head)
        if single_pass:
            live = trainable(batch, cfg.temperature, with_entropy=True)  # with grad
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

        # 4. Advantages: the algorithm's own (PPO: KL in the reward and GAE; RLOO; GRPO), whitened over
        # every rank's batch.
        reduce = group.sum if many else None
        advantages, returns = algo.advantages(scores, kl, mask, old_values, st.kl_ctl.value, reduce)

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
                    logprobs, values, entropy = trainable(batch.index(idx), cfg.temperature, with_entropy=True)
                assert logprobs is not None and entropy is not None  # with_entropy=True
                # Several ranks: each loss is a sum over this rank's tokens divided by every rank's, and DDP's
                # mean over ranks is made a sum (x world), so the gradient is the whole batch's.
                n_tokens = group.sum(mb_mask.sum()) if many else None
                pg, pg_stats = ppo.policy_loss(
                    logprobs, old_logprobs[idx], advantages[idx], mb_mask, cfg.clip_policy, n_tokens
                )
                loss = pg
                if returns is not None and values is not None and old_values is not None:  # the critic (PPO)
                    vl, _ = ppo.value_loss(values, old_values[idx], returns[idx], mb_mask, cfg.clip_value, n_tokens)
                    loss = loss + cfg.vf_coef * vl
                    stats["value_loss"].append(float(vl.detach()) * group.world)
                kl_loss = algo.kl_loss(logprobs, ref_logprobs[idx], mb_mask, n_tokens)
                if kl_loss is not None:  # GRPO: the KL to the reference as a loss term
                    loss = loss + kl_loss
                if demos:  # PPO-ptx (InstructGPT): keep the policy close to what users demonstrated
                    pick = random.sample(demos, min(len(demos), len(idx)))
                    loss = loss + cfg.ptx_coef * sft_loss(st.policy, st.tokenizer, pick, dev)
                st.optimizer.zero_grad(set_to_none=True)
                (loss * group.world).backward()
                torch.nn.utils.clip_grad_norm_(st.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                st.optimizer.step()
                stats["pg_loss"].append(float(pg.detach()) * group.world)
                stats["clip_frac"].append(float(pg_stats["clip_frac"]))
                stats["approx_kl"].append(float(pg_stats["approx_kl"]))
                stats["entropy"].append(float(ppo.masked_mean(entropy.detach(), mb_mask)))
        # Adaptive KL (Ziegler et al. 2019) is fed the mean sequence KL of this rollout (every rank's).
        mean_kl = float(group.sum(seq_kl.sum()) / len(everyone)) if many else float(seq_kl.mean())
        st.kl_ctl.update(mean_kl, len(everyone))
        t3 = time.perf_counter()

        st.step += 1
        st.warmup_left = max(0, st.warmup_left - 1)
        scored = all_raw[~all_raw.isnan()]  # the reward model's own scores, for the metrics
        m = {
            "reward_mean": float(scored.mean()) if len(scored) else float("nan"),
            "reward_std": float(scored.std()) if len(scored) > 1 else 0.0,
            "unscored_share": float(all_raw.isnan().float().mean()),
            "surprising_share": float(surprising.float().mean()),
            "score_norm_mean": float(scores.mean()),
            "kl": mean_kl,
            "kl_coef": st.kl_ctl.value,
            "eos_rate": float(batch.has_eos.float().mean()),
            "response_tokens": float(mask.sum(1).mean()),
            "samples_per_second": len(everyone) / (t3 - t0),
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_update": t3 - t2,
            **{name: sum(v) / len(v) for name, v in stats.items() if v},
        }
        st.metrics = m
        self._export(m, t0, t1, t2, t3)
        return m

    def _trainable_forward(self, head: nn.Module | None) -> nn.Module:
        """The policy's forward with grad (`rollout.PolicyForward`, with the critic's head where it trains),
        wrapped by the group (DDP: gradients averaged across ranks). Rebuilt when a restart loads another
        policy; every rank does so at the same step, as DDP's construction is collective."""
        policy = self.state.policy
        key = (id(policy), id(head))
        if self._trainable is None or self._trainable[0] != key:
            self._trainable = (key, self.group.wrap(PolicyForward(policy, head)))
        return self._trainable[1]

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
        self._restart(self.promoter.take_restart())

    def _restart(self, version: int | None) -> None:
        if version is not None:
            policy = load_policy(self.state, self.checkpointer.store, self.cfg, version)
            self.state.restart_from(version, policy, self.cfg)

    def _lead_step(self, restart: int | None) -> None:
        """Rank 0's step with several ranks: take the prompts, tell the others what to do (distributed.Command),
        then restart if asked and train, as they do."""
        prompts = self.prompts.take(self.cfg.batch_size)
        self.group.share(Command("step", restart, tuple(prompts)))
        self._restart(restart)
        self.train_step(prompts)

    def follow(self) -> None:
        """A rank other than 0: set up from the same checkpoint once rank 0 has, then take each step rank 0
        leads until it says stop. It consumes nothing, writes nothing and serves no RPC."""
        self.group.share(None)  # rank 0 has restored (and written what a start writes)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self._state = self.checkpointer.restore(writes=False).state
        self.status = "training"
        while True:
            command: Command = self.group.share(None)
            if command.op == "stop":
                break
            self._restart(command.restart)
            self.train_step(list(command.prompts))
        self.status = "stopped"

    # ------------------------------------------------------------------ the service loop

    def run(self, stop: threading.Event) -> None:
        """Wait for the active lock (standby), set up, then train until `stop` or max_steps."""
        self.status = "standby"
        if not self.active.wait(stop, self.cfg.standby_poll_s):
            self.status = "stopped"
            return
        led = False
        try:
            with self.lock:
                self.setup()
                self.status = "paused" if self.paused else "training"
            if self.group.world > 1:
                self.group.share("ready")  # the other ranks set up from what setup left (distributed.py)
                led = True
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
                    restart = self.promoter.take_restart()
                    if not led:
                        self._restart(restart)  # outside the step: a restart that fails stops the loop
                    try:
                        if led:
                            self._lead_step(restart)
                        else:
                            self.train_step()
                        self.last_lag = self.prompts.lag()  # Kafka clients are not thread-safe: read it here
                    except Exception as e:
                        if led:  # the other ranks are inside the step's collectives: end the group (torchrun)
                            raise
                        delay = self._step_failed(e)
                    else:
                        delay = self._step_succeeded()
                        if self.step % self.cfg.checkpoint_every == 0:
                            self.checkpoint()
                if delay:  # outside the lock: control calls go on meanwhile
                    stop.wait(delay)
        finally:
            if led and not sys.exc_info()[0]:
                self.group.share(Command("stop"))
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
    group: Group | None = None,
) -> Trainer:
    """A Trainer of `cfg.model` in `store`, gated on the `heldout` prompts (split_pool's second part);
    `group`: its ranks when data parallel (distributed.py)."""
    directory = trainer_dir(store.root, cfg.model)
    checkpointer = Checkpointer(cfg, store, prompts, reward, directory, keep_last)
    promoter = Promoter(cfg, store, reward, heldout, announce)
    ptx = ptx_examples(cfg.ptx_data, cfg.seed) if cfg.ptx_coef > 0 else []
    group = group or Alone()
    if group.world > 1 and cfg.batch_size % group.world:
        raise errors.FailedPrecondition(
            f"trainer.batch_size = {cfg.batch_size} prompts cannot be shared by {group.world} ranks: use a multiple "
            f"of {group.world} (each rank takes whole prompt groups)"
        )
    if group.world > 1 and cfg.minibatch_size % group.world:
        raise errors.FailedPrecondition(
            f"trainer.minibatch_size = {cfg.minibatch_size} cannot be shared by {group.world} ranks: use 0 (the "
            f"whole rollout, the same update on any number of ranks) or a multiple of {group.world}"
        )
    return Trainer(cfg, prompts, reward, checkpointer, promoter, directory, reward_info, ptx, group)
