"""Generation (`lm.generation`): GenerationConfig, cached == uncached for every attention variant,
the refill past block_size, padding, stops, logprobs, streaming, and generate's arguments."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import lm
from lm import GPT, CharTokenizer, GenerationConfig, ModelConfig, SamplingError
from lm.generation import Decoder, Generation, TextStream, showable

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


def refill_reference(model, prompt, n, keep):
    """Greedy decoding the way the cached loop reads the context: everything from the start of the
    cache, and when that would exceed block_size, a new cache from the last `keep` tokens."""
    block, ids = model.config.block_size, prompt
    start = max(0, ids.size(1) - block)
    for _ in range(n):
        if ids.size(1) - start > block:
            start = ids.size(1) - keep
        with torch.no_grad():
            logits = model(ids[:, start:])[0]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_generation_beyond_the_context_refills_from_the_last_three_quarters():
    """block_size 16, a prompt of 10 and 40 new tokens: the cache fills up and starts afresh from
    the last 12 tokens (3/4 of block_size) four times; every token after each refill is checked."""
    model = build("mha", block_size=16)
    prompt = torch.randint(0, 50, (2, 10))
    out = model.generate(prompt, max_new_tokens=40, temperature=0)
    assert torch.equal(out, refill_reference(model, prompt, 40, keep=12))
    assert not torch.equal(out, refill_reference(model, prompt, 40, keep=8))  # keeping half differs


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

    def forward(self, idx, targets=None, *, attention_mask=None, cache=None):
        B, T = idx.shape
        end = T if cache is None else cache.begin(T, attention_mask) + T
        if cache is not None:
            cache.end(T)
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


# ---- moved from the model's tests: generate's arguments and results ------------------------------
def test_generate_from_tensor_keeps_the_prompt(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    before = prompt.clone()
    out = tiny_model.generate(prompt, max_new_tokens=7, seed=0)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], before) and torch.equal(prompt, before)
    assert out.min() >= 0 and out.max() < tiny_config.vocab_size
    assert torch.equal(tiny_model.generate(prompt, max_new_tokens=0), prompt)


def greedy_reference(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_temperature_zero_is_greedy(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (3, 10))
    n = 12  # 10 + 12 > block_size 16: the context is cropped on the way
    out = tiny_model.generate(prompt, max_new_tokens=n, temperature=0)
    assert torch.equal(out, greedy_reference(tiny_model, prompt, n))
    assert torch.equal(out, tiny_model.generate(prompt, max_new_tokens=n, temperature=0, top_k=3))


def test_seeded_sampling_equals_a_multinomial_reference(tiny_model, tiny_config):
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    temperature, top_k = 0.7, 5
    out = tiny_model.generate(prompt, max_new_tokens=6, temperature=temperature, top_k=top_k, seed=123)
    generator, idx = torch.Generator().manual_seed(123), prompt
    for _ in range(6):
        with torch.no_grad():
            logits = tiny_model(idx)[0][:, -1] / temperature
        kth = torch.topk(logits, top_k).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    assert torch.equal(out, idx)


def test_context_longer_than_block_size_is_cropped(tiny_config):
    model = sharp_model(tiny_config)
    bs, n = tiny_config.block_size, 6
    prompts = torch.randint(0, tiny_config.vocab_size, (8, bs + 9))
    out = model.generate(prompts, max_new_tokens=n, temperature=0, use_cache=False)
    assert out.shape == (8, bs + 9 + n)
    assert torch.equal(out, greedy_reference(model, prompts, n))  # each step sees the last block_size tokens
    # not vacuous: a context one token shorter changes some greedy choices
    shorter = prompts.clone()
    for _ in range(n):
        with torch.no_grad():
            logits = model(shorter[:, -(bs - 1) :])[0]
        shorter = torch.cat([shorter, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert not torch.equal(out, shorter)


def test_text_prompt_needs_a_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_model.generate("hello", max_new_tokens=3)


@pytest.mark.parametrize("prompt", [[1, 2, 3], torch.tensor([1, 2, 3]), torch.zeros(1, 0, dtype=torch.long)])
def test_bad_prompts(tiny_model, prompt):
    with pytest.raises(ValueError, match="prompt must be"):
        tiny_model.generate(prompt, max_new_tokens=3)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": 0}, {"max_new_tokens": -1}])
def test_bad_generation_arguments(tiny_model, kwargs):
    args = {"max_new_tokens": 3} | kwargs
    with pytest.raises(SamplingError, match=next(iter(kwargs))):
        tiny_model.generate(torch.zeros(1, 1, dtype=torch.long), **args)


def test_text_generation_is_reproducible_with_a_seed(text_model):
    a = text_model.generate("the ", max_new_tokens=30, seed=1, stop_at_eos=False)
    b = text_model.generate("the ", max_new_tokens=30, seed=1, stop_at_eos=False)
    c = text_model.generate("the ", max_new_tokens=30, seed=2, stop_at_eos=False)
    assert isinstance(a, str) and a == b and a != c
    assert len(text_model.tokenizer.encode(a)) == 30  # the continuation only, without the prompt


def test_text_generation_with_empty_prompt(text_model):
    text = text_model.generate("", max_new_tokens=5, temperature=0, stop_at_eos=False)
    expected = greedy_reference(text_model, torch.tensor([[text_model.tokenizer.bos_id]]), 5)
    assert text == text_model.tokenizer.decode(expected[0, 1:].tolist())


class ScriptedGPT(GPT):
    """A GPT whose next token is read from a script indexed by the context length."""

    script: dict[int, int] = {}

    def forward(self, idx, targets=None, *, attention_mask=None, cache=None):
        B, T = idx.shape
        length = T if cache is None else cache.begin(T, attention_mask) + T  # with a cache, idx holds new tokens
        if cache is not None:
            cache.end(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[length]] = 100.0
        return logits, None


def test_generation_stops_at_eos():
    tok = CharTokenizer.train("ahix")
    model = ScriptedGPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, d_model=8),
                        tokenizer=tok)
    h, i, x = (tok.stoi[c] for c in "hix")
    model.script = {1: h, 2: i, 3: tok.eos_id, 4: x, 5: x, 6: x}
    assert model.generate("a", max_new_tokens=5, temperature=0) == "hi"
    assert model.generate("a", max_new_tokens=5, seed=0) == "hi"  # sampling, the same
    assert model.generate("a", max_new_tokens=5, temperature=0, stop_at_eos=False) == "hi<EOS>xx"
    assert model.generate("a", max_new_tokens=2, temperature=0) == "hi"
    ids = model.generate(torch.tensor([[tok.stoi["a"]]]), max_new_tokens=5, temperature=0)  # tensors never stop
    assert ids.shape == (1, 6)


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_mode(tiny_model, training):
    tiny_model.train(training)
    tiny_model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2)
    assert tiny_model.training is training
    assert all(m.training is training for m in tiny_model.modules())


def test_generate_runs_in_eval_mode(tiny_config):
    """With dropout, a model left in train mode still generates deterministically (dropout off)."""
    model = GPT(dataclasses.replace(tiny_config, dropout=0.5)).train()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    a = model.generate(prompt, max_new_tokens=6, temperature=0)
    b = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(a, b)
    model.eval()
    assert torch.equal(a, greedy_reference(model, prompt, 6))


def test_empty_text_prompt_starts_from_eos_when_the_tokenizer_has_no_bos():
    from lm.tokenizers import ByteBPETokenizer

    # byte-level BPE has an end-of-text token and no beginning one, as GPT-2's (which needs its ranks fetched)
    tok = ByteBPETokenizer.train("the cat sat on the mat, and the dog sat on the log. " * 20, vocab_size=262)
    assert tok.bos_id is None and tok.eos_id is not None
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=16)
    model = GPT(config, tokenizer=tok).eval()
    text = model.generate("", max_new_tokens=3, seed=0, temperature=0)
    first = model(torch.tensor([[tok.eos_id]]))[0][0, -1].argmax().item()
    assert text.startswith(tok.decode([first]))


# ---- streaming pieces ------------------------------------------------------------------------------
def test_text_stream_equals_decoding_everything(char_tokenizer):
    from lm.tokenizers import ByteBPETokenizer

    text = "Héllo wörld — naïve café, ünïcödé " * 4
    bpe = ByteBPETokenizer.train(text, vocab_size=285)
    for tok in (char_tokenizer, bpe):  # a window of tokens (char), bytes through a UTF-8 decoder (bpe)
        ids = tok.encode(text if tok is bpe else "the cat sat")
        stream, shown = TextStream(tok), ""
        for n in range(1, len(ids) + 1):
            shown += stream.add(ids[n - 1])
            assert tok.decode(ids[:n]).startswith(shown) and "\ufffd" not in shown
        assert shown == tok.decode(ids) and stream.shown == len(shown)
    random_ids = torch.randint(0, bpe.vocab_size, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    stream, shown = TextStream(bpe), ""
    for n in range(1, len(random_ids) + 1):  # bytes that break characters anywhere, invalid ones too
        shown += stream.add(random_ids[n - 1])
        whole = bpe.decode(random_ids[:n])
        assert whole.startswith(shown) and len(whole) - len(shown) <= 1  # at most one unfinished character


def test_text_stream_holds_back_a_possible_stop_string_and_stops_at_one(char_tokenizer):
    stream = TextStream(char_tokenizer, stop=["fox", "dog."])
    out = [stream.add(i) for i in char_tokenizer.encode("the quick do brown fo")]
    assert "".join(out) == "the quick do brown " and stream.pending == "fo" and not stream.done
    out = [stream.add(i) for i in char_tokenizer.encode("x jumps")]
    assert out == [""] * 7 and stream.done  # nothing after the stop string
    assert stream.shown == len("the quick do brown ")


class Counting:
    """Counts the ids a tokenizer decodes (every ByteBPETokenizer decode goes through decode_bytes)."""

    def __init__(self, tok):
        self.ids = 0
        inner = tok.decode_bytes

        def decode_bytes(ids):
            ids = list(ids)
            self.ids += len(ids)
            return inner(ids)

        tok.decode_bytes = decode_bytes


def test_streaming_and_stop_strings_decode_each_token_a_bounded_number_of_times():
    """Text streaming and stop-string checks must not re-decode the whole completion at every token
    (O(n^2)). The worst case for waiting on unfinished characters: a model that writes n bytes 0xFF,
    which never form a character (each decodes to U+FFFD). Counted: ids decoded, not seconds."""
    tok = lm.ByteBPETokenizer.train("abc abc", vocab_size=256 + 1, special_tokens=("<|endoftext|>",))
    n = 300
    model = Scripted(ModelConfig(vocab_size=tok.vocab_size, block_size=n + 8, n_layer=1, n_head=1, d_model=8),
                     tokenizer=tok)
    model.script = [255] * (n + 8)
    count = Counting(tok)
    pieces = list(model.stream("A", max_new_tokens=n, temperature=0, stop=["zz"]))
    assert "".join(pieces) == "\ufffd" * n and len(pieces) == n  # each shown as it comes
    assert count.ids <= 3 * n  # each new token once, then the whole text once; before: about n^2
    count.ids = 0
    assert model.generate("A", max_new_tokens=n, temperature=0, stop=["zz"]) == "\ufffd" * n
    assert count.ids <= 3 * n


# ---- memory: nothing reserved for tokens that may never come -----------------------------------------
def test_huge_max_new_tokens_reserves_nothing_up_front(char_tokenizer):
    """max_new_tokens=10**9: the first tokens come at once, and the buffers hold what the tokens so
    far need (the token buffer grows by doubling; the cache never exceeds block_size), not 10**9."""
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=16, n_layer=2, n_head=4,
                                    d_model=32, **VARIANTS["sliding_window"]))
    model.tokenizer = char_tokenizer
    assert len(list(itertools.islice(model.stream("the", max_new_tokens=10**9, temperature=0), 5))) == 5
    prompt = torch.randint(0, char_tokenizer.vocab_size, (2, 3))
    run = Generation(Decoder(model), prompt, GenerationConfig(max_new_tokens=10**9, temperature=0), None)
    steps = run.steps()
    for _ in range(40):  # past the 16-token context: the cache refills, the same size
        next(steps)
    assert run.ids.shape == (2, 3 + lm.generation.FIRST_ROOM) and run.logprobs.numel() == 2 * lm.generation.FIRST_ROOM
    assert run.cache.max_len == 16
    steps.close()


def test_the_cache_of_a_short_generation_holds_only_its_positions():
    """A large block_size and a short generation: the cache holds prompt + max_new_tokens positions,
    not the whole context."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=4096, n_layer=2, n_head=2, d_model=16)).eval()
    prompt = torch.randint(0, 50, (1, 3))
    run = Generation(Decoder(model), prompt, GenerationConfig(max_new_tokens=5, temperature=0), None)
    for _ in run.steps():
        pass
    assert run.cache.max_len == 8
    assert run.cache.nbytes() == 2 * 2 * 2 * 8 * 8 * 4  # layers, k and v, heads, positions, head dim, fp32
    assert torch.equal(run.result(), model.generate(prompt, max_new_tokens=5, temperature=0, use_cache=False))


