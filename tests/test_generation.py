"""KV cache and generation: cached == uncached for every attention variant, padding, stops, streaming."""

from __future__ import annotations

import math

import pytest
import torch

import lm
from lm import GPT, ModelConfig
from lm.kv_cache import KVCache

from helpers import sharp_model

VARIANTS = {
    "mha": dict(),
    "manual": dict(attention="manual"),
    "gqa": dict(n_kv_heads=2),
    "mqa+rope": dict(n_kv_heads=1, pos="rope"),
    "sliding_window": dict(attention="sliding_window", window=5),
    "sliding_window+rope+gqa": dict(attention="sliding_window", window=6, pos="rope", n_kv_heads=2),
    "linear": dict(attention="linear"),
    "block_sparse": dict(attention="block_sparse", sparse_block=4, sparse_local=1, sparse_stride=2),
    "llama-like": dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, n_kv_heads=2),
    "sinusoidal+post-norm": dict(pos="sinusoidal", norm_position="post"),
}


def build(name: str, block_size: int = 40) -> GPT:
    torch.manual_seed(0)
    return sharp_model(ModelConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=4, d_model=32, **VARIANTS[name]))


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_a_full_forward(name):
    model = build(name)
    idx = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(model, batch_size=2)
        pieces = [model(idx[:, :7], cache=cache)[0]]  # a prompt, then chunks of 3 and single tokens
        for t in range(7, 22, 3):
            pieces.append(model(idx[:, t:t + 3], cache=cache)[0])
        for t in range(22, 30):
            pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=10, seed=3)])
def test_cached_and_uncached_generation_give_the_same_ids(name, sampling):
    model = build(name)
    prompt = torch.randint(0, 50, (3, 6))
    cached = model.generate(prompt, max_new_tokens=30, **sampling)
    uncached = model.generate(prompt, max_new_tokens=30, use_cache=False, **sampling)
    assert cached.shape == (3, 36)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 6:].flatten().tolist())) > 3  # not a degenerate constant output


def test_cached_generation_matches_hugging_face_llama_with_its_cache():
    pytest.importorskip("transformers")
    from hf_convert import llama_from_lm

    torch.manual_seed(1)
    ours = sharp_model(ModelConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, d_ff=64,
                             bias=False, pos="rope", norm="rmsnorm", norm_eps=1e-6, ffn="swiglu"))
    hf = llama_from_lm(ours)
    prompt = torch.randint(0, 61, (2, 5))
    expected = hf.generate(prompt, max_new_tokens=25, do_sample=False, use_cache=True, pad_token_id=0,
                           eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, max_new_tokens=25, temperature=0), expected)


@pytest.mark.parametrize("name", ["mha", "gqa", "sliding_window+rope+gqa"])
def test_generation_beyond_the_context_does_not_crash(name):
    model = build(name, block_size=16)
    prompt = torch.randint(0, 50, (2, 30))  # longer than the context already
    for use_cache in (True, False):
        out = model.generate(prompt, max_new_tokens=40, temperature=0, use_cache=use_cache)
        assert out.shape == (2, 70) and torch.equal(out[:, :30], prompt)


def test_cached_generation_beyond_the_context_refills_from_the_last_three_quarters():
    model = build("mha", block_size=16)
    prompt = torch.randint(0, 50, (1, 10))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    # up to 16 positions the cache holds everything; the 8th new token would be the 17th position:
    # the cache is full, so the model starts afresh from the last 12 (3/4 of block_size)
    ids = prompt
    for _ in range(8):
        context = ids if ids.size(1) <= 16 else ids[:, -12:]
        with torch.no_grad():
            logits = model(context)[0]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, :18], ids)


# ---- memory ----------------------------------------------------------------------------------------
def test_cache_memory_follows_the_kv_heads_and_the_window():
    def cache_bytes(**kw):
        model = GPT(ModelConfig(vocab_size=50, block_size=256, n_layer=2, n_head=8, d_model=64, **kw))
        return KVCache(model, batch_size=1).nbytes()

    full = cache_bytes()
    assert full == 2 * 2 * 8 * 256 * 8 * 4  # layers x (k, v) x heads x positions x head_dim x fp32
    assert cache_bytes(n_kv_heads=2) * 4 == full  # GQA: 4 query heads share each stored head
    assert cache_bytes(n_kv_heads=1) * 8 == full  # MQA
    assert cache_bytes(attention="sliding_window", window=32) * 8 == full  # a rolling buffer of 32
    assert cache_bytes(attention="linear") == 2 * 8 * (8 * 8 + 8) * 4  # a D x D state and a D sum per head


