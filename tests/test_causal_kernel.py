"""lm.cpu_kernels.causal_attention (lm/csrc/causal.c): float32 causal attention for CPU training, forward
and backward, against float64 F.scaled_dot_product_attention; its independence from the thread count;
the model's training step through it against SDPA's flash kernel; where it is not used, and what
happens where it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm import GPT, ModelConfig, cpu_kernels
from lm.attention import kernels

from helpers import model_step

needs_kernel = pytest.mark.skipif(cpu_kernels.causal_unavailable() is not None,
                                  reason=f"lm's causal attention kernel: {cpu_kernels.causal_unavailable()}")


def heads(B: int, T: int, H: int, D: int, seed: int = 0, scale: float = 1.0):
    """A (B, T, 3 H D) leaf and q, k, v (B, H, T, D) views of it, strided as a model's are."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, 3 * H * D, generator=g) * scale).requires_grad_()
    return qkv, [x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2)]


def reference(qkv: torch.Tensor, H: int, D: int, grad: torch.Tensor):
    """Output and the leaf's gradient in float64 through SDPA."""
    exact = qkv.detach().double().requires_grad_()
    B, T, _ = exact.shape
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in exact.split(H * D, dim=2))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out, torch.autograd.grad(out, exact, grad.double())[0]


@needs_kernel
@pytest.mark.parametrize("B, T, H, D", [(1, 1, 1, 16), (2, 5, 3, 16), (1, 6, 2, 32), (2, 7, 2, 64), (1, 16, 1, 16),
                                        (1, 17, 2, 48), (1, 32, 2, 16), (2, 37, 3, 64), (1, 100, 2, 128),
                                        (2, 256, 6, 64)])
def test_forward_and_backward_match_float64(B, T, H, D):
    """Remainders of the 6- or 8-row and 16-column blocks (T = 32: a last block of 2 rows of 6), one position,
    long rows, every head size it takes."""
    qkv, (q, k, v) = heads(B, T, H, D)
    out = cpu_kernels.causal_attention(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, qkv, grad)[0]
    want, want_grad = reference(qkv, H, D, grad)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.double(), want_grad, rtol=1e-5, atol=2e-5)


@needs_kernel
def test_contiguous_inputs_and_a_strided_gradient():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 20, 32, generator=g, requires_grad=True) for _ in range(3))
    out = cpu_kernels.causal_attention(q, k, v)
    assert out.shape == (2, 3, 20, 32) and out.transpose(1, 2).is_contiguous()  # heads side by side, no copy
    grad = torch.randn(2, 20, 3, 32, generator=g).transpose(1, 2)  # what a model's backward hands it
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*exact, is_causal=True)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, exact, grad.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-5)


@needs_kernel
def test_large_scores_stay_finite_and_exact():
    """Scores in the hundreds: the softmax subtracts each row's largest before the exponential."""
    qkv, (q, k, v) = heads(1, 40, 2, 16, seed=3, scale=8.0)
    out = cpu_kernels.causal_attention(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, qkv, grad)[0]
    want, want_grad = reference(qkv, 2, 16, grad)
    assert torch.isfinite(out).all() and torch.isfinite(got).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), want_grad, rtol=1e-4, atol=1e-3)


@needs_kernel
def test_sharp_scores_with_subnormal_tails_match_float64():
    """q and k of standard deviation 20 spread each row's scores by hundreds, so most of its softmax is below
    float32's normal range (e^-90 = 8e-40); the kernel reads and writes those as zero (`tiny_as_zero`) and
    still matches float64, forward and backward."""
    g = torch.Generator().manual_seed(11)
    scale = torch.cat([torch.full((2 * 64,), 20.0), torch.ones(64)])  # v of standard deviation 1
    qkv = (torch.randn(2, 64, 3 * 64, generator=g) * scale).requires_grad_()
    q, k, v = (x.view(2, 64, 2, 32).transpose(1, 2) for x in qkv.split(64, dim=2))
    out = cpu_kernels.causal_attention(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
    got = torch.autograd.grad(out, qkv, grad)[0]
    want, want_grad = reference(qkv, 2, 32, grad)
    probs = torch.softmax(q.detach().double() @ k.detach().double().transpose(-1, -2) / 32 ** 0.5
                          + torch.full((64, 64), float("-inf"), dtype=torch.float64).triu(1), dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((probs > 0) & (probs < tiny)).sum() > 100  # the case in question: subnormal probabilities
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), want_grad, rtol=1e-4, atol=1e-3)


