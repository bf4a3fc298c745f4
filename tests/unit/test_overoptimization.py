"""Defences against reward over-optimization: the surprise test (training and gate) and PPO-ptx data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel.core import errors
from flywheel.trainer import gate, ppo
from flywheel.trainer.config import TrainerConfig
from flywheel.trainer.prompt_sources import ptx_examples


def test_a_response_is_surprising_when_one_real_token_is_unlikely_for_the_reference() -> None:
    ref = torch.tensor([[-1.0, -2.0, -9.0, -30.0], [-1.0, -7.9, -1.0, -50.0], [-12.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]])  # padding never counts
    assert ppo.surprising(ref, mask, -8.0).tolist() == [True, False, False]


def test_the_gate_refuses_garbled_text_beyond_the_references_own_share() -> None:
    cfg = TrainerConfig()
    ok = gate.GateReport(reward_mean=0.5, kl=1.0, mean_tokens=20, repeat=0.2, distinct2=0.9, eos_rate=1.0)
    serving = gate.GateReport(reward_mean=0.1, kl=0.0, mean_tokens=20, repeat=0.2, distinct2=0.9, eos_rate=1.0)
    assert gate.decide(ok, serving, cfg, reference_surprising=0.06) == (True, "passed")
    garbled = gate.GateReport(**{**ok.__dict__, "surprising": 0.25})
    passed, verdict = gate.decide(garbled, serving, cfg, reference_surprising=0.06)
    assert not passed and "garbled: 25% of responses" in verdict and "own: 6%" in verdict
    off = TrainerConfig(gate_max_surprising_increase=1.0)
    assert gate.decide(garbled, serving, off, reference_surprising=0.06)[0]


def test_ptx_data_corpus_file_or_users(tmp_path: Path) -> None:
    assert ptx_examples("") == []
    corpus = ptx_examples("corpus")
    assert len(corpus) == 2000 and all(p and a for p, a in corpus)
    f = tmp_path / "demos.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "answer": "hello!"}) + "\n\n")
    assert ptx_examples(str(f)) == [("hi", "hello!")]
    f.write_text('{"prompt": "hi"}\n')
    with pytest.raises(errors.InvalidArgument, match="line 1: need"):
        ptx_examples(str(f))
    with pytest.raises(errors.InvalidArgument, match="no file"):
        ptx_examples(str(tmp_path / "missing.jsonl"))
