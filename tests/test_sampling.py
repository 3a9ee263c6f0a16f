"""Sampling: each step against Hugging Face transformers' logits processors, properties of the
filters (hypothesis), seeded draws against torch.multinomial, log-probabilities and argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm import (
    GPT, ModelConfig, SamplingConfig, SamplingError, choose_next, min_p_filter, process_logits, sample_next,
    top_k_filter, top_p_filter,
)
from lm.sampling import apply_temperature, no_repeat_ngram, repetition_penalty


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


@pytest.mark.parametrize("temperature, top_k, name", [
    (-0.1, None, "temperature"),
    ("hot", None, "temperature"),
    (1.0, 0, "top_k"),
    (1.0, -3, "top_k"),
    (1.0, 2.5, "top_k"),
])
def test_bad_arguments(temperature, top_k, name):
    with pytest.raises(SamplingError, match=name):
        SamplingConfig(temperature, top_k)


def test_good_arguments_pass():
    SamplingConfig(0, None)
    SamplingConfig(1.5, 1)
    assert issubclass(SamplingError, ValueError)


# ---- the composable steps: top-p, min-p, repetition penalty, no-repeat n-gram ---------------------------

NEG_INF = float("-inf")


def random_logits(B=8, V=50, seed=0):
    """Rows of different sharpness, so the filters keep anything from one token to most of them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 4.0, B).unsqueeze(1)
    return torch.randn(B, V, generator=g) * scale


