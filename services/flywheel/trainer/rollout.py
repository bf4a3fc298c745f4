"""Rollouts with the trainer's own copy of the policy: sampling, temperature-scaled log-probs, values.

The policy is any Hugging Face causal LM (`from_pretrained` from a name or a path); the
critic is a zero-initialised linear value head on the policy's last hidden state (a shared
backbone, as in TRL's former AutoModelForCausalLMWithValueHead).

Details from Huang et al. 2024 (arXiv 2403.17031):
  * log-probs come from logits divided by the sampling temperature, so the ratio and the
    KL are those of the distribution that was sampled from;
  * a distinct pad token: padding is never confused with EOS, and everything after the
    first EOS is padding and masked out;
  * prompts are left-padded and position ids follow the attention mask.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core.masks import attention_mask_4d
from flywheel.trainer.adapters import Policy, as_model
from flywheel.trainer.ppo import entropy_from_logits, logprobs_from_logits


class ValueHead(nn.Module):
    """hidden (B, T, H) -> value (B, T); zero-initialised (docs/ARCHITECTURE.md, 'Training defaults worth knowing')."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


@dataclasses.dataclass
class Rollout:
    """One batch of sampled responses, prompt-major (group samples adjacent); train_step adds log-probs and values."""

    prompts: list[str]  # B strings (one per sequence, repeated within a group)
    responses: list[str]  # B decoded responses (special tokens removed)
    query_ids: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (B, T) generated ids, pad after the first EOS
    response_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool, did the response end with EOS

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def index(self, idx: torch.Tensor) -> Rollout:
        """The sub-batch of rows `idx` (a minibatch)."""
        pick = [int(i) for i in idx]
        return Rollout(
            prompts=[self.prompts[i] for i in pick],
            responses=[self.responses[i] for i in pick],
            query_ids=self.query_ids[idx],
            query_mask=self.query_mask[idx],
            response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx],
            has_eos=self.has_eos[idx],
        )


