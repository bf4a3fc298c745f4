"""The starter policy and its corpus: deterministic, well formed, and with a mix of styles."""

from __future__ import annotations

import atexit
import collections
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.policy import corpus
from flywheel.policy.starter import build_starter


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: torch's second thread only adds contention."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@functools.cache
def tiny_starter() -> Path:
    """A starter built with few steps, once per test process (test_engine uses it too)."""
    d = Path(tempfile.mkdtemp(prefix="flywheel-starter-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return build_starter(d / "v0", steps=120, examples=2000, seed=0, progress=False, threads=1)


def test_corpus_is_deterministic_and_classifier_reads_back_the_styles():
    a, b = corpus.generate(500, seed=3), corpus.generate(500, seed=3)
    assert a == b and a != corpus.generate(500, seed=4)
    for ex in a:
        assert corpus.topic_of(ex.prompt) == ex.topic
        assert ex.style == corpus.classify(ex.prompt, ex.answer)
    share = collections.Counter()
    for ex in corpus.generate(5000, seed=0):
        share[ex.style.tone] += 1
        share["verbose"] += ex.style.verbose
        share["on_topic"] += ex.style.on_topic
        share["closing"] += ex.style.closing
    # The preferred qualities are minorities that feedback can push up.
    assert 0.2 < share["polite"] / 5000 < 0.3
    assert 0.2 < share["closing"] / 5000 < 0.3
    assert 0.25 < 1 - share["verbose"] / 5000 < 0.35
    assert 0.65 < share["on_topic"] / 5000 < 0.75


def test_classify_handles_free_text():
    s = corpus.classify("how do I bake bread?", " happy to help! the bread needs flour. hope this helps!")
    assert s == corpus.Style(tone="polite", verbose=False, on_topic=True, closing=True, words=10)
    assert corpus.classify("hello", "whatever.").on_topic is None
    assert corpus.classify("where is my order?", "whatever. I love coffee.").tone == "rude"


def test_starter_loads_with_from_pretrained_and_answers_end_with_eos():
    path = tiny_starter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    chat = tok.apply_chat_template([{"role": "user", "content": "where is my order?"}], add_generation_prompt=True)
    assert list(chat) == tok("where is my order?")["input_ids"]
    torch.manual_seed(0)
    ended, total, tones = 0, 0, collections.Counter()
    for prompt in corpus.prompts():
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, max_new_tokens=80, num_return_sequences=2)
        for row in out[:, enc.input_ids.shape[1] :]:
            total += 1
            ended += int((row == tok.eos_token_id).any())
            tones[corpus.classify(prompt, tok.decode(row, skip_special_tokens=True)).tone] += 1
    assert ended / total >= 0.8, f"only {ended}/{total} answers ended with EOS"
    assert len(tones) >= 2, f"the starter should sample a mix of tones, got {tones}"


def test_starter_is_deterministic_from_its_seed(tmp_path):
    a = build_starter(tmp_path / "a", steps=3, examples=300, seed=1, progress=False, threads=1)
    b = build_starter(tmp_path / "b", steps=3, examples=300, seed=1, progress=False, threads=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
