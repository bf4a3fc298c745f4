"""The starter policy: a small Llama-architecture LM trained on the CPU on the project's own corpus.

It is version 0 of the model "policy" and the trainer's KL reference. A sequence is
`<s>{prompt} {answer}</s>`: a raw prompt and a one-message chat render to the same ids (the
chat template below), so the answer follows either. The answers mix the styles of
services/flywheel/policy/corpus.py in the corpus' proportions, which gives feedback something to choose
between. Deterministic from the seed (on the same machine and torch build).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flywheel.core.modelstore import save_pretrained
from flywheel.policy import corpus

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Training steps of the starter. 600 steps left 17-26% of answers sampled at temperature 1
# garbled; 2,000 leave 2%, and RL on a fluent starter keeps its answers well formed (~95% vs
# ~75% after the same updates). RECIPE names the build: the starter cache is keyed by it.
STEPS = 2000
RECIPE = f"llama-h64-l2-s{STEPS}-seed0"
# A user turn is its content, an assistant turn " {content}</s>"; system turns are not shown
# to the starter (it was never trained on them). A single user message == the raw prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% if not loop.first %} {% endif %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any input text encodes; decode is exact) with distinct pad/bos/eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def model_config(tok: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _batches(tok: PreTrainedTokenizerFast, examples: list[corpus.Example], batch: int, rng: random.Random):
    """Endless shuffled batches of right-padded (ids, labels); loss only on answer tokens + EOS (SFT)."""
    rows = []
    for ex in examples:
        p = tok(ex.prompt)["input_ids"]
        full = tok(f"{ex.prompt} {ex.answer}")["input_ids"] + [tok.eos_token_id]
        rows.append((full, len(p)))
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - batch + 1, batch):
            chunk = rows[i : i + batch]
            length = max(len(r) for r, _ in chunk)
            ids = torch.full((batch, length), tok.pad_token_id)
            labels = torch.full((batch, length), -100)
            for b, (r, n_prompt) in enumerate(chunk):
                ids[b, : len(r)] = torch.tensor(r)
                labels[b, n_prompt : len(r)] = torch.tensor(r[n_prompt:])
            yield ids, labels


def build_starter(
    out_dir: str | Path,
    steps: int = STEPS,
    seed: int = 0,
    examples: int = 20_000,
    batch_size: int = 32,
    lr: float = 3e-3,
    hidden: int = 64,
    layers: int = 2,
    progress: bool = True,
    threads: int | None = 1,
) -> Path:
    """Train the starter policy and `save_pretrained` model + tokenizer into out_dir. Returns out_dir.

    About 130K parameters; 600 steps took 15-70 s on this 2-core machine (idle to busy), 2,000 steps about three times that.
    `threads` sets torch's intra-op threads for the build only (None: leave torch's setting).
    One thread is the default because a model this small gains little from a second one, and
    on a busy machine two threads were measured 4x (training) to 100x (generate) slower.
    """
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _build(Path(out_dir), steps, seed, examples, batch_size, lr, hidden, layers, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _build(
    out: Path,
    steps: int,
    seed: int,
    examples: int,
    batch_size: int,
    lr: float,
    hidden: int,
    layers: int,
    progress: bool,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = corpus.generate(examples, seed)
    tok = build_tokenizer([f"{ex.prompt} {ex.answer}" for ex in data])
    model = LlamaForCausalLM(model_config(tok, hidden, layers))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warmup then cosine decay to 10%, as nanoGPT does
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = _batches(tok, data, batch_size, rng)
    model.train()
    t0, loss_ema = time.perf_counter(), None
    bar = tqdm(range(steps), desc="starter policy", unit="step", disable=not progress)
    for _ in bar:
        ids, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    assert model.generation_config is not None  # a causal LM's, made with it
    model.generation_config.pad_token_id = tok.pad_token_id
    save_pretrained(model, tok, out)
    meta = {
        "name": "flywheel-starter-policy",
        "seed": seed,
        "steps": steps,
        "examples": examples,
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss_ema": loss_ema,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "style_probabilities": {
            "tone": corpus.P_TONE,
            "verbose": corpus.P_VERBOSE,
            "on_topic": corpus.P_ON_TOPIC,
            "closing": corpus.P_CLOSING,
        },
    }
    (out / "starter.json").write_text(json.dumps(meta, indent=2))
    return out
