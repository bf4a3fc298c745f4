"""Online reward-model training in its own thread: new pairs + replay -> versions in the model store.

The loop, top to bottom:
1. resume from the latest version in the model store (its manifest says which pairs it has
   seen: `extra.pair_seq`, the dataset's sequence number), and load every training pair up to
   there into the replay buffer: a restarted service goes on from the persisted dataset;
2. when new training pairs arrive, run a round of steps (`steps_per_new_pair` per new pair,
   capped): each batch takes the next new pairs and fills at least `replay_fraction` of it
   with past pairs drawn at random (replay keeps the model from forgetting), plus a few
   pointwise thumbs/rating labels for the binary loss;
3. every `publish_every_steps` steps and at the end of a round: evaluate pairwise accuracy on
   the held-out split, and unless it fell more than `max_accuracy_drop` below the last
   published version, publish a version (parent lineage, metrics) and announce it on
   flywheel.reward.updates. Its manifest records `extra.pair_seq` and `extra.offsets`: per
   "topic:partition" of flywheel.preferences, the range [from, to) of offsets of the training
   pairs it took in since the version before (as far as the dataset knows their places;
   `flywheel models lineage` prints them).

Each version also reports its *online* accuracy: over the latest `online_window` training pairs,
the share the model ranked right in the step that first trained on them, before the update
(progressive validation). Every pair is unseen data once, so this estimate has ten times the
held-out split's pairs at no cost, which lets the trainer trust a reward model sooner.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
from collections import deque
from collections.abc import Callable

import torch
from prometheus_client import Counter, Gauge

from flywheel.core.modelstore import Manifest, ModelStore
from flywheel.reward.config import RewardModelConfig, TrainConfig
from flywheel.reward.model import RewardModel, Stopped, evaluate, train_only_top_layers, train_step
from flywheel.reward.store import PairRow, PreferenceStore
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

MIN_GUARD_HELDOUT = 20  # held-out pairs an accuracy needs before it can block a later version
STEPS = Counter("flywheel_reward_training_steps", "Reward-model optimizer steps.")
ACCURACY = Gauge("flywheel_reward_heldout_accuracy", "Held-out pairwise accuracy of the latest evaluated model.")
ONLINE_ACCURACY = Gauge(
    "flywheel_reward_online_accuracy",
    "Pairwise accuracy on the latest new training pairs, each scored before the model trained on it.",
)
PAIRS_TRAINED = Gauge("flywheel_reward_pairs_trained", "Distinct training pairs the model has seen.")
LOSS = Gauge("flywheel_reward_train_loss", "Loss of the last training step.")
PUBLISHED = Counter("flywheel_reward_versions", "Versions evaluated, by outcome (published, gated).", ["outcome"])


@dataclasses.dataclass
class TrainerStatus:
    version: int
    training_steps: int
    pairs_trained: int
    pairs_heldout: int
    heldout_accuracy: float
    last_loss: float


class OnlineTrainer:
    """Trains the reward model as pairs arrive; `announce(update)` must return once Kafka has it."""

    def __init__(
        self,
        config: TrainConfig,
        model_config: RewardModelConfig,
        store: ModelStore,
        dataset: PreferenceStore,
        announce: Callable[[events_pb2.ModelUpdate], None] | None = None,
        preferences_topic: str = "flywheel.preferences",
    ) -> None:
        self.config, self.model_config, self.store, self.dataset = config, model_config, store, dataset
        self.announce, self.preferences_topic = announce, preferences_topic
        self.rng = random.Random(config.seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.rm: RewardModel | None = None
        self.replay: list[PairRow] = []
        self.cursor = 0  # dataset seq of the last pair taken into training
        self.published_cursor = 0  # ... as of the last published version
        self.version = 0  # version the weights in memory descend from
        self.steps = 0
        self.last_accuracy = -1.0  # of the last published version
        self.last_heldout = 0  # held-out pairs that accuracy was measured on
        self.last_loss = float("nan")
        self._steps_since_publish = 0
        self.online: deque[bool] = deque(maxlen=config.online_window)  # fresh pairs ranked right?

    # ------------------------------------------------------------------ lifecycle
    def resume(self) -> Manifest:
        """Load the latest version and the replay buffer of every pair it was trained on."""
        m = self.store.latest(self.model_config.name)
        if m is None:
            raise RuntimeError(f"no {self.model_config.name!r} version in the model store: build the starter first")
        self.rm = RewardModel.load(
            self.store.verify(m.model, m.version), self.model_config.max_length, self.model_config.device
        )
        trained = train_only_top_layers(self.rm.model, self.config.trainable_layers)
        self.optimizer = torch.optim.AdamW(trained, lr=self.config.lr, eps=1e-5)
        self.version = m.version
        self.cursor = self.published_cursor = int(m.extra.get("pair_seq", 0))
        self.steps = int(m.metrics.get("training_steps", 0))
        self.last_accuracy = m.metrics.get("heldout_accuracy", -1.0)
        self.last_heldout = int(m.metrics.get("pairs_heldout", 0))
        self.replay = [p for p in self.dataset.pairs_after(0, "train") if p.seq <= self.cursor]
        PAIRS_TRAINED.set(len(self.replay))
        log.info(
            "reward trainer resumes from version %d (%d pairs seen, %d steps)", m.version, len(self.replay), self.steps
        )
        return m

    def start(self) -> threading.Thread:
        if self.rm is None:
            self.resume()
        torch.manual_seed(self.config.seed)

        def target() -> None:
            try:
                while not self._stop.is_set():
                    if not self.run_round():
                        self._stop.wait(self.config.poll_s)
            except BaseException as e:  # surfaced via .error and the log; scoring goes on
                self.error = e
                log.exception("reward trainer died")

        self._thread = threading.Thread(target=target, name="reward-trainer", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("reward trainer still inside a step after %.0fs; exiting without it", timeout_s)

    # ------------------------------------------------------------------ one round
    def run_round(self) -> bool:
        """Train on the pairs that arrived since the last round; False when there was nothing to do."""
        assert self.rm is not None, "call resume() first"
        new = self.dataset.pairs_after(self.cursor, "train")
        if not new or len(self.replay) + len(new) < self.config.min_pairs:
            return False
        cfg = self.config
        n_steps = min(cfg.max_steps_per_round, max(1, math.ceil(len(new) * cfg.steps_per_new_pair)))
        n_replay = math.ceil(cfg.batch_size * cfg.replay_fraction) if self.replay else 0
        n_new = max(1, cfg.batch_size - n_replay)
        labels = self.dataset.labels("train") if cfg.binary_weight > 0 else []
        k = 0
        for _ in range(n_steps):
            if self._stop.is_set():
                break
            batch = [new[(k + i) % len(new)] for i in range(min(n_new, len(new)))]
            fresh = max(0, min(len(batch), len(new) - k))  # first time in training: not seen yet
            k += len(batch)
            if self.replay:
                batch += self.rng.choices(self.replay, k=cfg.batch_size - len(batch))
            lab = self.rng.choices(labels, k=max(1, cfg.batch_size // 4)) if labels else []
            out = train_step(self.rm, self.optimizer, batch, lab, cfg.binary_weight, fresh=fresh)
            self._record_online(out)
            self.steps += 1
            self._steps_since_publish += 1
            self.last_loss = out["loss"]
            STEPS.inc()
            LOSS.set(out["loss"])
            if k >= len(new) and not self.replay:  # first data ever: later steps can replay it
                self.replay = list(new)
            if self._steps_since_publish >= cfg.publish_every_steps:
                self._commit_progress(new)
                self.maybe_publish()
        if self._stop.is_set():  # no held-out evaluation on the way out (it took ~20 s on a CPU): a restart
            return True  # resumes from the last published version's cursor and trains these pairs again
        self._commit_progress(new)
        if self._steps_since_publish:
            self.maybe_publish()
        return True

    def _record_online(self, out: dict[str, float]) -> None:
        correct, n = int(out.get("fresh_correct", 0)), int(out.get("fresh_n", 0))
        self.online.extend([True] * correct + [False] * (n - correct))
        if self.online:
            ONLINE_ACCURACY.set(self.online_accuracy())

    def online_accuracy(self) -> float:
        """Progressive-validation accuracy over the latest `online_window` fresh pairs; -1 before any."""
        return sum(self.online) / len(self.online) if self.online else -1.0

    def _commit_progress(self, new: list[PairRow]) -> None:
        """Move the cursor past this round's pairs and add them to the replay buffer."""
        seen = {p.seq for p in self.replay}
        self.replay += [p for p in new if p.seq not in seen]
        self.cursor = max(self.cursor, new[-1].seq)
        PAIRS_TRAINED.set(len(self.replay))

    # ------------------------------------------------------------------ versions
    def maybe_publish(self) -> Manifest | None:
        """Evaluate; publish and announce unless held-out accuracy dropped too far."""
        assert self.rm is not None
        self._steps_since_publish = 0
        heldout = self.dataset.pairs_after(0, "heldout", limit=self.config.max_heldout_eval)
        try:  # ~20 s on a loaded CPU: a stopping service must not wait for it (a restart trains these again)
            ev = evaluate(self.rm, heldout, stop=self._stop)
        except Stopped:
            log.info("held-out evaluation stopped: the service is shutting down, nothing published")
            return None
        acc = ev["heldout_accuracy"]
        if acc >= 0:
            ACCURACY.set(acc)
        # Guard only against an accuracy measured on enough pairs: a lucky 1.0 on the first
        # one or two held-out pairs must not block every later version.
        trusted = self.last_heldout >= MIN_GUARD_HELDOUT
        if acc >= 0 and trusted and acc < self.last_accuracy - self.config.max_accuracy_drop:
            PUBLISHED.labels("gated").inc()
            log.warning(
                "reward model not published: held-out accuracy %.3f < last %.3f - %.3f",
                acc,
                self.last_accuracy,
                self.config.max_accuracy_drop,
            )
            return None
        metrics = {
            **ev,
            "pairs_trained": len(self.replay),
            "pairs_heldout": len([p for p in heldout if p.source != "tie"]),
            "online_accuracy": self.online_accuracy(),
            "online_pairs": len(self.online),
            "training_steps": self.steps,
            "train_loss": self.last_loss,
        }
        cfg = dataclasses.asdict(self.config)
        ranges = self.dataset.offset_ranges(self.published_cursor, self.cursor)
        offsets = {f"{self.preferences_topic}:{p}": [lo, hi] for p, (lo, hi, _) in sorted(ranges.items())}
        m = self.store.publish(
            self.model_config.name,
            self.rm.save,
            parent=self.version,
            metrics=metrics,
            extra={"pair_seq": self.cursor, "train_config": cfg, "offsets": offsets},
        )
        self.version, self.last_accuracy, self.published_cursor = m.version, acc, self.cursor
        self.last_heldout = int(metrics["pairs_heldout"])
        PUBLISHED.labels("published").inc()
        log.info(
            "published reward version %d (held-out accuracy %.3f, %d pairs, %d steps)",
            m.version,
            acc,
            len(self.replay),
            self.steps,
        )
        if self.announce is not None:
            self.announce(self.store.to_update(m, "trained"))
        self.store.retain(self.model_config.name, self.config.keep_last)
        return m

    def status(self) -> TrainerStatus:
        return TrainerStatus(
            self.version,
            self.steps,
            len(self.replay),
            self.dataset.count_pairs("heldout"),
            self.last_accuracy,
            self.last_loss,
        )
