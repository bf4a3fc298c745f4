"""Next-token selection: pure tensor functions over a batch of logits, one row per sequence.

Every function takes per-row parameters, so sequences with different sampling settings share
one decode step (continuous batching). The order of the processors is the one of Hugging
Face's `generate` (repetition penalty, temperature, top-k, top-p), so that a request gives the
same distribution here as there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

NEG_INF = float("-inf")
FAILED = -1  # the token of a row that could not be sampled (select_next)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its next token (the fields of flywheel.v1.SamplingParams)."""

    temperature: float = 1.0  # 0 = greedy unless do_sample
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    do_sample: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.do_sample

    @property
    def effective_temperature(self) -> float:
        """The temperature the logits are divided by: 1 for greedy or do_sample at 0 (TGI's rule)."""
        return self.temperature if self.temperature > 0 else 1.0


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[torch.Tensor], penalty: list[float]) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, arXiv 1909.05858, eq. 1), as HF applies it.

    logits (B, V); seen[b] holds the token ids already in sequence b (prompt and answer).
    A seen token's logit is divided by the penalty when positive and multiplied when negative,
    so penalty > 1 always makes it less likely. Rows with penalty 1 are left alone.
    """
    out = logits.clone()
    for b, p in enumerate(penalty):
        if p == 1.0 or seen[b].numel() == 0:
            continue
        ids = seen[b].to(out.device)
        vals = out[b].gather(0, ids)
        out[b].scatter_(0, ids, torch.where(vals > 0, vals / p, vals * p))
    return out


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits (B, V) / temperature (B,); a temperature of 0 counts as 1 (greedy rows use argmax anyway)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.dtype)
    return logits / t[:, None]


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (Fan et al. 2018); k = 0 keeps all. top_k (B,) long.

    Ties at the k-th value are kept, like HF's TopKLogitsWarper.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of most
    likely tokens whose probability reaches top_p; the most likely token is always kept. top_p (B,).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of the strictly better tokens
    remove_sorted = mass_before >= top_p[:, None].float()
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def token_logprobs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under log_softmax(logits / T) of the model's raw logits, before the
    repetition penalty and any top-k/top-p truncation. (B,)

    This is what the PPO trainer recomputes ("temperature-scaled logits for log-probs", Huang
    et al. 2024, arXiv 2403.17031), so a served answer's logprobs line up with the trainer's.
    """
    logp = apply_temperature(logits.float(), temperature).log_softmax(dim=-1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def select_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator | None],
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row. Returns (tokens (B,) long, logprobs (B,) float32, or None when
    `logprobs` is False).

    A row that cannot be sampled (its logits, or its sampling distribution, are not finite)
    gets the token FAILED (-1) and takes no part in the batch's tensor work (so no kernel
    sees a NaN); every other row is picked as if it were alone. One vectorized isfinite over
    the batch per step, no Python per row.

    Each sampled row draws from its own torch.Generator, and only sampled rows draw, so a
    seeded sequence gets the same tokens whatever else shares its batch. An all-greedy batch
    without penalties (the common case) is one argmax over the batch.
    """
    batch = logits.shape[0]
    device = logits.device
    ok = torch.isfinite(logits).all(dim=-1)  # (B,) a row the model gave a NaN or an infinity fails
    if not logprobs and all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(dim=-1).masked_fill(~ok, FAILED), None
    raw = logits = logits.float()
    temperature = torch.tensor([p.effective_temperature for p in params], device=device)
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, seen, [p.repetition_penalty for p in params])
    tokens = logits.argmax(dim=-1)
    sampled = [b for b in range(batch) if not params[b].greedy]
    if sampled:
        warped = apply_temperature(logits, temperature)
        ok &= torch.isfinite(warped).all(dim=-1)  # a penalty or temperature that overflowed
        warped = warped.masked_fill(~ok[:, None], 0.0)  # a failed row draws from a harmless uniform
        if any(params[b].top_k > 0 for b in sampled):
            warped = top_k_filter(warped, torch.tensor([p.top_k for p in params], device=device))
        if any(params[b].top_p < 1.0 for b in sampled):
            warped = top_p_filter(warped, torch.tensor([p.top_p for p in params], device=device))
        probs = warped.softmax(dim=-1)
        for b in sampled:
            tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    lps = token_logprobs(raw.masked_fill(~ok[:, None], 0.0), temperature, tokens) if logprobs else None
    return tokens.masked_fill(~ok, FAILED), lps


def select_each(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator | None],
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`select_next` one row at a time: the way out when it raised for the whole batch. A row
    whose own selection raises gets FAILED; the others get their tokens."""
    tokens: list[int] = []
    lps: list[float] = []
    for b in range(logits.shape[0]):
        try:
            t, lp = select_next(logits[b : b + 1], params[b : b + 1], seen[b : b + 1], generators[b : b + 1], logprobs)
            tokens.append(int(t[0]))
            lps.append(float(lp[0]) if lp is not None else 0.0)
        except Exception:  # noqa: BLE001 - this row alone fails
            log.warning("sampling failed for row %d of %d; that answer fails", b, logits.shape[0], exc_info=True)
            tokens.append(FAILED)
            lps.append(0.0)
    out = torch.tensor(tokens, dtype=torch.long, device=logits.device)
    return out, torch.tensor(lps, dtype=torch.float32, device=logits.device) if logprobs else None
