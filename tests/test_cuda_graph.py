"""Decoding through a CUDA graph (`lm.cuda_graph`, kept by `lm.Decoder`): clear errors where it
cannot run (checked on CPU), and on CUDA the same ids as eager decoding, token for token. The
static cache it replays is checked against the dynamic one on CPU in test_kv_cache.py."""

from __future__ import annotations

import pytest
import torch

import lm
from lm import ModelConfig

from helpers import sharp_model
from test_generation import VARIANTS, build

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


def test_model_generate_shares_one_decoder_left_out_of_copies():
    import copy
    import pickle

    model = build("mha")
    prompt = torch.randint(0, 50, (1, 5))
    first = model.generate(prompt, max_new_tokens=6, temperature=0)
    decoder = model.decoder
    assert model.decoder is decoder and not decoder.busy.locked()
    with decoder.busy:  # held by a call in another thread: this call makes its own, same ids
        assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0), first)
    tok = lm.CharTokenizer.train("the cat sat on the mat, a bat")
    texts = sharp_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    texts.tokenizer = tok
    pieces = texts.stream("the", max_new_tokens=8, temperature=0)
    assert texts.decoder.busy.locked()  # held while the stream runs ...
    assert "".join(pieces) == texts.generate("the", max_new_tokens=8, temperature=0)
    assert not texts.decoder.busy.locked()  # ... and let go when it ends
    pieces = texts.stream("the", max_new_tokens=10**6, temperature=0)
    next(pieces)
    del pieces  # dropped half way
    assert not texts.decoder.busy.locked()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_decoder" not in vars(twin) and twin.decoder is not decoder
        assert torch.equal(twin.generate(prompt, max_new_tokens=6, temperature=0), first)


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
def test_a_decoder_keeps_the_graph_and_renews_it_when_the_model_moves():
    model = build("mha").cuda()
    decoder = lm.Decoder(model)
    prompt = torch.randint(0, 50, (2, 5), device="cuda")
    first = decoder.generate(prompt, max_new_tokens=8, temperature=0)
    step = decoder._kept[-1]
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert decoder._kept[-1] is step  # same batch size: captured once
    model.double()  # new tensors: the old graph would read freed memory
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=0, cuda_graph=False),
                       decoder.generate(prompt, max_new_tokens=8, temperature=0))
    assert decoder._kept[-1] is not step
    assert "_graphed_decoder" not in vars(model)  # the model itself keeps nothing


@cuda
def test_a_decoder_sizes_its_static_cache_to_the_generation_and_reuses_a_longer_one():
    """The static cache holds the positions a generation needs, rounded up to a power of two (at
    least 64, at most block_size), not the whole context; a kept cache that is long enough is
    reused without a new capture."""
    torch.manual_seed(0)
    model = sharp_model(ModelConfig(vocab_size=50, block_size=512, n_layer=2, n_head=4, d_model=32)).cuda()
    decoder = lm.Decoder(model)
    prompt = torch.randint(0, 50, (1, 5), device="cuda")
    short = decoder.generate(prompt, max_new_tokens=8, temperature=0)
    assert decoder._kept[1].max_len == 64  # 13 positions
    step = decoder._kept[-1]
    long = decoder.generate(prompt, max_new_tokens=100, temperature=0)
    assert decoder._kept[1].max_len == 128 and decoder._kept[-1] is not step
    step = decoder._kept[-1]
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=0), short)
    assert decoder._kept[-1] is step  # long enough: reused as it is
    assert torch.equal(long, model.generate(prompt, max_new_tokens=100, temperature=0, cuda_graph=False))
    run = lm.generation.Generation(decoder, prompt, lm.GenerationConfig(max_new_tokens=10**9, temperature=0), None)
    steps = run.steps()
    for _ in range(600):  # past the context: refills in the same cache
        next(steps)
    steps.close()
    assert run.cache is decoder._kept[1] and run.cache.max_len == 512
    assert run.ids.shape == (1, 5 + lm.generation.FIRST_ROOM)


@cuda
def test_model_generate_keeps_its_decoder_between_calls():
    import copy

    model = build("mha").cuda()
    prompt = torch.randint(0, 50, (1, 5), device="cuda")
    first = model.generate(prompt, max_new_tokens=8, temperature=0)
    step = model.decoder._kept[-1]
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert model.decoder._kept[-1] is step  # replayed, not captured again
    assert "_decoder" not in vars(copy.deepcopy(model))  # a copy's tensors are its own
    with model.decoder.busy:  # another thread's call is running: this one gets a decoder of its own
        assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert model.decoder._kept[-1] is step
    model.decoder.release()
    assert model.decoder._kept is None


# ---- the serving engine's graphed step (CUDA) ---------------------------------------------------------
@cuda
@pytest.mark.parametrize("name", ["sdpa", "llama-like", "sliding_window"])
def test_the_engine_decodes_through_cuda_graphs_with_the_eager_ids(name):
    """lm.serving.Engine on a GPU replays its decoding step as a CUDA graph per batch bucket; the ids
    equal model.generate's for requests that join and leave the batch, across a slot-cache growth."""
    import threading

    from test_serving import build as build_serving
    from test_serving import prompts_of, reference

    model = build_serving(name, block_size=300).cuda()
    prompts = prompts_of((1, 4, 250, 9, 2, 17, 6))
    configs = [lm.GenerationConfig(max_new_tokens=12 + 3 * i, temperature=0, stop_at_eos=False) for i in range(7)]
    expected = [reference(model, ids, config) for ids, config in zip(prompts, configs)]
    engine = lm.serving.Engine(model, max_batch=4, cuda_graph=True)
    try:
        assert engine.graphs is not None
        results, reasons = [None] * len(prompts), [None] * len(prompts)

        def run(i):
            request = engine.submit(prompts[i], configs[i])
            for _ in request:
                pass
            results[i], reasons[i] = request.new_ids, (request.result.finish_reason, request.result.error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert reasons == [("length", None)] * len(prompts)  # no step failed (a failed step ends its requests)
        assert results == expected
        assert engine.graphs and engine.cache.room == 300
    finally:
        engine.close()
