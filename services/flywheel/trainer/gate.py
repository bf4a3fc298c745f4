"""The promotion gate: is a checkpoint better than what serves, close to the reference, and sane?

A candidate passes when, on held-out prompts sampled with one fixed seed for both versions:
  1. its mean raw reward beats the serving version's by more than `gate_margin`;
  2. its mean KL to the reference (k1, summed over the response, nats) is under `gate_kl_budget`
     (the KL budget of Ziegler et al. 2019 / Huang et al. 2024, checked on held-out prompts);
  3. its output is not degenerate: mean length within [gate_min_tokens, max_mean_tokens],
     the most frequent token's share of a response at most `gate_max_repeat`, and the share
     of distinct bigrams at least `gate_min_distinct2` (reward hacking by repetition shows here);
  4. its text is not garbled: the share of responses holding a token the reference finds very
     unlikely (log-prob under `surprise_logprob`) exceeds the reference's own share by at most
     `gate_max_surprising_increase` (a perplexity-under-the-reference test: reward
     over-optimization writes text the starter would never write, which the KL budget averages away).
The verdict is the manifest's `gate` string: "passed" or "failed: <every reason>".
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
from transformers import PreTrainedTokenizerBase

from flywheel.trainer import ppo
from flywheel.trainer.adapters import Policy
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.reward_source import RewardSource, score_each
from flywheel.trainer.rollout import forward, generate


@dataclasses.dataclass
class GateReport:
    """Held-out figures of one version."""

    reward_mean: float
    kl: float  # mean sequence KL to the reference, nats
    mean_tokens: float
    repeat: float  # mean share of the most frequent token in a response
    distinct2: float  # mean share of distinct bigrams in a response
    eos_rate: float
    surprising: float = 0.0  # share of responses with a token under surprise_logprob for the reference

    def metrics(self, prefix: str = "gate.") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


def repetition(tokens: list[int]) -> tuple[float, float]:
    """(share of the most frequent token, share of distinct bigrams) of one response."""
    if not tokens:
        return 0.0, 1.0
    top = Counter(tokens).most_common(1)[0][1] / len(tokens)
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    distinct2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    return top, distinct2


@torch.no_grad()
def evaluate(
    model: Policy,
    reference: Policy,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    reward: RewardSource,
    cfg: TrainerConfig,
) -> GateReport:
    """Sample one response per held-out prompt (seed cfg.gate_seed) and measure it."""
    batch = generate(
        model, tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_tokens, generator_seed=cfg.gate_seed
    )
    scored = [x for x in score_each(reward, batch.prompts, batch.responses) if math.isfinite(x)]
    logprobs, _, _ = forward(model, batch, cfg.temperature)
    ref_logprobs, _, _ = forward(reference, batch, cfg.temperature)
    mask = batch.response_mask
    kl = ((logprobs - ref_logprobs) * mask).sum(1)  # (B,) k1 per sequence
    lengths = mask.sum(1)
    reps = [repetition(row[: int(n)].tolist()) for row, n in zip(batch.response_ids, lengths, strict=True)]
    return GateReport(
        # Empty answers have no score; the length check refuses a version that gives many.
        reward_mean=float(sum(scored) / len(scored)) if scored else -math.inf,
        kl=float(kl.mean()),
        mean_tokens=float(lengths.mean()),
        repeat=float(sum(r for r, _ in reps) / len(reps)),
        distinct2=float(sum(d for _, d in reps) / len(reps)),
        eos_rate=float(batch.has_eos.float().mean()),
        surprising=float(ppo.surprising(ref_logprobs, mask, cfg.surprise_logprob).float().mean()),
    )


def decide(
    candidate: GateReport, serving: GateReport, cfg: TrainerConfig, reference_surprising: float = 0.0
) -> tuple[bool, str]:
    """(passed, verdict string for the manifest); `reference_surprising`: the reference's own share."""
    reasons = []
    if not candidate.reward_mean > serving.reward_mean + cfg.gate_margin:
        reasons.append(
            f"reward {candidate.reward_mean:.4f} not above serving {serving.reward_mean:.4f} + margin {cfg.gate_margin:g}"
        )
    if not candidate.kl < cfg.gate_kl_budget:
        reasons.append(f"KL to reference {candidate.kl:.3f} over budget {cfg.gate_kl_budget:g}")
    if not cfg.gate_min_tokens <= candidate.mean_tokens <= cfg.max_mean_tokens:
        reasons.append(
            f"mean length {candidate.mean_tokens:.1f} tokens outside [{cfg.gate_min_tokens:g}, {cfg.max_mean_tokens:g}]"
        )
    if candidate.repeat > cfg.gate_max_repeat:
        reasons.append(f"degenerate: top token is {candidate.repeat:.0%} of a response (max {cfg.gate_max_repeat:.0%})")
    if candidate.distinct2 < cfg.gate_min_distinct2:
        reasons.append(f"degenerate: distinct bigrams {candidate.distinct2:.0%} (min {cfg.gate_min_distinct2:.0%})")
    if candidate.surprising > reference_surprising + cfg.gate_max_surprising_increase:
        reasons.append(
            f"garbled: {candidate.surprising:.0%} of responses hold a token the reference finds unlikely "
            f"(the reference's own: {reference_surprising:.0%}, max +{cfg.gate_max_surprising_increase:.0%})"
        )
    if reasons:
        return False, "failed: " + "; ".join(reasons)
    return True, "passed"