def test_growing_buffers_give_the_same_ids_masks_and_logprobs(monkeypatch):
    """The token buffer, padding mask and log-probabilities grow by doubling; starting them at 3
    tokens gives what a buffer large enough from the start gives."""
    model = build("mqa+rope", block_size=16)
    prompt = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    kwargs = dict(max_new_tokens=30, temperature=1.0, top_k=10, seed=1, attention_mask=mask, return_logprobs=True)
    ids, logprobs = model.generate(prompt, **kwargs)
    monkeypatch.setattr(lm.generation, "FIRST_ROOM", 3)
    grown_ids, grown_logprobs = model.generate(prompt, **kwargs)
    assert torch.equal(grown_ids, ids) and torch.equal(grown_logprobs, logprobs)


def test_showable_holds_back_what_may_become_a_stop_string():
    assert showable("hello", []) == 5
    assert showable("hello\n", ["\n\n"]) == 5  # the newline may be the start of the stop string
    assert showable("hello\n\nworld", ["\n\n"]) == 5
    assert showable("abcEN", ["END", "xx"]) == 3
    assert showable("abc", ["END"]) == 3


def test_stream_with_a_stop_string_equals_generate(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2,
                                    d_model=16))
    model.tokenizer = char_tokenizer
    for seed in range(6):
        kwargs = dict(max_new_tokens=40, temperature=1.0, seed=seed, stop=["e ", "t"])
        pieces = list(model.stream("the", **kwargs))
        assert "".join(pieces) == model.generate("the", **kwargs)
        assert not any(s in "".join(pieces) for s in kwargs["stop"])


