"""Speculative decoding (`lm.speculative`): greedy gives exactly the target's greedy tokens (prompts,
lengths, draft sizes, past block_size), the caches step back correctly (`KVCache.crop`), the
statistics add up, speculative sampling keeps the target's distribution, and wrong inputs get
clear errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lm
from lm import CharTokenizer, GPT, ModelConfig
from lm.kv_cache import KVCache
from lm.speculative import SpeculativeStats, speculative_generate

from helpers import sharp_model

V = 50


def model(seed: int, block_size: int = 40, vocab: int = V, **options) -> GPT:
    torch.manual_seed(seed)
    settings = dict(n_layer=2, n_head=4, d_model=32) | options
    return sharp_model(ModelConfig(vocab_size=vocab, block_size=block_size, **settings))


def nudged(target: GPT, noise: float, seed: int = 0) -> GPT:
    """The target with noise on its weights: a draft that agrees with it often, but not always."""
    draft = copy.deepcopy(target)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p))
    return draft


@pytest.fixture(scope="module")
def target():
    return model(0)


@pytest.mark.parametrize("num_draft", [1, 2, 4, 7])
@pytest.mark.parametrize("drafts", ["random", "nudged", "itself", "small, short context"])
def test_greedy_gives_the_targets_greedy_tokens(target, drafts, num_draft):
    """Prompts of several lengths, 60 new tokens: past block_size (40) from every prompt, so both
    windows start afresh several times; and a prompt longer than the context."""
    draft = {"random": lambda: model(1), "nudged": lambda: nudged(target, 0.15), "itself": lambda: target,
             "small, short context": lambda: model(2, block_size=16, n_layer=1, d_model=16)}[drafts]()
    generator = torch.Generator().manual_seed(num_draft)
    for length, new in [(1, 60), (5, 37), (23, 60), (45, 20)]:
        prompt = torch.randint(0, V, (1, length), generator=generator)
        expected = target.generate(prompt, max_new_tokens=new, temperature=0)
        out, stats = speculative_generate(target, draft, prompt, new, num_draft=num_draft, return_stats=True)
        assert torch.equal(out, expected), (drafts, num_draft, length)
        assert stats.new_tokens == new == stats.accepted + stats.steps  # each step: the kept drafts + one token
        assert stats.draft_forwards == stats.drafted <= num_draft * stats.steps


def test_acceptance_follows_how_well_the_draft_agrees(target):
    prompt = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(3))
    rates = {}
    for name, draft in [("itself", target), ("nudged", nudged(target, 0.15)), ("random", model(1))]:
        _, stats = speculative_generate(target, draft, prompt, 30, num_draft=4, return_stats=True)
        rates[name] = stats.acceptance_rate
        assert 1 <= stats.tokens_per_step <= 5
    assert rates["itself"] == 1.0 and 0.2 < rates["nudged"] < 1.0 and rates["random"] < 0.2, rates
    # with itself as the draft every step keeps all 4 guesses and adds the target's fifth token
    _, stats = speculative_generate(target, target, prompt, 25, num_draft=4, return_stats=True)
    assert stats.steps == 5 and stats.tokens_per_step == 5.0
    assert all(kept == len(guesses) == 4 for guesses, kept, _ in stats.rounds)


def test_rounds_record_what_each_step_kept(target):
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    out, stats = speculative_generate(target, nudged(target, 0.15), prompt, 30, num_draft=3, return_stats=True)
    rebuilt = prompt[0].tolist()
    for guesses, kept, token in stats.rounds:
        rebuilt += guesses[:kept] + [token]
    assert rebuilt == out[0].tolist()
    assert any(kept < len(guesses) for guesses, kept, _ in stats.rounds)  # some steps rejected a guess
    assert any(kept == len(guesses) > 0 for guesses, kept, _ in stats.rounds)  # and some kept them all


def test_text_prompts_give_generates_text():
    tok = CharTokenizer.train("To be, or not to be, that is the question: whether 'tis nobler in the mind")
    target = model(5, vocab=tok.vocab_size)
    target.tokenizer = tok
    draft = nudged(target, 0.2)
    draft.tokenizer = tok
    for prompt in ["To be", "", "whether 'tis"]:
        expected = target.generate(prompt, max_new_tokens=50, temperature=0)
        assert speculative_generate(target, draft, prompt, 50, num_draft=3) == expected
    draft.tokenizer = None  # a draft without a tokenizer is fine: the vocabularies agree
    assert speculative_generate(target, draft, "To be", 20) == target.generate("To be", max_new_tokens=20,
                                                                               temperature=0)


def test_zero_new_tokens_and_the_models_state(target):
    prompt = torch.tensor([[1, 2, 3]])
    draft = model(1).train()
    assert torch.equal(speculative_generate(target, draft, prompt, 0), prompt)
    speculative_generate(target, draft, prompt, 5)
    assert draft.training and not target.training  # each model is left in the mode it was in


def test_a_cache_crops_back_to_what_a_fresh_one_holds(target):
    """Feed 10 tokens, then 4 that will be rejected, crop back to 10 and feed 3 others: the logits
    equal those of a cache that never saw the rejected ones (dynamic and static caches)."""
    ids = torch.randint(0, V, (1, 13), generator=torch.Generator().manual_seed(5))
    rejected = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fresh = KVCache(target, 1)
        target(ids[:, :10], cache=fresh)
        expected = target(ids[:, 10:], cache=fresh)[0]
        for static in (False, True):
            cache = KVCache(target, 1, static=static)
            target(ids[:, :10], cache=cache)
            target(rejected, cache=cache)
            assert cache.length == 14
            cache.crop(10)
            assert cache.length == 10
            torch.testing.assert_close(target(ids[:, 10:], cache=cache)[0], expected)
    with pytest.raises(ValueError, match="from 0 to the 13 positions"):
        cache.crop(14)
    window = model(0, attention="sliding_window", window=5)
    with pytest.raises(ValueError, match="RollingCache.*cannot be cropped"):
        KVCache(window, 1).crop(0)


def test_sampling_keeps_the_targets_distribution():
    """Speculative sampling of 3 tokens from a 5-token vocabulary, 3,000 seeds: the frequency of
    each of the 125 sequences is within 0.02 of its exact probability under the target, computed
    by enumeration, while the draft's own distribution is far from it. Fixed seeds: the same draws
    every run, so the test cannot flake."""
    target, draft = model(7, vocab=5, d_model=16), model(8, vocab=5, d_model=16)
    prompt = torch.tensor([[0, 3, 1]])

    def exact(m):
        probs = {}
        with torch.no_grad():
            for seq in itertools.product(range(5), repeat=3):
                ids = torch.cat([prompt, torch.tensor([seq])], 1)
                logp = m(ids)[0][0, 2:5].log_softmax(-1)
                probs[seq] = float(logp[[0, 1, 2], list(seq)].sum().exp())
        return probs

    p, q = exact(target), exact(draft)
    assert sum(abs(p[s] - q[s]) for s in p) / 2 > 0.3  # a draft this different gets rejected often
    runs = 3000
    counts = dict.fromkeys(p, 0)
    accepted = drafted = 0
    for seed in range(runs):
        out, stats = speculative_generate(target, draft, prompt, 3, num_draft=2, temperature=1.0, seed=seed,
                                          return_stats=True)
        counts[tuple(out[0, 3:].tolist())] += 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0.2 < accepted / drafted < 0.9  # both ways of choosing a token were exercised
    worst = max(abs(counts[s] / runs - p[s]) for s in p)
    assert worst < 0.02, worst
    again = speculative_generate(target, draft, prompt, 3, num_draft=2, temperature=1.0, seed=11)
    assert torch.equal(again, speculative_generate(target, draft, prompt, 3, num_draft=2, temperature=1.0, seed=11))


def test_sampling_with_filters_never_leaves_them(target):
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(8))
    draft = nudged(target, 0.15)
    out = speculative_generate(target, draft, prompt, 30, num_draft=3, temperature=0.8, top_k=1, seed=0)
    assert torch.equal(out, target.generate(prompt, max_new_tokens=30, temperature=0))  # top-1 is greedy
    sampled = speculative_generate(target, draft, prompt, 30, num_draft=3, temperature=1.5, top_p=0.9, seed=0)
    assert sampled.shape == (1, 35)


def test_wrong_inputs_get_clear_errors(target):
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="draft's vocabulary has 60 tokens and the target's 50"):
        speculative_generate(target, model(1, vocab=60), prompt)
    a, b = CharTokenizer.train("abcdefgh"), CharTokenizer.train("abcdefgz")
    assert a.vocab_size == b.vocab_size
    small_a, small_b = model(1, vocab=a.vocab_size), model(2, vocab=b.vocab_size)
    small_a.tokenizer, small_b.tokenizer = a, b
    with pytest.raises(ValueError, match="tokenizer .* is not the target's"):
        speculative_generate(small_a, small_b, "abc")
    with pytest.raises(ValueError, match="one sequence at a time, got a batch of 2"):
        speculative_generate(target, model(1), torch.zeros(2, 3, dtype=torch.long))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"num_draft=.* must be an integer >= 1"):
            speculative_generate(target, model(1), prompt, num_draft=bad)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        speculative_generate(target, model(1), prompt, -1)
    with pytest.raises(TypeError, match="draft must be an lm.GPT, got Linear"):
        speculative_generate(target, torch.nn.Linear(2, 2), prompt)
    with pytest.raises(TypeError, match="prompt must be a str or a"):
        speculative_generate(target, model(1), [1, 2, 3])
    with pytest.raises(ValueError, match="integer token ids"):
        speculative_generate(target, model(1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no tokenizer"):
        speculative_generate(target, model(1), "hello")
    with pytest.raises(ValueError, match="attention='linear'.*cannot step back"):
        speculative_generate(target, model(1, attention="linear"), prompt)
    with pytest.raises(lm.SamplingError, match="temperature"):
        speculative_generate(target, model(1), prompt, temperature=-1)
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs need the model on a CUDA device"):
        speculative_generate(target, model(1), prompt, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph='yes' must be True, False or None"):
        speculative_generate(target, model(1), prompt, cuda_graph="yes")


def test_stats_without_steps():
    stats = SpeculativeStats()
    assert stats.acceptance_rate == 0.0 and stats.tokens_per_step == 0.0


def test_the_shipped_draft_agrees_with_the_shipped_model():
    """The book's pair (chapter 7): same tokenizer, exact greedy tokens, and a draft good enough
    that most steps gain more than one token."""
    target = lm.load_model(lm.assets.path("shakespeare_char.pt"))
    draft = lm.load_model(lm.assets.path("shakespeare_char_draft.pt"))
    assert draft.tokenizer.to_dict() == target.tokenizer.to_dict()
    assert lm.count_params(draft.config) < lm.count_params(target.config) / 4
    prompt = "ROMEO:\nWhat light"
    text, stats = speculative_generate(target, draft, prompt, 120, num_draft=3, return_stats=True)
    assert text == target.generate(prompt, max_new_tokens=120, temperature=0)
    assert stats.acceptance_rate > 0.5 and stats.tokens_per_step > 2, stats