@needs_kernel
def test_a_nan_query_spoils_its_own_row_only():
    qkv = heads(1, 12, 1, 16, seed=5)[0].detach()
    qkv[0, 7, 3] = float("nan")  # query 7's fourth number
    q, k, v = (x.view(1, 12, 1, 16).transpose(1, 2) for x in qkv.split(16, dim=2))
    out = cpu_kernels.CausalAttention.apply(q, k, v)
    assert torch.isnan(out[0, 0, 7]).all()
    rows = [t for t in range(12) if t != 7]
    assert torch.isfinite(out[0, 0, rows]).all()


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    qkv, (q, k, v) = heads(2, 50, 3, 32, seed=6)
    grad = torch.randn(2, 3, 50, 32, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(3 * 3 * 32, generator=torch.Generator().manual_seed(8)).requires_grad_()
    whole_grad = grad.transpose(1, 2).reshape(2, 50, 3 * 32)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = cpu_kernels.causal_attention(q, k, v)
            whole = cpu_kernels.causal_attention_qkv(qkv, bias, 3)  # the bias's gradient summed in the kernel
            results.append((out, torch.autograd.grad(out, qkv, grad)[0], whole,
                            *torch.autograd.grad(whole, (qkv, bias), whole_grad)))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def counting(monkeypatch, function) -> list:
    """A list that grows by one at each call of the autograd Function's apply."""
    calls, real = [], function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_a_float32_training_step_takes_the_kernel_and_matches_the_flash_kernel(monkeypatch, bias):
    """The model's layers hand the kernel qkv's output whole, its bias added in the kernel
    (`causal_attention_qkv`); the loss and every gradient match SDPA's flash kernel on q, k, v."""
    config = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, d_model=64, dropout=0.0, bias=bias)
    ids = torch.randint(0, 40, (3, 32), generator=torch.Generator().manual_seed(1))
    whole, split = counting(monkeypatch, cpu_kernels.CausalAttentionQKV), counting(monkeypatch, cpu_kernels.CausalAttention)
    loss, grads = model_step(config, ids)
    assert (len(whole), len(split)) == (config.n_layer, 0)
    monkeypatch.setattr(kernels, "SAVED_PROBABILITIES", 0)  # SDPA's flash kernel throughout
    flash_loss, flash_grads = model_step(config, ids)
    assert (len(whole), len(split)) == (config.n_layer, 0)
    torch.testing.assert_close(loss, flash_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, flash_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_kernel
@pytest.mark.parametrize("B, T, H, D", [(1, 1, 1, 16), (2, 37, 3, 64), (1, 17, 2, 48)])
def test_attention_from_qkv_whole_matches_float64(B, T, H, D):
    """causal_attention_qkv: the projection's output without its bias, the bias added in the kernel; the
    output, the gradient of qkv (written whole) and the bias's gradient against float64 SDPA on qkv + bias."""
    qkv, _ = heads(B, T, H, D, seed=3)
    bias = torch.randn(3 * H * D, generator=torch.Generator().manual_seed(4)).requires_grad_()
    grad = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(5))
    out = cpu_kernels.causal_attention_qkv(qkv, bias, H)
    got = torch.autograd.grad(out, (qkv, bias), grad)
    exact = (qkv.detach().double().requires_grad_(), bias.detach().double().requires_grad_())
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in (exact[0] + exact[1]).split(H * D, dim=2))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * D)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for ours, theirs in zip(got, torch.autograd.grad(want, exact, grad.double())):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=5e-5)
    no_bias = cpu_kernels.causal_attention_qkv(qkv, None, H)
    torch.testing.assert_close(no_bias, cpu_kernels.causal_attention(*heads(B, T, H, D, seed=3)[1]).transpose(1, 2)
                               .reshape(B, T, H * D), rtol=0, atol=0)


