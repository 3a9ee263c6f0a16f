"""lm.cpu_kernels.bias_gelu (the end of lm/csrc/causal.c): the MLP's bias and exact GELU for float32 CPU
training, forward and backward with the bias's gradient, against float64 torch; its independence from the
thread count; the model's training step through it against F.gelu; where it is not used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm import GPT, ModelConfig, cpu_kernels
from lm.feedforward import MLP
from lm.lora import LoRAConfig, apply_lora

from helpers import assert_steps_close, model_step

needs_kernel = pytest.mark.skipif(cpu_kernels.bias_gelu_unavailable(16) is not None,
                                  reason=f"lm's bias-GELU kernel: {cpu_kernels.bias_gelu_unavailable(16)}")


def inputs(shape: tuple, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=g) * scale).requires_grad_()
    bias = torch.randn(shape[-1], generator=g).requires_grad_()
    return h, bias, torch.randn(*shape, generator=g)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 16), (5, 32), (3, 7, 48), (2, 65, 64), (2, 256, 1536), (130, 16)])
def test_forward_and_backward_match_float64(shape):
    """Rows beyond one chunk of 64 and a last chunk that is short; widths of one and of many registers."""
    h, bias, grad = inputs(shape)
    out = cpu_kernels.bias_gelu(h, bias)
    dh, dbias = torch.autograd.grad(out, (h, bias), grad)
    h64, bias64 = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    want = F.gelu(h64 + bias64)
    want_dh, want_dbias = torch.autograd.grad(want, (h64, bias64), grad.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh.double(), want_dh, rtol=1e-5, atol=1e-6)
    rows = h.numel() // shape[-1]  # the bias's gradient sums this many numbers a column
    torch.testing.assert_close(dbias.double(), want_dbias, rtol=1e-5, atol=1e-5 * rows ** 0.5)


@needs_kernel
def test_far_tails_infinities_and_nan():
    """Far below zero GELU is a tiny negative number or zero, far above it is x; inf stays inf, and -inf
    gives nan as torch's does (-inf times a probability of 0); a nan stays in its own place."""
    h = torch.tensor([[-60.0, -9.0, -5.0, 0.0, 5.0, 9.0, 60.0, float("inf"), float("-inf"), float("nan")] + [0.5] * 6])
    out = cpu_kernels.bias_gelu(h, torch.zeros(16))
    want = F.gelu(h.double())
    finite = torch.isfinite(want)
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=1e-6, atol=1e-7)
    assert out[0, 7] == float("inf") and out[0, 8].isnan() and out[0, 9].isnan()
    assert torch.isfinite(out[0, :7]).all() and torch.isfinite(out[0, 10:]).all()


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    h, bias, grad = inputs((3, 100, 48), seed=1)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = cpu_kernels.bias_gelu(h, bias)
            results.append((out, *torch.autograd.grad(out, (h, bias), grad)))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def counting(monkeypatch) -> list:
    calls, real = [], cpu_kernels.BiasGelu.apply
    monkeypatch.setattr(cpu_kernels.BiasGelu, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
def test_a_float32_training_step_takes_the_kernel_and_matches_torch(monkeypatch):
    config = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=64, dropout=0.0)
    ids = torch.randint(0, 40, (3, 32), generator=torch.Generator().manual_seed(1))
    calls = counting(monkeypatch)
    step = model_step(config, ids)
    assert len(calls) == config.n_layer
    monkeypatch.setattr(MLP, "_bias_gelu_in_c", lambda self, x: False)  # fc with its bias, then F.gelu
    torch_step = model_step(config, ids)
    assert len(calls) == config.n_layer
    assert_steps_close(step, torch_step)


@needs_kernel
def test_where_the_kernel_is_not_used(monkeypatch):
    calls = counting(monkeypatch)
    base = dict(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    ids = torch.randint(0, 40, (2, 16))
    for changes in ({"ffn": "gelu_tanh"}, {"bias": False}, {"d_ff": 72}, {"ffn": "swiglu"}):
        GPT(ModelConfig(**base, **changes))(ids, ids)[1].backward()
    model = GPT(ModelConfig(**base))
    with torch.no_grad():
        model(ids, ids)  # evaluation: no backward to save passes for
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, ids)
    model.double()(ids, ids)
    assert calls == []
    model = GPT(ModelConfig(**base))
    apply_lora(model, LoRAConfig(rank=2, targets=("fc",)))  # a LoRA layer in fc's place: its own forward
    model(ids, ids)[1].backward()
    assert calls == []
    GPT(ModelConfig(**base))(ids, ids)[1].backward()
    assert len(calls) == 1


def test_inputs_it_does_not_take_are_named():
    h = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"bias \(16,\) must hold one number per column of h \(4, 32\)"):
        cpu_kernels.bias_gelu(h, torch.zeros(16))
    with pytest.raises(ValueError, match="h must be float32 on the CPU, got torch.float64"):
        cpu_kernels.bias_gelu(h.double(), torch.zeros(32))
    with pytest.raises(ValueError, match="empty input"):
        cpu_kernels.bias_gelu(h[:0], torch.zeros(32))
    if cpu_kernels.bias_gelu_unavailable(16) is None:
        with pytest.raises(RuntimeError, match="a multiple of 16 floats, not 24"):
            cpu_kernels.bias_gelu(h[:, :24], torch.zeros(24))


def test_switched_off_the_mlp_runs_f_gelu(fresh, monkeypatch):
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    assert cpu_kernels.bias_gelu_unavailable(64) == "LM_CPU_KERNELS=0 is set"
    calls = counting(monkeypatch)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=32, dropout=0.0))
    ids = torch.randint(0, 40, (2, 16))
    model(ids, ids)[1].backward()
    assert calls == []


@pytest.mark.skipif("avx512f" not in (cpu_kernels._cpu_flags() or ()), reason="the CPU has no AVX-512")
def test_the_avx512_and_avx2_builds_give_the_same_numbers(fresh, monkeypatch):
    h, bias, grad = inputs((3, 70, 48), seed=2)

    def run():
        out = cpu_kernels.bias_gelu(h, bias)
        return out.detach(), *torch.autograd.grad(out, (h, bias), grad)

    wide = run()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    cpu_kernels._load_causal.cache_clear()
    narrow = run()
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)
