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
    step = decoder._kept[2]
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert decoder._kept[2] is step  # same batch size: captured once
    model.double()  # new tensors: the old graph would read freed memory
    assert torch.equal(decoder.generate(prompt, max_new_tokens=8, temperature=0, cuda_graph=False),
                       decoder.generate(prompt, max_new_tokens=8, temperature=0))
    assert decoder._kept[2] is not step
    assert "_graphed_decoder" not in vars(model)  # the model itself keeps nothing
