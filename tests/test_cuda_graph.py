"""Static-shape decoding (`KVCache(static=True)`, `GPT.decode_step`) and its CUDA-graph replay.

The static step is checked on CPU against the ordinary cached step for every attention variant;
the graph replay (CUDA only) against eager generation, token for token."""

from __future__ import annotations

import pytest
import torch

from lm import ModelConfig
from lm.generation import IncrementalText, showable
from lm.kv_cache import KVCache

from helpers import sharp_model
from test_generation import VARIANTS, build

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def decode_both(model, prompt, mask, steps):
    """Prefill both caches with the prompt, then feed the same greedy tokens to the ordinary cached
    step and to `decode_step`; returns both lists of (B, V) logits."""
    B, T0 = prompt.shape
    ordinary, static = KVCache(model, B), KVCache(model, B, static=True)
    with torch.no_grad():
        model(prompt, attention_mask=mask, cache=ordinary)
        first = model(prompt, attention_mask=mask, cache=static)[0][:, -1]
        token = first.argmax(-1, keepdim=True)
        full_mask = None if mask is None else torch.cat([mask, torch.ones(B, steps, dtype=torch.bool)], 1)
        out_ordinary, out_static = [], []
        for t in range(steps):
            L = T0 + t + 1
            a = model(token, attention_mask=None if full_mask is None else full_mask[:, :L], cache=ordinary)[0][:, -1]
            b = model.decode_step(token, static)[:, -1]
            static.advance(1)
            out_ordinary.append(a)
            out_static.append(b)
            token = a.argmax(-1, keepdim=True)
    assert static.length == ordinary.length == T0 + steps
    assert int(static.position) == static.length
    return out_ordinary, out_static


@pytest.mark.parametrize("name", VARIANTS)
def test_static_step_equals_the_cached_step(name):
    model = build(name)
    prompt = torch.randint(0, 50, (2, 7))
    ordinary, static = decode_both(model, prompt, None, steps=12)  # past every window and sparse block
    torch.testing.assert_close(torch.stack(static), torch.stack(ordinary), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha", "mqa+rope", "sliding_window+rope+gqa", "linear", "block_sparse"])
def test_static_step_keeps_left_padding_out(name):
    model = build(name)
    prompt = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is a shorter prompt, padded on the left
    ordinary, static = decode_both(model, prompt, mask, steps=10)
    torch.testing.assert_close(torch.stack(static), torch.stack(ordinary), atol=1e-5, rtol=1e-5)


def test_static_cache_reset_keeps_its_tensors():
    model = build("mha")
    cache = KVCache(model, 2, static=True)
    mask, position = cache.key_mask, cache.position
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)), attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2).bool(), cache=cache)
    assert int(cache.position) == 5 and not bool(cache.key_mask[0, 0])
    cache.reset()
    assert cache.key_mask is mask and cache.position is position  # a captured graph still reads these
    assert int(position) == 0 and bool(mask.all())


def test_cuda_graph_errors_name_the_reason():
    model = build("mha")
    prompt = torch.randint(0, 50, (1, 4))
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs need the model on a CUDA device"):
        model.generate(prompt, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompt, max_new_tokens=2, cuda_graph=True, use_cache=False)
    with pytest.raises(ValueError, match="compile=True compiles the CUDA-graph decoding step"):
        model.generate(prompt, max_new_tokens=2, compile=True)
    moe = sharp_model(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16, ffn="moe",
                                  n_experts=2, moe_top_k=1))
    from lm.cuda_graph import graph_unsupported
    assert "CUDA device" in graph_unsupported(moe)


# ---- streaming pieces ------------------------------------------------------------------------------
def test_incremental_text_equals_decoding_everything(char_tokenizer):
    from lm.tokenizers import ByteBPETokenizer

    text = "Héllo wörld — naïve café, ünïcödé " * 4
    bpe = ByteBPETokenizer.train(text, vocab_size=285)
    for tok in (char_tokenizer, bpe):
        ids = tok.encode(text if tok is bpe else "the cat sat")
        inc = IncrementalText(tok)
        for n in range(1, len(ids) + 1):
            inc.update(ids[:n])
            assert tok.decode(ids[:n]).startswith(inc.text)
        assert inc.text == tok.decode(ids)


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


# ---- the graph itself (CUDA) -----------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("name", VARIANTS)
def test_graph_generation_gives_the_eager_ids(name):
    model = build(name, block_size=24).cuda()
    prompt = torch.randint(0, 50, (3, 6), device="cuda")
    eager = model.generate(prompt, max_new_tokens=40, temperature=0, cuda_graph=False)  # refills past 24
    graphed = model.generate(prompt, max_new_tokens=40, temperature=0, cuda_graph=True)
    assert torch.equal(graphed, eager)
    sampled = [model.generate(prompt, max_new_tokens=20, temperature=1.0, top_k=10, seed=3, cuda_graph=g)
               for g in (False, True)]
    assert torch.equal(*sampled)


@cuda
def test_graph_generation_with_padding_and_compile(char_tokenizer):
    model = build("llama-like").cuda()
    prompt = torch.randint(0, 50, (2, 8), device="cuda")
    mask = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    mask[0, :4] = False
    eager = model.generate(prompt, max_new_tokens=16, temperature=0, attention_mask=mask, cuda_graph=False)
    graphed = model.generate(prompt, max_new_tokens=16, temperature=0, attention_mask=mask)
    compiled = model.generate(prompt, max_new_tokens=16, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(graphed, eager) and torch.equal(compiled, eager)


@cuda
def test_graph_generation_in_bfloat16():
    model = build("mqa+rope").cuda().to(torch.bfloat16)
    prompt = torch.randint(0, 50, (1, 5), device="cuda")
    assert torch.equal(model.generate(prompt, max_new_tokens=30, temperature=0),
                       model.generate(prompt, max_new_tokens=30, temperature=0, cuda_graph=False))


@cuda
def test_the_graph_is_kept_for_the_next_call_and_renewed_when_the_model_moves():
    model = build("mha").cuda()
    prompt = torch.randint(0, 50, (2, 5), device="cuda")
    first = model.generate(prompt, max_new_tokens=8, temperature=0)
    step = model._graphed_decoder.step
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert model._graphed_decoder.step is step  # same batch size: captured once
    model.double()  # new tensors: the old graph would read freed memory
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0, cuda_graph=False),
                       model.generate(prompt, max_new_tokens=8, temperature=0))
    assert model._graphed_decoder.step is not step
    import copy
    assert copy.deepcopy(model)._graphed_decoder.step is None
