"""Ready-made 4D attention masks: what transformers would compute, without its per-call mask builder."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from flywheel.core.masks import attention_mask_4d
from flywheel.policy import kvbatch
from flywheel.policy.config import EngineConfig
from flywheel.policy.kvbatch import load_model
from tests.unit.test_starter import tiny_starter


@pytest.fixture(scope="module")
def starter():
    return load_model(str(tiny_starter()), 0, EngineConfig(device="cpu"))


def test_the_decode_shortcut_is_the_last_row_of_the_full_mask() -> None:
    keys = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # the last row ends padded
    full = attention_mask_4d(keys, 5, torch.float32)
    assert torch.equal(attention_mask_4d(keys, 1, torch.float32), full[:, :, -1:])
    assert torch.isfinite(full.logsumexp(-1)).all()  # no query row is all -inf, padded ones included


def test_a_padded_prefill_with_our_mask_gives_each_prompt_its_logits_alone(starter) -> None:
    assert starter.mask_4d  # checked at load: the starter takes ready masks
    prompts = [starter.encode(p) for p in ("hi", "where is my order?", "how do I bake bread at home?")]
    n = max(map(len, prompts))
    ids = torch.full((len(prompts), n), starter.pad_id)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, n - len(p) :], mask[b, n - len(p) :] = torch.tensor(p), 1
    ready = starter.prefill_mask(mask)
    assert ready.shape == (3, 1, n, n)
    together = starter.forward(ids, ready, (mask.cumsum(-1) - 1).clamp(min=0), DynamicCache()).logits[:, -1]
    for b, p in enumerate(prompts):
        one = torch.tensor([p])
        alone = starter.forward(one, torch.ones_like(one), torch.arange(len(p))[None], DynamicCache()).logits[0, -1]
        torch.testing.assert_close(together[b], alone, atol=1e-4, rtol=1e-4)


def test_no_padding_or_a_huge_mask_is_left_to_transformers(starter, monkeypatch) -> None:
    assert starter.prefill_mask(torch.ones((2, 6), dtype=torch.long)).ndim == 2  # its causal fast path
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert starter.prefill_mask(padded).ndim == 4
    monkeypatch.setattr(kvbatch, "PREFILL_MASK_MAX", 2 * 4 * 4 - 1)
    assert starter.prefill_mask(padded).ndim == 2
