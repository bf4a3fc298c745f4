"""The trainer's Prometheus metrics, in one place because the loop, checkpoints and promotion all set them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

GAUGES = {
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
        "unscored_share": "Share of the last rollout given empty_response_score (empty or refused answers).",
        "surprising_share": "Share of the last rollout holding a token the reference finds very unlikely.",
        "waiting_for_reward": "1 while training waits for a reward model worth training against (see GetStatus).",
        "failing_steps": "Steps failed in a row (0 after a step succeeds).",
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
    "flywheel_trainer_restarts_from_serving",
    "Times training went back to the serving weights with a fresh optimizer, by reason: gate_patience, "
    "kl_budget, failing_steps, rollback.",
    ["reason"],
)
FAILED_STEPS = Counter(
    "flywheel_trainer_failed_steps",
    "Steps that failed, by kind: unavailable (the reward service or Kafka: retried with backoff) or error.",
    ["kind"],
)