# ---- GenerationConfig and Decoder --------------------------------------------------------------
def test_generation_config_is_checked_once_where_it_is_made():
    config = GenerationConfig(max_new_tokens=20, temperature=0.7, top_k=5, stop="\n")
    assert config.stop == ("\n",) and config.sampling.top_k == 5
    for bad, word in [(dict(temperature=-1), "temperature"), (dict(top_p=1.5), "top_p"),
                      (dict(max_new_tokens=-1), "max_new_tokens"), (dict(stop=[""]), "stop"),
                      (dict(stop_tokens=[1.5]), "stop_tokens"), (dict(cuda_graph="yes"), "cuda_graph"),
                      (dict(seed=1.5), "seed")]:
        with pytest.raises(SamplingError, match=word):
            GenerationConfig(**bad)


def test_generation_config_build_changes_named_settings_and_refuses_unknown_ones():
    base = GenerationConfig(max_new_tokens=20, temperature=0.7)
    changed = GenerationConfig.build(base, top_p=0.9)
    assert (changed.max_new_tokens, changed.temperature, changed.top_p) == (20, 0.7, 0.9)
    assert base.top_p is None  # frozen: the original is untouched
    with pytest.raises(SamplingError, match="unknown generation option.*'temprature'.*temperature"):
        GenerationConfig.build(base, temprature=0.5)
    with pytest.raises(SamplingError, match="max_new_tokens=50"):
        GenerationConfig.build(50)  # generate(prompt, 50): the count must be named