def test_full_cache_says_what_to_do():
    model = build("mha", block_size=8)
    cache = KVCache(model, batch_size=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises((RuntimeError, ValueError), match="block_size|full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ---- batches of prompts of different lengths --------------------------------------------------------
@pytest.mark.parametrize("name", ["mqa+rope", "sliding_window+rope+gqa", "llama-like"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(name, use_cache):
    model = build(name)
    a, b = torch.randint(1, 50, (1, 9)), torch.randint(1, 50, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :5] = False
    out = model.generate(batch, max_new_tokens=12, temperature=0, attention_mask=mask, use_cache=use_cache)
    assert torch.equal(out[0], model.generate(a, max_new_tokens=12, temperature=0)[0])
    assert torch.equal(out[1, 5:], model.generate(b, max_new_tokens=12, temperature=0)[0])


def test_list_of_text_prompts(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                              d_model=32, pos="rope"))
    model.tokenizer = char_tokenizer
    prompts = ["the quick", "a", "lazy dog."]
    texts = model.generate(prompts, max_new_tokens=10, temperature=0, stop_at_eos=False)
    assert texts == [model.generate(p, max_new_tokens=10, temperature=0, stop_at_eos=False) for p in prompts]


# ---- stopping and log-probabilities ----------------------------------------------------------------
def test_stop_strings_and_stop_tokens(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32))
    model.tokenizer = char_tokenizer
    free = model.generate("the", max_new_tokens=30, temperature=0, stop_at_eos=False)
    stop = free[10:12]
    cut = model.generate("the", max_new_tokens=30, temperature=0, stop=[stop, "@@"], stop_at_eos=False)
    assert cut == free[: free.index(stop)]
    prompt = torch.tensor([char_tokenizer.encode("the")])
    free_ids = model.generate(prompt, max_new_tokens=30, temperature=0)[0, 3:].tolist()
    token = free_ids[5]
    ids = model.generate(prompt, max_new_tokens=30, temperature=0, stop_tokens=[token])
    assert ids[0, 3:].tolist() == free_ids[: free_ids.index(token) + 1]  # up to and with the stop token


def test_logprobs_are_the_models_log_softmax(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32))
    prompt = torch.tensor([char_tokenizer.encode("the lazy")])
    ids, logprobs = model.generate(prompt, max_new_tokens=8, temperature=0.9, seed=1, return_logprobs=True)
    with torch.no_grad():
        reference = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)
    expected = reference[0, prompt.size(1) - 1:].gather(-1, ids[0, prompt.size(1):, None]).squeeze(-1)
    torch.testing.assert_close(logprobs[0], expected, atol=1e-5, rtol=1e-5)
    assert all(lp <= 0 for lp in logprobs[0].tolist())


def test_sampling_options_reach_the_sampler(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32))
    model.tokenizer = char_tokenizer
    greedy = model.generate("the", max_new_tokens=20, temperature=0, stop_at_eos=False)
    assert model.generate("the", max_new_tokens=20, top_p=1e-6, seed=0, stop_at_eos=False) == greedy
    assert model.generate("the", max_new_tokens=20, min_p=0.999999, seed=0, stop_at_eos=False) == greedy
    ids = model.generate(torch.tensor([char_tokenizer.encode("the")]), max_new_tokens=20, temperature=0,
                         no_repeat_ngram_size=2)[0].tolist()
    pairs = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]
    assert len(pairs) == len(set(pairs))  # no pair of tokens twice
    with pytest.raises(lm.SamplingError, match="top_p"):
        model.generate("the", max_new_tokens=2, top_p=1.5)


# ---- streaming -------------------------------------------------------------------------------------
def test_stream_yields_the_same_text_as_generate(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32))
    model.tokenizer = char_tokenizer
    pieces = list(model.stream("the", max_new_tokens=25, temperature=0.8, seed=4))
    assert len(pieces) > 5
    assert "".join(pieces) == model.generate("the", max_new_tokens=25, temperature=0.8, seed=4)


class Scripted(GPT):
    """Always predicts the next token of `self.script` (by position), with or without a cache."""

    script: list[int] = []

    def forward(self, idx, targets=None, attention_mask=None, cache=None):
        B, T = idx.shape
        end = T if cache is None else cache.length + T
        if cache is not None:
            cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[end - 1]] = 50.0
        return logits, None


def test_stream_holds_back_split_characters():
    text = "naïve café — 東京 and 🙂 smiles. " * 20
    tok = lm.ByteBPETokenizer.train(text, vocab_size=256 + 8, special_tokens=("<|endoftext|>",))
    target = "A café in 東京 🙂!"
    ids = tok.encode("A" + target)
    assert any(len(tok.encode(c)) > 1 for c in target)  # some characters span several byte tokens
    model = Scripted(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1, d_model=8), tokenizer=tok)
    model.script = ids[1:] + [tok.eos_id] * 5  # after "A", the model writes the target byte by byte
    pieces = list(model.stream("A", max_new_tokens=len(ids) + 2, temperature=0))
    assert "".join(pieces) == target == model.generate("A", max_new_tokens=len(ids) + 2, temperature=0)
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    assert "東" in pieces or any("東" in p for p in pieces)
    assert len(pieces) > 5


def test_stream_needs_text():
    model = build("mha")
    with pytest.raises(ValueError, match="text prompt"):
        next(model.stream(torch.zeros(1, 1, dtype=torch.long)))


def test_generation_leaves_no_trace():
    model = build("mha")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=5)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isfinite(model(torch.zeros(1, 4, dtype=torch.long))[0].sum().item())
