"""lm.cpu_kernels.rms_norm and silu_gate (the end of lm/csrc/causal.c): RMSNorm and SwiGLU's gate for float32 CPU
training, forward and backward, against float64 torch; their independence from the thread count and the build;
a LLaMA-style model's training step through them against torch's operations; where they are not used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm import GPT, ModelConfig, cpu_kernels
from lm.feedforward import SwiGLU
from lm.norms import RMSNorm, rms_norm

from helpers import assert_same_step, assert_steps_close, model_step

needs_kernel = pytest.mark.skipif(cpu_kernels.rows_unavailable(16) is not None,
                                  reason=f"lm's row kernels: {cpu_kernels.rows_unavailable(16)}")
SHAPES = [(1, 16), (5, 32), (3, 7, 48), (2, 65, 64), (2, 130, 384), (4, 256, 1536)]
LLAMA = dict(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=64, dropout=0.0, bias=False, pos="rope",
             norm="rmsnorm", norm_eps=1e-6, ffn="swiglu")


def tensors(shape: tuple, count: int, seed: int = 0, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for _ in range(count)]


def float64_grads(fn, inputs, grad):
    """(fn(*inputs), its gradients) in float64, `inputs` float32 tensors (None passes through)"""
    wide = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    out = fn(*wide)
    return out, torch.autograd.grad(out, [x for x in wide if x is not None], grad.double())


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_float64(shape, weighted):
    """Rows beyond one chunk of 64 and a last chunk that is short, widths of one register and of many, with and
    without a weight."""
    x, grad = tensors(shape, 2)
    weight = torch.randn(shape[-1], generator=torch.Generator().manual_seed(1)) if weighted else None
    inputs = [x.requires_grad_()] + ([weight.requires_grad_()] if weighted else [])
    out = cpu_kernels.rms_norm(x, weight, 1e-6)
    got = torch.autograd.grad(out, inputs, grad)
    want, want_grads = float64_grads(lambda x, w=None: rms_norm(x, w, 1e-6), [x, weight], grad)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0].double(), want_grads[0], rtol=1e-4, atol=1e-5)
    if weighted:
        rows = x.numel() // shape[-1]  # the weight's gradient sums this many numbers a column
        torch.testing.assert_close(got[1].double(), want_grads[1], rtol=1e-5, atol=1e-5 * rows ** 0.5)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_gate_matches_float64(shape):
    a, b, grad = tensors(shape, 3, seed=3)
    a.requires_grad_(), b.requires_grad_()
    out = cpu_kernels.silu_gate(a, b)
    got = torch.autograd.grad(out, (a, b), grad)
    want, want_grads = float64_grads(lambda a, b: F.silu(a) * b, [a, b], grad)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_silu_gate_far_tails_and_nan():
    """Far below zero SiLU is a tiny negative number, far above it is a; inf times a positive value stays inf, and
    a nan stays in its own place."""
    a = torch.tensor([[-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, float("inf"), float("nan")] + [0.5] * 7])
    out = cpu_kernels.silu_gate(a, torch.ones_like(a))
    want = F.silu(a.double())
    finite = torch.isfinite(want)
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=1e-6, atol=1e-7)
    assert out[0, 7] == float("inf") and out[0, 8].isnan() and torch.isfinite(out[0, 9:]).all()


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    x, b, grad = tensors((3, 100, 48), 3, seed=4)
    weight = torch.randn(48).requires_grad_()
    x.requires_grad_(), b.requires_grad_()
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            norm, gate = cpu_kernels.rms_norm(x, weight, 1e-5), cpu_kernels.silu_gate(x, b)
            results.append((norm, gate, *torch.autograd.grad((norm, gate), (x, weight, b), (grad, grad))))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def counting(monkeypatch) -> dict:
    calls = {"norm": 0, "gate": 0}
    for name, function in (("norm", cpu_kernels.RMSNormRows), ("gate", cpu_kernels.SiluGate)):
        real = function.apply

        def counted(*args, real=real, name=name):
            calls[name] += 1
            return real(*args)
        monkeypatch.setattr(function, "apply", counted)
    return calls


@needs_kernel
def test_a_float32_training_step_of_a_llama_style_model_takes_the_kernels_and_matches_torch(monkeypatch):
    config = ModelConfig(**LLAMA)
    ids = torch.randint(0, 40, (3, 32), generator=torch.Generator().manual_seed(1))
    calls = counting(monkeypatch)
    step = model_step(config, ids)
    assert calls == {"norm": 2 * config.n_layer + 1, "gate": config.n_layer}  # two norms a block, and the last
    monkeypatch.setattr(RMSNorm, "_in_c", lambda self, x: False)
    monkeypatch.setattr(SwiGLU, "_gate_in_c", staticmethod(lambda gate: False))
    torch_step = model_step(config, ids)
    assert calls == {"norm": 2 * config.n_layer + 1, "gate": config.n_layer}
    assert_steps_close(step, torch_step)


@needs_kernel
def test_where_the_kernels_are_not_used(monkeypatch):
    calls = counting(monkeypatch)
    ids = torch.randint(0, 40, (2, 16))
    GPT(ModelConfig(**{**LLAMA, "d_model": 40, "n_head": 2, "d_ff": 72}))(ids, ids)[1].backward()  # 40, 72 % 16
    model = GPT(ModelConfig(**LLAMA))
    with torch.no_grad():
        model(ids, ids)  # evaluation: no backward to save passes for
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, ids)
    model.double()(ids, ids)
    assert calls == {"norm": 0, "gate": 0}
    GPT(ModelConfig(**LLAMA))(ids, ids)[1].backward()
    assert calls == {"norm": 5, "gate": 2}


def test_inputs_they_do_not_take_are_named():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"weight \(16,\) must hold one number per channel of x \(4, 32\)"):
        cpu_kernels.rms_norm(x, torch.ones(16), 1e-5)
    with pytest.raises(ValueError, match="x must be float32 on the CPU, got torch.float64"):
        cpu_kernels.rms_norm(x.double(), None, 1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        cpu_kernels.rms_norm(x, None, -1.0)
    with pytest.raises(ValueError, match=r"a \(4, 32\) and b \(4, 16\) must have one shape"):
        cpu_kernels.silu_gate(x, x[:, :16])
    with pytest.raises(ValueError, match="empty a"):
        cpu_kernels.silu_gate(x[:0], x[:0])
    if cpu_kernels.rows_unavailable(16) is None:
        with pytest.raises(RuntimeError, match="a multiple of 16 floats, not 24"):
            cpu_kernels.silu_gate(x[:, :24], x[:, :24])


def test_switched_off_the_model_runs_torch(fresh, monkeypatch):
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    assert cpu_kernels.rows_unavailable(64) == "LM_CPU_KERNELS=0 is set"
    calls = counting(monkeypatch)
    ids = torch.randint(0, 40, (2, 16))
    GPT(ModelConfig(**LLAMA))(ids, ids)[1].backward()
    assert calls == {"norm": 0, "gate": 0}


@pytest.mark.skipif("avx512f" not in (cpu_kernels._cpu_flags() or ()), reason="the CPU has no AVX-512")
def test_the_avx512_and_avx2_builds_give_the_same_numbers(fresh, monkeypatch):
    x, b, grad = tensors((3, 70, 48), 3, seed=5)
    weight = torch.randn(48).requires_grad_()
    x.requires_grad_(), b.requires_grad_()

    q, cos, sin, q_grad = rope_inputs(2, 3, 37, 64)

    def run():
        norm, gate = cpu_kernels.rms_norm(x, weight, 1e-5), cpu_kernels.silu_gate(x, b)
        rotated = cpu_kernels.rope(q, cos, sin)
        return (norm.detach(), gate.detach(), rotated.detach(),
                *torch.autograd.grad((norm, gate, rotated), (x, weight, b, q), (grad, grad, q_grad)))

    wide, cpu_flags = run(), cpu_kernels._cpu_flags
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    cpu_kernels._load_causal.cache_clear()
    narrow = run()
    for got, want in zip(narrow, wide):
        assert torch.equal(got, want)
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", cpu_flags)
    monkeypatch.setenv("LM_CPU_KERNELS", "avx2")  # asked for on a CPU that has AVX-512
    assert "-mavx512f" not in cpu_kernels._causal_flags()
    cpu_kernels._load_causal.cache_clear()
    for got, want in zip(run(), wide):
        assert torch.equal(got, want)


# ---- the rotary embedding ------------------------------------------------------------------------------------
def rope_inputs(B: int, H: int, T: int, D: int, seed: int = 6):
    """q as a model's is, a strided view of its qkv projection's output, and the tables for positions 5 .. 5+T-1"""
    from lm.positions import rope_tables

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=g)
    q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2).requires_grad_()
    cos, sin = rope_tables(T, D, offset=5)
    return q, cos, sin, torch.randn(B, H, T, D, generator=g)


@needs_kernel
@pytest.mark.parametrize("B, H, T, D", [(1, 1, 1, 32), (2, 3, 37, 64), (2, 2, 9, 128)])
def test_rope_gives_the_written_out_rotation_bit_for_bit(B, H, T, D):
    """Products rounded, then added, as torch's `x * cos + rotate_half(x) * sin` and its backward do."""
    from lm.positions import apply_rotary

    q, cos, sin, grad = rope_inputs(B, H, T, D)
    out = cpu_kernels.rope(q, cos, sin)
    (dq,) = torch.autograd.grad(out, q, grad)
    want = apply_rotary(q, cos, sin)
    (want_dq,) = torch.autograd.grad(want, q, grad)
    assert out.is_contiguous() and torch.equal(out, want) and torch.equal(dq, want_dq)


