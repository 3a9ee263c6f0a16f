"""bfloat16 and float16 inference on CPU: `model.to(dtype)` runs forward and generate (with and
without the KV cache), its logits stay close to float32's, and greedy decoding picks the same ids."""

from __future__ import annotations

import copy

import pytest
import torch

import lm
from lm.kv_cache import KVCache

PATTERN_TEXT = "the quick brown fox jumps over the lazy dog. " * 120  # conftest's pattern_text, for a module fixture

# Relative error of the logits (norm of the difference over the norm of the fp32 logits): about the
# unit roundoff of each format (bf16 2^-8, fp16 2^-11) times a few layers of accumulation.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
ARCHITECTURES = {
    "gpt2": dict(),
    "llama-like": dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, n_kv_heads=1),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request) -> lm.GPT:
    """A model trained briefly on a repeating text: unlike random weights, its greedy choices win by
    clear margins, so half-precision rounding cannot flip them (near-ties can flip either way)."""
    tok = lm.CharTokenizer.train(PATTERN_TEXT)
    ids = torch.tensor(tok.encode(PATTERN_TEXT))
    torch.manual_seed(0)
    config = lm.ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=48,
                            **ARCHITECTURES[request.param])
    model = lm.GPT(config, tokenizer=tok)
    lm.train(model, ids, ids, lm.TrainConfig(max_steps=80, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=80,
                                             eval_iters=2, progress=False))
    return model.eval()


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
def test_half_precision_logits_are_close_to_float32(trained, dtype):
    half = copy.deepcopy(trained).to(dtype)
    ids = torch.tensor(trained.tokenizer.encode(PATTERN_TEXT[:64])).reshape(2, 32)
    with torch.no_grad():
        reference, logits = trained(ids)[0], half(ids)[0]
    assert logits.dtype == dtype
    relative_error = ((logits.float() - reference).norm() / reference.norm()).item()
    assert relative_error < TOLERANCE[dtype]
    assert relative_error > 0  # it really ran in lower precision


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
def test_half_precision_greedy_ids_agree_with_and_without_the_cache(trained, dtype):
    half = copy.deepcopy(trained).to(dtype)
    assert KVCache(half, batch_size=1).layers[0].k.dtype == dtype  # the cache follows the weights
    tok = trained.tokenizer
    prompt = torch.tensor([tok.encode("the quick "), tok.encode("over the l")])
    # 10 + 20 tokens fit in block_size=32: cached and uncached decoding see the same context
    cached = half.generate(prompt, max_new_tokens=20, temperature=0)
    uncached = half.generate(prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, trained.generate(prompt, max_new_tokens=20, temperature=0))  # and with fp32's
    assert len(set(cached[:, 10:].flatten().tolist())) > 5  # real text, not one repeated token
    # left-padded text prompts of different lengths (the padding mask path) give the same text
    texts = half.generate(["the quick", "lazy"], max_new_tokens=20, temperature=0)
    assert texts == half.generate(["the quick", "lazy"], max_new_tokens=20, temperature=0, use_cache=False)
    assert texts == trained.generate(["the quick", "lazy"], max_new_tokens=20, temperature=0)