def random_history(B=8, t=12, high=6, seed=0):
    """Ids from a small range, so tokens and n-grams repeat."""
    return torch.randint(0, high, (B, t), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, theirs):
    """Same -inf positions, same finite values."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = torch.isfinite(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


# Parity with Hugging Face transformers' logits processors. Its keyword min_tokens_to_keep defaults to 1,
# which is our "always keep the most likely token"; we do not offer keeping more.

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("p", [0.01, 0.2, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_hugging_face(hf, p):
    for seed in range(3):
        logits, ids = random_logits(seed=seed), random_history(seed=seed)
        assert_same_logits(top_p_filter(logits, p), hf.TopPLogitsWarper(p)(ids, logits.clone()))


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.3, 0.7, 1.0])
def test_min_p_matches_hugging_face(hf, min_p):
    for seed in range(3):
        logits, ids = random_logits(seed=seed), random_history(seed=seed)
        assert_same_logits(min_p_filter(logits, min_p), hf.MinPLogitsWarper(min_p)(ids, logits.clone()))


@pytest.mark.parametrize("k", [1, 2, 10, 50, 80])
def test_top_k_matches_hugging_face(hf, k):
    logits, ids = random_logits(), random_history()
    assert_same_logits(top_k_filter(logits, k), hf.TopKLogitsWarper(k)(ids, logits.clone()))


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.5])
def test_temperature_matches_hugging_face(hf, temperature):
    logits, ids = random_logits(), random_history()
    theirs = hf.TemperatureLogitsWarper(temperature)(ids, logits.clone())
    assert_same_logits(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_hugging_face(hf, penalty):
    for seed in range(3):
        logits, ids = random_logits(V=10, seed=seed), random_history(seed=seed)  # positive and negative logits
        ours = repetition_penalty(logits, ids, penalty)
        assert_same_logits(ours, hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("t", [1, 3, 12, 40])
def test_no_repeat_ngram_matches_hugging_face(hf, n, t):
    banned_any = False
    for seed in range(3):
        logits, ids = random_logits(V=10, seed=seed), random_history(t=t, high=4, seed=seed)
        ours = no_repeat_ngram(logits, ids, n)
        assert_same_logits(ours, hf.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone()))
        banned_any |= bool(torch.isinf(ours).any())
    assert banned_any or t < 12  # with a long enough history the comparison was not vacuous


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, no_repeat_ngram_size=2),
    SamplingConfig(temperature=1.3, top_p=0.5, repetition_penalty=0.8, no_repeat_ngram_size=3),
    SamplingConfig(temperature=0.5, top_k=5, min_p=0.2),
    SamplingConfig(repetition_penalty=1.5),
])
def test_process_logits_matches_a_hugging_face_chain_in_its_order(hf, config):
    steps = []
    if config.repetition_penalty != 1.0:
        steps.append(hf.RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)))
    if config.no_repeat_ngram_size:
        steps.append(hf.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    steps.append(hf.TemperatureLogitsWarper(float(config.temperature)))
    if config.top_k:
        steps.append(hf.TopKLogitsWarper(config.top_k))
    if config.top_p:
        steps.append(hf.TopPLogitsWarper(config.top_p))
    if config.min_p:
        steps.append(hf.MinPLogitsWarper(config.min_p))
    chain = hf.LogitsProcessorList(steps)
    for seed in range(3):
        logits, ids = random_logits(V=30, seed=seed), random_history(t=20, high=8, seed=seed)
        assert_same_logits(process_logits(logits, ids, config), chain(ids, logits.clone()))


# Intentional differences from Hugging Face, each tested explicitly.

def test_top_p_keeps_every_token_tied_with_the_last_one_kept(hf):
    # Hugging Face keeps whichever of the four equal tokens its sort puts last; we keep all four,
    # as top_k_filter does, so the result never depends on sort order.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0]])
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, True, True, True, False]]
    assert torch.isfinite(hf.TopPLogitsWarper(0.5)(None, logits.clone())).sum().item() < 4


def test_top_p_one_keeps_even_tokens_whose_probability_underflows(hf):
    # Hugging Face's top_p=1.0 drops tokens whose probability rounds to 0 (its generate() skips the
    # warper at 1.0); ours is a no-op. The draw is the same: those tokens have probability 0 either way.
    logits = torch.tensor([[0.0, -200.0, 1.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.isinf(hf.TopPLogitsWarper(1.0)(None, logits.clone())).tolist() == [[False, True, False]]


def test_zero_means_off_where_hugging_face_refuses_it(hf):
    # no_repeat_ngram_size=0 is "off" here; Hugging Face's processor needs n >= 1. top_p=0 is an error
    # here (it would keep only the argmax: use temperature=0); Hugging Face accepts it.
    logits, ids = random_logits(), random_history()
    assert torch.equal(process_logits(logits, ids, SamplingConfig(no_repeat_ngram_size=0)), logits)
    with pytest.raises(ValueError):
        hf.NoRepeatNGramLogitsProcessor(0)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingConfig(top_p=0.0)


# Properties.

logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=40)


@given(logit_rows, st.floats(1e-4, 1.0))
@settings(max_examples=200)
def test_top_p_keeps_the_smallest_set_with_enough_mass(row, p):
    logits = torch.tensor([row])
    kept = torch.isfinite(top_p_filter(logits, p))[0]
    probs = torch.softmax(logits, -1)[0]
    assert kept.any() and kept[logits.argmax()]
    assert probs[kept].sum().item() >= p - 1e-5
    # Smallest: a kept token is never less likely than a dropped one, and without the tokens tied
    # at the cut the mass would fall short of p.
    if not kept.all():
        assert logits[0][kept].min() > logits[0][~kept].max()
        at_cut = logits[0] == logits[0][kept].min()
        assert probs[kept & ~at_cut].sum().item() < p + 1e-5


@given(logit_rows, st.floats(0.0, 1.0))
@settings(max_examples=200)
def test_min_p_keeps_the_argmax_and_the_tokens_likely_enough(row, min_p):
    logits = torch.tensor([row])
    kept = torch.isfinite(min_p_filter(logits, min_p))[0]
    probs = torch.softmax(logits, -1)[0]
    assert kept[logits.argmax()]
    assert torch.equal(kept, probs >= min_p * probs.max())


@given(st.lists(logit_rows.filter(lambda r: len(r) >= 6).map(lambda r: r[:6]), min_size=1, max_size=4),
       st.integers(0, 10), st.integers(0, 2**31))
@settings(max_examples=100)
def test_everything_off_changes_nothing(rows, t, seed):
    logits = torch.tensor(rows)
    ids = torch.randint(0, 6, (len(rows), t), generator=torch.Generator().manual_seed(seed))
    out = process_logits(logits, ids, SamplingConfig())
    assert torch.equal(out, logits) and out.data_ptr() != logits.data_ptr()
    assert torch.equal(repetition_penalty(logits, ids, 1.0), logits)
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_no_step_modifies_its_input():
    logits, ids = random_logits(), random_history()
    before = logits.clone()
    for out in [top_p_filter(logits, 1.0), top_p_filter(logits, 0.5), min_p_filter(logits, 0.3),
                repetition_penalty(logits, ids, 1.5), no_repeat_ngram(logits, ids, 2), no_repeat_ngram(logits, ids, 0),
                process_logits(logits, ids, SamplingConfig()),
                process_logits(logits, ids, SamplingConfig(0.5, 3, 0.9, 0.1, 1.2, 2))]:
        out.add_(1.0)  # writing to a result must not reach the input either
        assert torch.equal(logits, before)


def test_rows_are_processed_independently():
    config = SamplingConfig(temperature=0.8, top_k=15, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                            no_repeat_ngram_size=2)
    logits, ids = random_logits(V=20), random_history(t=15, high=10)
    batched = process_logits(logits, ids, config)
    for row in range(len(logits)):
        alone = process_logits(logits[row : row + 1], ids[row : row + 1], config)
        assert torch.equal(batched[row : row + 1], alone)


def test_repetition_penalty_lowers_seen_tokens_once_each():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    ids = torch.tensor([[0, 1, 1, 1, 4]])
    out = repetition_penalty(logits, ids, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    assert repetition_penalty(logits, ids, 0.5).tolist() == [[4.0, -1.0, 2.0, -2.0, 0.0]]


def test_no_repeat_ngram_bans_the_completion_of_a_seen_ngram():
    # "a b c a b" -> the next token would complete "a b ?", and "a b c" occurred: ban c.
    a, b, c = 0, 1, 2
    ids = torch.tensor([[a, b, c, a, b]])
    logits = torch.zeros(1, 4)
    assert torch.isinf(no_repeat_ngram(logits, ids, 3)).tolist() == [[False, False, True, False]]
    assert torch.isinf(no_repeat_ngram(logits, ids, 2)).tolist() == [[False, False, True, False]]  # "b c"
    assert torch.isinf(no_repeat_ngram(logits, ids, 1)).tolist() == [[True, True, True, False]]    # all seen
    assert not torch.isinf(no_repeat_ngram(logits, ids, 6)).any()  # longer than the history


@given(st.integers(0, 2**31), st.integers(1, 4), st.floats(0.2, 3.0))
@settings(max_examples=60)
def test_padding_positions_are_ignored(seed, n, penalty):
    # Left padding (as in batched generation) of a different length per row, filled with junk ids.
    g = torch.Generator().manual_seed(seed)
    B, t, V = 4, 10, 6
    ids = torch.randint(0, 4, (B, t), generator=g)
    lengths = torch.randint(0, t + 1, (B,), generator=g)
    mask = torch.arange(t) >= (t - lengths).unsqueeze(1)
    junk = ids.masked_fill(~mask, V - 1)  # token V-1 only ever occurs as padding
    logits = torch.randn(B, V, generator=g)
    for step, arg in [(repetition_penalty, penalty), (no_repeat_ngram, n)]:
        out = step(logits, junk, arg, mask=mask)
        assert torch.equal(out, step(logits, ids, arg, mask=mask))  # what padding holds does not matter
        assert out[:, V - 1].tolist() == logits[:, V - 1].tolist()
        for row in range(B):  # each row as if it had only its real tokens
            real = ids[row][mask[row]].unsqueeze(0)
            assert torch.equal(out[row : row + 1], step(logits[row : row + 1], real, arg))


def test_padding_in_the_middle_of_a_row_is_skipped_over():
    # The real tokens "a b | a" with padding between: "a b" occurred, so after "a" ban b.
    ids = torch.tensor([[0, 1, 3, 3, 0]])
    mask = torch.tensor([[True, True, False, False, True]])
    banned = torch.isinf(no_repeat_ngram(torch.zeros(1, 4), ids, 2, mask=mask))
    assert banned.tolist() == [[False, True, False, False]]


# choose_next: greedy, seeded draws, log-probabilities.

FULL = SamplingConfig(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.2, no_repeat_ngram_size=2)


def test_greedy_is_the_argmax_after_the_penalties():
    logits, ids = random_logits(V=10), random_history(high=6)
    next_ids, _ = choose_next(logits, ids, SamplingConfig(temperature=0))
    assert torch.equal(next_ids, logits.argmax(-1, keepdim=True))
    greedy = SamplingConfig(temperature=0, top_k=3, top_p=0.5, repetition_penalty=3.0, no_repeat_ngram_size=2)
    next_ids, _ = choose_next(logits, ids, greedy)
    penalised = no_repeat_ngram(repetition_penalty(logits, ids, 3.0), ids, 2)
    assert torch.equal(next_ids, penalised.argmax(-1, keepdim=True))
    assert not torch.equal(next_ids, logits.argmax(-1, keepdim=True))  # the penalties mattered


def test_choose_next_is_reproducible_with_a_seed():
    logits, ids = random_logits(), random_history()
    a = choose_next(logits, ids, FULL, torch.Generator().manual_seed(7))
    b = choose_next(logits, ids, FULL, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(choose_next(logits, ids, FULL, torch.Generator().manual_seed(s))[0].flatten().tolist())
             for s in range(5)}
    assert len(draws) > 1


def test_choose_next_draws_from_the_processed_distribution():
    logits, ids = random_logits(), random_history()
    next_ids, _ = choose_next(logits, ids, FULL, torch.Generator().manual_seed(3))
    probs = torch.softmax(process_logits(logits, ids, FULL), -1)
    assert torch.equal(next_ids, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)))
    assert torch.all(probs.gather(-1, next_ids) > 0)  # never a filtered token


@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=0), FULL])
def test_logprobs_are_the_raw_log_softmax_at_the_chosen_ids(config):
    logits, ids = random_logits(), random_history()
    next_ids, logprobs = choose_next(logits, ids, config, torch.Generator().manual_seed(0))
    assert next_ids.shape == logprobs.shape == (8, 1)
    assert next_ids.dtype == torch.long and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, next_ids))


def test_choose_next_accepts_half_precision_logits():
    logits = random_logits().to(torch.bfloat16)
    next_ids, logprobs = choose_next(logits, random_history(), FULL, torch.Generator().manual_seed(0))
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.float(), -1).gather(-1, next_ids))


# V=3, n=2. Row 1 "a a b a c a": after "a", every 2-gram "a ?" has occurred, so every token is banned.
# Row 0 "a a c a c a": "a a" and "a c" occurred, so only b (1) is left.
ALL_BANNED = torch.tensor([[0, 0, 2, 0, 2, 0], [0, 0, 1, 0, 2, 0]])


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0, no_repeat_ngram_size=2),
    SamplingConfig(no_repeat_ngram_size=2),
    SamplingConfig(temperature=0.7, top_k=2, top_p=0.9, min_p=0.1, repetition_penalty=1.3, no_repeat_ngram_size=2),
], ids=["greedy", "sampled", "every-filter"])
def test_a_row_with_every_token_banned_says_which_setting_to_change(config):
    logits = torch.randn(2, 3)
    assert torch.isneginf(process_logits(logits, ALL_BANNED, config)[1]).all()
    with pytest.raises(SamplingError, match=r"no_repeat_ngram_size=2 banned every token of row 1.*"
                                            r"Lower no_repeat_ngram_size"):
        choose_next(logits, ALL_BANNED, config, torch.Generator().manual_seed(0))
    # one token left is enough: row 0 alone has to take it
    assert choose_next(logits[:1], ALL_BANNED[:1], config, torch.Generator().manual_seed(0))[0].item() == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_generate_stops_with_a_sampling_error_when_no_token_is_left(temperature):
    model = GPT(ModelConfig(vocab_size=6, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()
    prompt = torch.tensor([[0, 1, 2]])
    # no_repeat_ngram_size=1 bans every token seen: after 3 new tokens, all 6 are used up
    ids = model.generate(prompt, max_new_tokens=3, temperature=temperature, seed=0, no_repeat_ngram_size=1)
    assert ids[0, 3:].sort().values.tolist() == [3, 4, 5]
    with pytest.raises(SamplingError, match="no_repeat_ngram_size=1 banned every token of row 0"):
        model.generate(prompt, max_new_tokens=4, temperature=temperature, seed=0, no_repeat_ngram_size=1)


def test_sample_next_takes_top_p_and_min_p():
    logits = random_logits()
    out = sample_next(logits, 0.8, 20, torch.Generator().manual_seed(1), top_p=0.9, min_p=0.05)
    config = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
    expected, _ = choose_next(logits, torch.empty(8, 0, dtype=torch.long), config, torch.Generator().manual_seed(1))
    assert torch.equal(out, expected)
    # top-p 0.8 over softmax([0, 1, 2, -1]) = [.09, .24, .64, .03] keeps tokens 2 and 1 (.88 >= .8)
    draws = sample_next(torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(2000, 4), top_p=0.8,
                        generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == {1, 2}


# Validation: the error names the argument and its valid range.

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), r"temperature=-0.5 must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(top_k=0), r"top_k=0 must be a positive integer"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_p=-0.1), r"top_p=-0.1 must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(top_p="0.9"), "top_p='0.9'"),
    (dict(min_p=-0.01), r"min_p=-0.01 must be in \[0, 1\]"),
    (dict(min_p=1.01), r"min_p=1.01 must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 must be a number > 0"),
    (dict(repetition_penalty=-1.2), r"repetition_penalty=-1.2 must be a number > 0"),
    (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size=-1 must be an integer >= 0"),
    (dict(no_repeat_ngram_size=2.0), r"no_repeat_ngram_size=2.0 must be an integer >= 0"),
])
def test_bad_sampling_config(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(top_p=0.0), dict(top_p=2.0), dict(min_p=-1.0), dict(temperature=-1.0)])
def test_sample_next_checks_its_arguments(kwargs):
    with pytest.raises(SamplingError, match=next(iter(kwargs))):
        sample_next(random_logits(), **kwargs)


def test_good_sampling_configs_pass():
    SamplingConfig(temperature=0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=0.5, no_repeat_ngram_size=0)
    SamplingConfig(top_p=1e-6, min_p=1.0, repetition_penalty=10, no_repeat_ngram_size=5)
    SamplingConfig(0.7, 40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, no_repeat_ngram_size=3)
