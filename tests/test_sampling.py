from __future__ import annotations

import pytest
import torch

from lm import SamplingError, sample_next, top_k_filter
from lm.sampling import apply_temperature, check_sampling_args


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_filter_keeps_exactly_the_top_k(k):
    logits = torch.randn(4, 50)  # continuous values: no ties
    filtered = top_k_filter(logits, k)
    kept = torch.isfinite(filtered)
    assert torch.all(kept.sum(-1) == k)
    expected = torch.zeros_like(kept).scatter_(-1, torch.topk(logits, k).indices, True)
    assert torch.equal(kept, expected)
    assert torch.equal(filtered[kept], logits[kept])
    assert torch.all(filtered[~kept] == float("-inf"))


def test_top_k_larger_than_vocabulary_keeps_everything():
    logits = torch.randn(2, 6)
    assert torch.equal(top_k_filter(logits, 100), logits)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum().item() == 3


def test_top_k_does_not_modify_its_input():
    logits = torch.randn(3, 9)
    before = logits.clone()
    top_k_filter(logits, 2)
    assert torch.equal(logits, before)


def test_temperature_scales_the_logits():
    logits = torch.randn(2, 7)
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    # higher temperature, flatter distribution: higher entropy
    def entropy(t):
        p = torch.softmax(apply_temperature(logits, t), -1)
        return -(p * p.log()).sum(-1)
    assert torch.all(entropy(2.0) > entropy(1.0)) and torch.all(entropy(1.0) > entropy(0.5))


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    out = sample_next(logits, temperature=0.0)
    assert out.shape == (5, 1) and out.dtype == torch.long
    assert torch.equal(out, logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next(logits, temperature=0, top_k=4), out)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 20)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = {tuple(sample_next(logits, 1.0, generator=torch.Generator().manual_seed(s)).flatten().tolist())
             for s in range(5)}
    assert len(draws) > 1


def test_sampling_equals_torch_multinomial_reference():
    logits = torch.randn(6, 40)
    out = sample_next(logits, temperature=0.8, top_k=7, generator=torch.Generator().manual_seed(3))
    scaled = logits / 0.8
    kth = torch.topk(scaled, 7).values[:, -1:]
    probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, expected)


def test_sampling_from_a_nearly_one_hot_distribution():
    logits = torch.zeros(16, 100)
    winners = torch.randint(0, 100, (16,))
    logits[torch.arange(16), winners] = 60.0
    for seed in range(3):
        out = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.flatten(), winners)


def test_top_1_always_picks_the_argmax_even_when_hot():
    logits = torch.randn(10, 25)
    out = sample_next(logits, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, logits.argmax(-1, keepdim=True))


def test_sample_frequencies_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    draws = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    # top-k 2 puts all the mass on the two largest, in the renormalised proportion
    draws = sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0)).flatten()
    assert set(draws.tolist()) == {1, 2}
    assert (draws == 2).float().mean().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.015)


@pytest.mark.parametrize("temperature, top_k, max_new_tokens, name", [
    (-0.1, None, 5, "temperature"),
    ("hot", None, 5, "temperature"),
    (1.0, 0, 5, "top_k"),
    (1.0, -3, 5, "top_k"),
    (1.0, 2.5, 5, "top_k"),
    (1.0, None, -1, "max_new_tokens"),
    (1.0, None, 2.0, "max_new_tokens"),
])
def test_bad_arguments(temperature, top_k, max_new_tokens, name):
    with pytest.raises(SamplingError, match=name):
        check_sampling_args(temperature, top_k, max_new_tokens)


def test_good_arguments_pass():
    check_sampling_args(0, None, 0)
    check_sampling_args(1.5, 1, 10)
    assert issubclass(SamplingError, ValueError)
