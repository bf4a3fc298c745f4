"""Helpers for tests and benchmarks.

Tiny models, config-built, random, deterministic from a seed, with no download, so the real
training and serving code runs on a CPU in seconds:
- `tiny_policy`: a Llama with a word-level tokenizer (distinct pad/bos/eos).
- `tiny_reward_model`: a BERT sequence classifier with the MiniLM tokenizer that ships with the
  starter reward model.

Waits for a condition with a deadline (never a fixed sleep: too short is flaky on a busy
machine, too long slows every run): `wait_for` (blocking) and `wait_until` (async).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from flywheel.core.modelstore import save_pretrained

TINY_WORDS = (
    "the a is to and of you it we can help your order please thanks hello yes no good bad "
    "how what why when where reset password bread tire refund invoice today now soon here there"
).split()


def tiny_policy(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A config-built random Llama with a word-level tokenizer (distinct pad/bos/eos), saved to out_dir.

    For tests and the benchmark: tiny, deterministic from the seed, no download.
    """
    import torch  # here, so that tests that only wait need not load it
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(TINY_WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tok, out)
    return out


def tiny_reward_model(path: str | os.PathLike, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A config-built BERT (hidden 32) with the MiniLM tokenizer, saved to `path`: fast tests."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from flywheel.reward.model import RewardModel
    from flywheel.reward.starter import minilm_dir

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(cfg)
    RewardModel(model, tok, 128).save(path)
    return Path(path)


def wait_for(
    condition: Callable[[], object], timeout_s: float, what: str | Callable[[], str], poll_s: float = 0.01
) -> None:
    """Return once `condition()` is truthy; AssertionError naming `what` after `timeout_s` (a
    callable `what` is called then, for details of the state that did not come)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what() if callable(what) else what}")
        time.sleep(poll_s)


async def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.01) -> None:
    """`wait_for` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(poll_s)
