"""A tiny random policy for tests and the benchmark: a config-built Llama and a word-level tokenizer.

Deterministic from a seed and downloads nothing, so the trainer's tests and bench/ppo_vs_trl.py
can run the real loop on CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flywheel.core.modelstore import save_pretrained

TINY_WORDS = (
    "the a is to and of you it we can help your order please thanks hello yes no good bad "
    "how what why when where reset password bread tire refund invoice today now soon here there"
).split()


def tiny_policy(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A config-built random Llama with a word-level tokenizer (distinct pad/bos/eos), saved to out_dir.

    For tests and the benchmark: tiny, deterministic from the seed, no download.
    """
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