def test_a_config_and_keywords_give_the_same_text(char_tokenizer):
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2,
                                    d_model=16))
    model.tokenizer = char_tokenizer
    config = GenerationConfig(max_new_tokens=15, temperature=0.9, top_k=8, seed=5, stop_at_eos=False)
    by_config = model.generate("the", config)
    assert by_config == model.generate("the", max_new_tokens=15, temperature=0.9, top_k=8, seed=5, stop_at_eos=False)
    assert by_config == lm.Decoder(model).generate("the", config)
    assert "".join(lm.Decoder(model).stream("the", config)) == by_config
    assert model.generate("the", config, seed=6) != by_config  # a keyword changes one setting of the config


def test_attention_weights_leave_no_hooks_behind(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (1, 6))
    tiny_model.attention_weights(idx)
    assert all(not block.attn._forward_pre_hooks for block in tiny_model.blocks)
    logits = tiny_model(idx)[0]
    assert logits.shape == (1, 6, tiny_config.vocab_size)


def test_log_probabilities_are_computed_only_when_asked_for():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=23, block_size=32, n_layer=1, n_head=2, d_model=16)).eval()
    prompt = torch.randint(0, 23, (2, 4))
    ids, logprobs = model.generate(prompt, max_new_tokens=6, temperature=0, return_logprobs=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0), ids)  # the same tokens without them
    full = torch.log_softmax(model(ids)[0][:, 3:-1].float(), dim=-1).gather(-1, ids[:, 4:, None])[..., 0]
    assert torch.allclose(logprobs, full, atol=1e-5)
    run = Generation(Decoder(model), prompt, GenerationConfig(max_new_tokens=3, temperature=0), None, logprobs=False)
    for _ in run.steps():
        pass
    assert run.logprobs is None and torch.equal(run.result(), ids[:, :7])
    with pytest.raises(ValueError, match="logprobs=False"):
        run.result(return_logprobs=True)


def test_plain_greedy_takes_the_argmax_of_the_raw_logits():
    from lm.sampling import SamplingConfig, choose_next, process_logits

    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0]], dtype=torch.bfloat16)  # ties: the first wins
    plain = SamplingConfig(temperature=0)
    ids, logp = choose_next(logits, torch.zeros(2, 0, dtype=torch.long), plain)
    assert ids.tolist() == [[1], [0]]
    assert torch.equal(ids, process_logits(logits, torch.zeros(2, 0, dtype=torch.long), plain).argmax(-1, keepdim=True))
    assert torch.allclose(logp, torch.log_softmax(logits.float(), -1).gather(-1, ids))
    assert choose_next(logits, torch.zeros(2, 0, dtype=torch.long), plain, logprobs=False)[1] is None