@needs_kernel
def test_where_the_layers_keep_q_k_v_apart(monkeypatch):
    """The qkv-whole path is plain float32 causal training only: RoPE, a padding mask, a variant's pattern,
    fewer K/V heads, a LoRA or hooked qkv, autocast and inference go the way they went before."""
    from lm.lora import LoRAConfig, apply_lora

    whole = counting(monkeypatch, cpu_kernels.CausalAttentionQKV)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    base = dict(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=32, dropout=0.0)

    def took(config=None, model=None, **forward):
        before = len(whole)
        model = model or GPT(ModelConfig(**{**base, **(config or {})}))
        model(ids, **forward)[0].sum().backward()
        return len(whole) > before

    assert took()
    assert not took({"pos": "rope"})
    assert not took(attention_mask=torch.ones(2, 16, dtype=torch.bool))
    assert not took({"attention": "sliding_window", "window": 4})
    assert not took({"n_head": 4, "n_kv_heads": 2})
    lora = GPT(ModelConfig(**base))
    apply_lora(lora, LoRAConfig(targets=("qkv",)))
    assert not took(model=lora)
    hooked = GPT(ModelConfig(**base))
    hooked.blocks[0].attn.qkv.register_forward_hook(lambda *a: None)
    assert not took(model=hooked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not took()
    with torch.no_grad():
        GPT(ModelConfig(**base))(ids)
    assert len(whole) == 1


def test_where_the_kernel_is_not_used(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, requires_grad=True) for _ in range(3))
    ours = lambda out: type(out.grad_fn).__name__ == "CausalAttentionBackward"  # noqa: E731
    assert ours(kernels.sdpa(q, k, v)) == (cpu_kernels.causal_unavailable(32) is None)
    with torch.no_grad():
        assert kernels.sdpa(q, k, v).grad_fn is None  # inference: nothing to keep probabilities for
    assert not ours(kernels.sdpa(*(x[..., :24] for x in (q, k, v))))  # heads of 24 floats
    assert ours(kernels.sdpa(q, k[:, :2], v[:, :2])) == (cpu_kernels.causal_unavailable(32) is None)  # GQA: repeated
    assert not ours(kernels.sdpa(q.double(), k.double(), v.double()))
    assert not ours(kernels.sdpa(q, k, v, dropout_p=0.1))
    monkeypatch.setattr(kernels, "SAVED_PROBABILITIES", 2 * 4 * 16 * 16 - 1)  # one number too many
    assert not ours(kernels.sdpa(q, k, v))


@needs_kernel
def test_fewer_key_value_heads_match_sdpa_in_float64():
    """GQA: k and v of 2 heads for 6 query heads, repeated for the kernel; their gradients summed back over the
    query heads that share them, as SDPA's own GQA gives them."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 37, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 32, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 6, 37, 32, generator=g)
    out = kernels.sdpa(q, k, v)
    assert type(out.grad_fn).__name__ == "CausalAttentionBackward"
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, exact, grad.double())):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=5e-5)


def test_a_compiled_model_keeps_the_flash_kernel(monkeypatch):
    """A compiled graph cannot trace a ctypes call: under torch.compile float32 attention stays SDPA's."""
    calls = []
    monkeypatch.setattr(cpu_kernels.CausalAttention, "apply", lambda *a: calls.append(1))
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    out = torch.compile(kernels.sdpa, backend="eager")(q, k, v)
    assert calls == [] and out.shape == (1, 2, 8, 16)


def test_inputs_it_does_not_take_are_named():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q, k, v must be \(B, H, T, D\) alike"):
        cpu_kernels.causal_attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="k must be float32 on the CPU, got torch.float64"):
        cpu_kernels.causal_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="empty inputs"):
        cpu_kernels.causal_attention(q[:, :, :0], q[:, :, :0], q[:, :, :0])
    with pytest.raises(RuntimeError, match="a multiple of 16 floats, not 12"):
        cpu_kernels.causal_attention(*(q[..., :12] for _ in range(3)))
    qkv = torch.randn(1, 8, 96)
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3 \* 4 heads \* D\), got \(1, 8, 90\)"):
        cpu_kernels.causal_attention_qkv(qkv[..., :90], None, 4)
    with pytest.raises(ValueError, match=r"bias must be \(96,\), got \(32,\)"):
        cpu_kernels.causal_attention_qkv(qkv, torch.zeros(32), 2)
    with pytest.raises(ValueError, match="bias must be float32 on the CPU, got torch.float64"):
        cpu_kernels.causal_attention_qkv(qkv, torch.zeros(96, dtype=torch.float64), 2)


def test_switched_off_the_model_trains_through_sdpa(fresh, monkeypatch):
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    assert cpu_kernels.causal_unavailable() == "LM_CPU_KERNELS=0 is set"
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    assert type(kernels.sdpa(q, k, v).grad_fn).__name__ != "CausalAttentionBackward"
    with pytest.raises(RuntimeError, match="cannot run: LM_CPU_KERNELS=0 is set"):
        cpu_kernels.causal_attention(q, k, v)


def test_no_compiler_or_a_wrong_kernel_leaves_sdpa(fresh, monkeypatch):
    if cpu_kernels.platform.system() != "Linux" or cpu_kernels.platform.machine() != "x86_64":
        pytest.skip("the kernels are only built on Linux x86-64")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert "no C compiler" in cpu_kernels.causal_unavailable()
    monkeypatch.delenv("CC")
    cpu_kernels._load_causal.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_causal_agrees", lambda kernels: False)
    if cpu_kernels._not_here() is None:
        assert cpu_kernels.causal_unavailable() == "the kernels compiled from causal.c disagree with torch on a small check"