def encode_prompts(
    tok: PreTrainedTokenizerBase, prompts: list[str], max_tokens: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask), each (B, P), prompts truncated on the left to max_tokens."""
    rows = [tok(p)["input_ids"][-max_tokens:] for p in prompts]
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, P - len(r) :] = torch.tensor(r)
            mask[b, P - len(r) :] = 1
    return ids.to(device), mask.to(device)


def mask_after_eos(
    response_ids: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad everything after the first EOS; returns (ids (B, T), mask (B, T) float incl. EOS, has_eos (B,))."""
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(
        has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long)
    )
    pos = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)).float()  # (B, T)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, has_eos


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Temperature sampling with a KV cache, (B, P) -> (B, T); rows that ended are padded.

    Pure temperature sampling (no top-k/top-p), which is the distribution PPO's log-probs
    describe. Each row draws from its own generator where `generators` are given (a row's
    tokens then do not depend on the other rows: the distributed trainer's rollouts are the
    same on any number of ranks), else from torch's global RNG; either way a restored state
    replays a rollout.
    """
    from transformers import DynamicCache

    dtype = next(model.parameters()).dtype
    B = query_ids.shape[0]
    key_mask = query_mask.bool()  # (B, K) grows by one per step
    pos = (query_mask.cumsum(1) - 1).clamp(min=0)  # (B, P)
    cache = DynamicCache()
    out = model(
        input_ids=query_ids,
        attention_mask=attention_mask_4d(key_mask, query_ids.shape[1], dtype),
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=query_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (B, V)
        if generators is None:
            nxt = torch.multinomial(probs, 1).squeeze(1)  # (B,)
        else:
            nxt = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], 1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention_mask_4d(key_mask, 1, dtype),
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(tokens, 1)


@torch.no_grad()
def generate(
    policy: Policy,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    max_prompt_tokens: int = 256,
    generator_seed: int | None = None,
    use_hf_generate: bool = False,
    row_seeds: list[int] | None = None,
) -> Rollout:
    """Sample one response per prompt; `use_hf_generate` takes transformers' generate() instead of `sample`.
    `policy`: a model, or a LoRA policy's base with its adapter switched off (adapters.AdapterOff).
    `row_seeds`: each row samples from its own generator with that seed (`sample`)."""
    with as_model(policy) as model:
        return _generate(
            model,
            tok,
            prompts,
            max_new_tokens,
            temperature,
            max_prompt_tokens,
            generator_seed,
            use_hf_generate,
            row_seeds,
        )


def _generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    max_prompt_tokens: int,
    generator_seed: int | None,
    use_hf_generate: bool,
    row_seeds: list[int] | None = None,
) -> Rollout:
    device = next(model.parameters()).device
    generators = None
    if row_seeds is not None:
        generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    query_ids, query_mask = encode_prompts(tok, prompts, max_prompt_tokens, device)
    state = None
    if generator_seed is not None:  # the gate: same samples for every version, RNG left untouched
        state = torch.random.get_rng_state()
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    try:
        if use_hf_generate:
            gen_cfg = GenerationConfig(
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
            )
            # PreTrainedModel does not declare generate(); every causal LM gets it from GenerationMixin.
            out = model.generate(  # type: ignore[operator]
                input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg
            )
            raw = out[:, query_ids.shape[1] :]
        else:
            raw = sample(
                model,
                query_ids,
                query_mask,
                max_new_tokens,
                temperature,
                tok.eos_token_id,
                tok.pad_token_id,
                generators,
            )
    finally:
        model.train(was_training)
        if state is not None:
            torch.random.set_rng_state(state)
    if raw.shape[1] < max_new_tokens:  # every sequence stopped early: pad to a fixed T
        fill = torch.full((raw.shape[0], max_new_tokens - raw.shape[1]), tok.pad_token_id, device=device)
        raw = torch.cat([raw, fill], 1)
    response_ids, response_mask, has_eos = mask_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    responses = tok.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(list(prompts), responses, query_ids, query_mask, response_ids, response_mask, has_eos)


class PolicyForward(nn.Module):
    """The trained policy (and the critic's value head, where one trains) as one module whose forward is
    `_forward`: what the data-parallel trainer wraps in DistributedDataParallel, whose gradient hooks
    arm in the wrapped module's own forward."""

    def __init__(self, model: PreTrainedModel, value_head: nn.Module | None) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(
        self, batch: Rollout, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        head = self.value_head if isinstance(self.value_head, ValueHead) else None
        return _forward(self.model, batch, temperature, head, with_entropy)


def forward(
    policy: Policy,
    batch: Rollout,
    temperature: float,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`_forward` of a model, or of a LoRA policy's base with its adapter switched off (adapters.AdapterOff)."""
    with as_model(policy) as model:
        return _forward(model, batch, temperature, value_head, with_entropy)


def _forward(
    model: PreTrainedModel,
    batch: Rollout,
    temperature: float,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of the response tokens from temperature-scaled logits, plus values and entropy.

    Returns (logprobs (B, T), values (B, T) or None, entropy (B, T) or None). The token at
    response position t is predicted by the hidden state at sequence position P - 1 + t, whose
    value estimates the return from that state on.
    """
    ids = torch.cat([batch.query_ids, batch.response_ids], 1)  # (B, P+T)
    attn = torch.cat([batch.query_mask, batch.response_mask.long()], 1)  # (B, P+T)
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # left padding: positions follow the mask
    P, T = batch.query_ids.shape[1], batch.response_ids.shape[1]
    backbone = getattr(model, model.base_model_prefix)
    mask4 = attention_mask_4d(attn, ids.shape[1], next(model.parameters()).dtype)  # (B, 1, P+T, P+T)
    out = backbone(input_ids=ids, attention_mask=mask4, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state  # (B, P+T, H)
    hidden = hidden[:, P - 1 : P - 1 + T]  # (B, T, H)
    logits = model.get_output_embeddings()(hidden).float() / temperature  # (B, T, V)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    values = value_head(hidden) if value_head is not None else None
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, values, entropy