@needs_kernel
def test_a_float32_llama_style_step_rotates_q_and_k_in_c(monkeypatch):
    config = ModelConfig(**{**LLAMA, "n_head": 2, "d_model": 128})  # heads of 64
    ids = torch.randint(0, 40, (3, 32), generator=torch.Generator().manual_seed(1))
    calls, real = [], cpu_kernels.RotaryRows.apply
    monkeypatch.setattr(cpu_kernels.RotaryRows, "apply", lambda *a: calls.append(1) or real(*a))
    step = model_step(config, ids)
    assert len(calls) == 2 * config.n_layer  # q and k in every layer
    from lm.positions import RotaryEmbedding
    monkeypatch.setattr(RotaryEmbedding, "_in_c", staticmethod(lambda q, k: False))
    torch_step = model_step(config, ids)
    assert len(calls) == 2 * config.n_layer
    assert_same_step(step, torch_step)


@needs_kernel
def test_where_rope_is_not_in_c(monkeypatch):
    """Heads of 16 floats, inference, autocast, float64 and decoding from a KV cache keep the written-out rotation."""
    calls, real = [], cpu_kernels.RotaryRows.apply
    monkeypatch.setattr(cpu_kernels.RotaryRows, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 40, (2, 16))
    GPT(ModelConfig(**{**LLAMA, "n_head": 4}))(ids, ids)[1].backward()  # 64 / 4 = heads of 16
    model = GPT(ModelConfig(**LLAMA))
    with torch.no_grad():
        model(ids, ids)
        model.generate(ids[:1, :4], max_new_tokens=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, ids)
    model.double()(ids, ids)
    assert calls == []


def test_rope_names_inputs_it_does_not_take():
    q, cos, sin, _ = rope_inputs(1, 2, 8, 32)
    with pytest.raises(ValueError, match=r"cos, sin \(T, D\), got \(1, 2, 8, 32\), \(7, 32\)"):
        cpu_kernels.rope(q, cos[:7], sin[:7])
    with pytest.raises(ValueError, match="cos must be float32 on the CPU, got torch.float64"):
        cpu_kernels.rope(q, cos.double(), sin)
    assert cpu_kernels.rope_unavailable(48) == "the kernel takes heads of a multiple of 32 floats, not 48"