@needs_kernel
def test_first_asked_without_gradients_it_still_checks_and_runs(fresh):
    """The self-check runs a backward pass: asked first under inference_mode or inside a forward (where
    autograd is off), it must not conclude that the kernel disagrees."""
    with torch.inference_mode():
        assert cpu_kernels.causal_unavailable() is None
    cpu_kernels._load_causal.cache_clear()
    qkv, (q, k, v) = heads(1, 9, 2, 16, seed=8)
    out = cpu_kernels.CausalAttention.apply(q, k, v)  # loads the kernel inside the Function's forward
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


@needs_kernel
def test_the_self_check_catches_a_wrong_scale_forward_or_backward(fresh):
    """`_causal_agrees` is what stands between a miscompiled kernel and training: a 1% error in either pass
    fails it, and it saves nothing through autograd (a caller's saved-tensor hooks see no tensor)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        assert cpu_kernels.causal_unavailable() is None
    assert packed == []
    real = cpu_kernels._load_causal()[0]

    class Wrong:
        stride, scratch, probs, forward, backward = real.stride, real.scratch, real.probs, real.forward, real.backward
        gelu_forward, gelu_backward, gelu_scratch = real.gelu_forward, real.gelu_backward, real.gelu_scratch
        norm_forward, norm_backward, norm_scratch = real.norm_forward, real.norm_backward, real.norm_scratch
        gate_forward, gate_backward, rope, residual = real.gate_forward, real.gate_backward, real.rope, real.residual

    for name in ("gelu_forward", "gelu_backward"):  # the bias dropped: h's own pointer in its place
        wrong = Wrong()
        setattr(wrong, name, lambda h, b, *args, call=getattr(real, name): call(h, h, *args))
        assert not cpu_kernels._causal_agrees(wrong), name
    for name in ("norm_forward", "norm_backward", "gate_forward", "gate_backward"):  # b or the weight: x in its place
        wrong = Wrong()
        setattr(wrong, name, lambda x, w, *args, call=getattr(real, name): call(x, x, *args))
        assert not cpu_kernels._causal_agrees(wrong), name
    wrong = Wrong()  # the residual's bias dropped: x in its place
    wrong.residual = lambda x, h, b, *args: real.residual(x, h, x, *args)
    assert not cpu_kernels._causal_agrees(wrong), "residual"
    for transposed in (0, 1):  # sin read as cos: no rotation
        wrong = Wrong()
        wrong.rope = lambda x, c, s, y, *args, t=transposed: real.rope(x, c, c if args[-2] == t else s, y, *args)
        assert not cpu_kernels._causal_agrees(wrong), f"rope transposed={transposed}"
    for name in ("forward", "backward"):
        wrong = Wrong()
        setattr(wrong, name, lambda *args, call=getattr(real, name): call(*args[:-2], args[-2] * 1.01, args[-1]))
        assert not cpu_kernels._causal_agrees(wrong), name
        wrong = Wrong()  # the bias dropped
        setattr(wrong, name, lambda *args, call=getattr(real, name): call(*args[:3], None, *args[4:]))
        assert not cpu_kernels._causal_agrees(wrong), f"{name} without the bias"
    assert cpu_kernels._causal_agrees(Wrong())


@pytest.mark.skipif("avx512f" not in (cpu_kernels._cpu_flags() or ()), reason="the CPU has no AVX-512")
@pytest.mark.parametrize("B, T, H, D", [(2, 37, 3, 64), (1, 40, 2, 48)])
def test_the_avx512_and_avx2_builds_give_the_same_numbers(fresh, monkeypatch, B, T, H, D):
    """Where the CPU has AVX-512 the kernel is built for it (blocks of 8 rows of two 16-float registers, one
    where 16 columns are left, as with D = 48; 16-lane softmax and row sums); the AVX2 build, which other
    CPUs run, must compute the same, to the bit: both add the same products in the same order. Two builds,
    two files in the kernel folder."""
    qkv, (q, k, v) = heads(B, T, H, D, seed=9)
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(10))

    def run():
        out = cpu_kernels.causal_attention(q, k, v)
        return out.detach(), torch.autograd.grad(out, qkv, grad)[0]

    wide = run()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    cpu_kernels._load_causal.cache_clear()
    narrow = run()
    assert len(list(fresh.glob("causal*"))) == 2
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)
