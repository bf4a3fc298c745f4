"""Sampling functions against hand-computed values."""

import math

import pytest
import torch

from flywheel.policy.sampling import (
    FAILED,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    select_each,
    select_next,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    out = apply_repetition_penalty(logits, [torch.tensor([0, 1]), torch.tensor([0])], [2.0, 1.0])
    assert out.tolist() == [[1.0, -2.0, 0.5], [2.0, -1.0, 0.5]]  # row 2: penalty 1 is off
    assert logits[0, 0] == 2.0  # input untouched


def test_temperature_scales_rows_and_zero_means_one():
    out = apply_temperature(torch.tensor([[2.0, 4.0], [2.0, 4.0]]), torch.tensor([2.0, 0.0]))
    assert out.tolist() == [[1.0, 2.0], [2.0, 4.0]]


def test_top_k_keeps_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    out = top_k_filter(logits, torch.tensor([2, 0]))
    assert out[0].tolist() == [-INF, 3.0, 2.0, -INF]
    assert out[1].tolist() == [1.0, 3.0, 2.0, 0.0]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().repeat(4, 1)
    out = top_p_filter(logits, torch.tensor([0.9, 0.6, 0.4, 1.0]))
    kept = [(row > -INF).nonzero().flatten().tolist() for row in out]
    assert kept[0] == [0, 1, 3]  # 0.5 + 0.3 + 0.15 = 0.95 >= 0.9
    assert kept[1] == [1, 3]  # 0.5 + 0.3 >= 0.6
    assert kept[2] == [1]  # the top token alone already has 0.5 >= 0.4
    assert kept[3] == [0, 1, 2, 3]


def test_logprobs_are_log_softmax_of_temperature_scaled_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    lp = token_logprobs(logits, torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    assert math.isclose(lp[0].item(), math.log(0.75), rel_tol=1e-6)
    s3 = math.sqrt(3.0)
    assert math.isclose(lp[1].item(), math.log(s3 / (1 + s3)), rel_tol=1e-6)
    full = apply_temperature(logits, torch.tensor([2.0, 2.0])).log_softmax(-1).exp().sum(-1)
    assert torch.allclose(full, torch.ones(2))


def test_select_next_greedy_rows_take_argmax_and_sampled_rows_use_their_generator():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(1.0)]
    seen = [torch.tensor([], dtype=torch.long)] * 3

    def run(seed_row2: int, other_seed: int):
        gens = [None, torch.Generator().manual_seed(other_seed), torch.Generator().manual_seed(seed_row2)]
        return select_next(logits, params, seen, gens)

    tokens, logprobs = run(7, 1)
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()
    assert (logprobs <= 0).all()
    # Row 2 depends only on its own seed, not on what the other rows draw.
    for other in (2, 3, 4):
        assert run(7, other)[0][2] == tokens[2]
    draws = {run(s, 1)[0][2].item() for s in range(20)}
    assert len(draws) > 1


def test_do_sample_at_temperature_zero_samples_at_temperature_one():
    p = SamplingParams(temperature=0.0, do_sample=True)
    assert not p.greedy and p.effective_temperature == 1.0
    assert SamplingParams(temperature=0.0).greedy


def test_a_non_finite_row_gets_failed_and_the_other_rows_their_own_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[2, 3] = INF
    seen = [torch.tensor([], dtype=torch.long)] * 4
    for params in (
        [SamplingParams(temperature=0.0)] * 4,  # the all-greedy fast path
        [SamplingParams(temperature=0.0), SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.0)],
    ):
        for want_logprobs in (False, True):
            gens = [torch.Generator().manual_seed(b) for b in range(4)]
            tokens, lps = select_next(bad, params, seen, gens, want_logprobs)
            assert tokens[1] == tokens[2] == FAILED
            gens = [torch.Generator().manual_seed(b) for b in range(4)]
            clean, _ = select_next(logits, params, seen, gens, want_logprobs)
            assert (tokens[0], tokens[3]) == (clean[0], clean[3])  # rows 0 and 3 as if the others were fine
            if lps is not None:
                assert torch.isfinite(lps[[0, 3]]).all()


def test_a_temperature_that_overflows_fails_only_its_row():
    logits = torch.tensor([[3e38, 0.0, 1.0], [0.0, 2.0, 1.0]])  # finite, but / 0.5 is inf
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=0.5)]
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    tokens, _ = select_next(logits, params, [torch.tensor([], dtype=torch.long)] * 2, gens, False)
    assert tokens[0] == FAILED and 0 <= tokens[1] < 3


def test_select_each_confines_a_row_whose_sampling_raises():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)] * 3
    seen = [torch.tensor([1]), torch.tensor([999]), torch.tensor([2])]  # row 1: a token id past the vocabulary
    gens = [None] * 3
    with pytest.raises(RuntimeError):
        select_next(logits, params, seen, gens)
    tokens, lps = select_each(logits, params, seen, gens)
    assert tokens[1] == FAILED
    alone = [select_next(logits[b : b + 1], params[b : b + 1], seen[b : b + 1], gens[b : b + 1])[0][0] for b in (0, 2)]
    assert [tokens[0], tokens[2]] == alone and lps is not None
