"""Weight-only int8 and the decoding layout: exactness bounds, same tokens, smaller weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lm
from lm import cpu_kernels
from lm.quantize import Int8Linear, for_decoding, quantize_int8, quantize_weight, weight_bytes

from helpers import sharp_model


def test_quantize_weight_error_is_at_most_half_a_step():
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different sizes
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()  # per channel: each row has its own step


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_the_dequantized_product(bias):
    linear = nn.Linear(128, 96, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 128)
    reference = torch.nn.functional.linear(x, layer.dequantized(), linear.bias)
    out = layer(x)
    assert out.shape == (3, 5, 96)
    # the fused CPU kernel multiplies in bfloat16: about 3 significant digits
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.02)
    layer.fused = False  # the portable path: dequantize, then an ordinary float product
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)


def test_decoding_layout_keeps_shapes_values_and_parameters():
    linear = nn.Linear(64, 40)
    weight, x = linear.weight, torch.randn(2, 7, 64)
    before, values = linear(x), weight.detach().clone()
    for_decoding(linear, "columns")
    assert linear.weight is weight and weight.shape == (40, 64) and torch.equal(weight, values)
    assert weight.stride() == (1, 40)  # a contiguous (in, out) matrix underneath
    torch.testing.assert_close(linear(x), before, atol=1e-6, rtol=1e-6)
    for_decoding(linear, "columns")  # twice: nothing more changes
    assert weight.stride() == (1, 40)
    for_decoding(linear, "rows")  # back to nn.Linear's own order, for lm's compiled kernel
    assert linear.weight is weight and weight.stride() == (64, 1) and torch.equal(weight, values)
    with pytest.raises(ValueError, match="layout 'transposed'"):
        for_decoding(linear, "transposed")


def test_the_default_layout_is_the_one_the_decoding_products_read_fastest(monkeypatch):
    """Rows where lm's kernel runs (it streams each weight row by row), transposed for F.linear."""
    for why, strides in ((None, (64, 1)), ("switched off by the test", (1, 40))):
        monkeypatch.setattr(cpu_kernels, "unavailable", lambda: why)
        assert for_decoding(nn.Linear(64, 40)).weight.stride() == strides


def test_generate_on_cpu_lays_the_weights_out_for_decoding():
    """model.generate is as fast as the CLI: it lays the weights out itself, and the model still
    trains and saves as before."""
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, d_model=32))
    reference = copy.deepcopy(model)
    model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2)
    transposed = cpu_kernels.unavailable() is not None  # else rows, as lm's kernel reads them
    assert all(m.weight.is_contiguous() != transposed for m in model.modules() if isinstance(m, nn.Linear))
    idx = torch.randint(0, 50, (2, 16))
    for m in (model, reference):
        m.train()
        m(idx, idx)[1].backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("tie_weights", [True, False])
def test_quantized_model_is_four_times_smaller_and_close(tie_weights):
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=64,
                                  tie_weights=tie_weights)).eval()
    q = quantize_int8(copy.deepcopy(model))
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert [type(m) for m in linears] == ([nn.Linear] if tie_weights else [])  # a tied head stays float
    matrices = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear)
                   and m.weight is not model.tok_emb.weight)
    saved = weight_bytes(model) - weight_bytes(q)
    assert saved > 0.7 * matrices  # 4 bytes -> 1 byte per weight, plus a scale per row
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        a, b = model(idx)[0], q(idx)[0]
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_decoding_layout_gives_the_same_tokens():
    torch.manual_seed(0)
    model = sharp_model(lm.ModelConfig(vocab_size=50, block_size=40, n_layer=2, n_head=4, d_model=32))
    fast = for_decoding(copy.deepcopy(model))
    prompt = torch.randint(0, 50, (2, 5))
    assert torch.equal(fast.generate(prompt, max_new_tokens=30, temperature=0),
                       model.generate(prompt, max_new_tokens=30, temperature=0))


def test_int8_generation_mostly_agrees_with_float(pattern_text):
    """On a trained model, int8 greedy decoding follows the float model's choices."""
    tok = lm.CharTokenizer.train(pattern_text)
    ids = torch.tensor(tok.encode(pattern_text))
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=48),
                   tokenizer=tok)
    lm.train(model, ids, ids, lm.TrainConfig(max_steps=80, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=80,
                                             eval_iters=2, progress=False))
    q = quantize_int8(copy.deepcopy(model))
    text = model.generate("the quick", max_new_tokens=40, temperature=0)
    assert q.generate("the quick", max_new_tokens=40, temperature=0) == text
    with torch.no_grad():
        x, y = ids[None, :-1][:, :32], ids[None, 1:][:, :32]
        assert q(x, y)[1].item() == pytest.approx(model(x, y)[1].item(), rel=0.02)


def _stored_bytes(module: nn.Module) -> int:
    """Every tensor the module keeps, parameters and buffers, shared ones once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("bias", [True, False])
def test_weight_bytes_counts_every_tensor_a_layer_keeps(bias):
    linear = nn.Linear(32, 24, bias=bias)
    layer = Int8Linear(linear)
    assert weight_bytes(layer) == _stored_bytes(layer) == 32 * 24 + 24 * (4 + 2) + bias * 24 * 4  # int8, 2 scales
    transposed = for_decoding(linear, "columns")
    assert weight_bytes(transposed) == _stored_bytes(transposed) == (32 + bias) * 24 * 4


@pytest.mark.parametrize("tie_weights", [True, False])
def test_weight_bytes_of_a_quantized_model_is_everything_it_stores(tie_weights):
    # learned positions: the model has no derived buffers, so every tensor it keeps is a weight
    model = lm.GPT(lm.ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=64,
                                  tie_weights=tie_weights)).eval()
    for prepared in (quantize_int8(copy.deepcopy(model)), for_decoding(copy.deepcopy(model), "columns"), model):
        assert weight_bytes(prepared) == _stored_bytes(prepared)
    # RoPE's cos/sin tables are derived from the config, not weights
    rope = lm.GPT(lm.ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=64, pos="rope"))
    q = quantize_int8(rope)
    assert weight_bytes(q) == _stored_bytes(q) - sum(b.nbytes for b in q.rope.buffers()) < _stored_bytes(q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast_first", [True, False], ids=["cast-then-quantize", "quantize-then-cast"])
def test_int8_model_runs_in_half_precision(dtype, cast_first):
    """model.to(dtype) also casts the int8 layer's scales; the fused kernel still gets bfloat16 ones."""
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=64,
                                  tie_weights=False)).eval()
    q = quantize_int8(copy.deepcopy(model).to(dtype)) if cast_first else quantize_int8(copy.deepcopy(model)).to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        a, b = model(idx)[0], q(idx)[0]
    assert b.dtype == dtype
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()
    assert q.generate(idx[:, :4], max_new_tokens=8, temperature=0).shape == (2, 12)
