"""lm.cpu_kernels: the compiled matrix-vector product and attention against torch's own operations,
their independence from the thread count and the number of rows, LeanStep and generate with them,
and what happens where they cannot be built (no compiler, a failing one, LM_CPU_KERNELS=0)."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
import torch
import torch.nn.functional as F

import lm
from lm import cpu_kernels
from lm.cpu_kernels import attend, matvec
from lm.decode_step import LeanStep

needs_kernels = pytest.mark.skipif(cpu_kernels.unavailable() is not None,
                                   reason=f"lm's CPU kernels: {cpu_kernels.unavailable()}")

ACTIVATIONS = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
               "swish": F.silu}
COMBINES = {"none": lambda y, other: y, "add": lambda y, other: y + other, "mul": lambda y, other: y * other}


@contextlib.contextmanager
def threads(n: int):
    """Run with n torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 13, 37), (3, 4, 8), (2, 9, 17), (8, 2048, 512), (1, 512, 2048)])
@pytest.mark.parametrize("bias", [True, False])
def test_matvec_equals_f_linear_with_each_activation_and_combination(shape, bias):
    """Ragged sizes leave remainders after the 4-row blocks and 8-float loads; real ones stream."""
    rows, n_out, n_in = shape
    g = torch.Generator().manual_seed(sum(shape))
    weight, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g) if bias else None
    x, other = torch.randn(rows, 1, n_in, generator=g), torch.randn(rows, 1, n_out, generator=g)
    y = F.linear(x.double(), weight.double(), None if b is None else b.double())
    for activation, act in ACTIVATIONS.items():
        for combine, then in COMBINES.items():
            got = matvec(x, weight, b, activation, None if combine == "none" else other, combine)
            assert got.shape == (rows, 1, n_out) and got.dtype == torch.float32
            want = then(act(y), other.double()).float()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * n_in ** 0.5)


@needs_kernels
def test_matvec_gives_the_same_floats_for_any_thread_count_and_any_number_of_rows():
    g = torch.Generator().manual_seed(0)
    weight, b, x = torch.randn(1030, 515, generator=g), torch.randn(1030, generator=g), torch.randn(6, 515, generator=g)
    results = []
    for n in (1, 2, 3, 4):
        with threads(n):
            results.append(matvec(x, weight, b, "gelu"))
    assert all(torch.equal(r, results[0]) for r in results)
    alone = torch.stack([matvec(x[i : i + 1], weight, b, "gelu")[0] for i in range(6)])
    assert torch.equal(alone, results[0])  # a row's outputs do not depend on the rows beside it


@needs_kernels
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("new", [1, 3, 8])
def test_attend_equals_sdpa_under_the_causal_mask_after_the_cache(heads, new):
    H, H_kv = heads
    g = torch.Generator().manual_seed(H + new)
    cached, D = 11, 20  # D not a multiple of 8: the tail of each dot product
    q = torch.randn(2, H, new, D, generator=g)
    keys, values = torch.randn(2, 2, H_kv, cached + new, D, generator=g).unbind(0)
    mask = torch.ones(new, cached + new, dtype=torch.bool).tril(cached)
    want = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask,
                                          enable_gqa=H != H_kv)
    got = attend(q, keys, values)
    assert got.shape == (2, new, H * D)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, new, H * D).float(), rtol=1e-5, atol=1e-6)
    alone = torch.cat([attend(q[:, :, t : t + 1], keys[:, :, : cached + t + 1], values[:, :, : cached + t + 1])
                       for t in range(new)], 1)
    assert torch.equal(alone, got)  # a query's output does not depend on the others beside it


@needs_kernels
def test_attend_reads_the_cache_through_its_strides():
    """The cache returns views of a longer buffer (narrow along positions); q comes transposed."""
    g = torch.Generator().manual_seed(5)
    buffer = torch.randn(2, 1, 4, 32, 16, generator=g)
    keys, values = buffer[0, :, :, :9], buffer[1, :, :, :9]
    q = torch.randn(1, 2, 4, 16, generator=g).transpose(1, 2)  # (1, 4, 2, 16) viewed as (B, H, T, D)
    assert not keys.is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(attend(q, keys, values), attend(q.contiguous(), keys.contiguous(), values.contiguous()),
                               rtol=0, atol=0)


@needs_kernels
def test_kernels_read_subnormals_as_zero_and_leave_torch_s_threads_as_they_were():
    """Numbers below float32's smallest normal (2^-126) read and written as zero inside lm's kernels, which
    keeps softmax's and GELU's tails from costing a microcode assist each; PyTorch's own operations on the
    same threads afterwards still keep their subnormals (each kernel restores the thread's control word)."""
    tiny = torch.finfo(torch.float32).tiny
    subnormal = torch.full((2, 64), tiny / 8)
    many = torch.full((4_000_000,), tiny / 8)  # enough for torch to split the multiplication over threads
    with threads(2):
        assert (F.linear(subnormal, torch.ones(32, 64)) > 0).all()  # 64 x tiny/8 = 8 tiny: normal
        assert (matvec(subnormal, torch.ones(32, 64)) == 0).all()
        assert ((many * 1.5) > 0).all()
        q = torch.full((1, 2, 1, 16), tiny / 8)
        keys, values = torch.randn(1, 2, 5, 16), torch.full((1, 2, 5, 16), tiny / 4)
        assert (F.scaled_dot_product_attention(q, keys, values) > 0).all()
        assert (attend(q, keys, values) == 0).all()
        assert ((many * 1.5) > 0).all()
        if cpu_kernels.bias_gelu_unavailable(64) is None:
            assert (F.gelu(subnormal) > 0).all()
            assert (cpu_kernels.bias_gelu(subnormal, torch.zeros(64)) == 0).all()
            assert ((many * 1.5) > 0).all()


@needs_kernels
def test_what_the_kernels_refuse():
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match="float32"):
        matvec(torch.randn(16, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="not contiguous"):
        matvec(torch.randn(16), torch.randn(16, 8).t())
    with pytest.raises(ValueError, match="16 inputs"):
        matvec(torch.randn(12), weight)
    with pytest.raises(ValueError, match="'relu'"):
        matvec(torch.randn(16), weight, activation="relu")
    with pytest.raises(ValueError, match="other"):
        matvec(torch.randn(16), weight, combine="add")
    with pytest.raises(ValueError, match="expected 8"):
        matvec(torch.randn(16), weight, bias=torch.randn(9))
    q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, kv, kv)  # 3 key-value heads do not divide 4 query heads
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, kv[:, :, :1], kv[:, :, :1])  # fewer keys than new queries
    with pytest.raises(ValueError, match="empty"):
        attend(q, kv[:, :0], kv[:, :0])  # no key-value heads at all


def model(**options) -> lm.GPT:
    torch.manual_seed(0)
    config = lm.ModelConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, d_model=40, dropout=0.0, **options)
    return lm.GPT(config).eval()


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 13, 37), (3, 4, 8), (8, 2048, 512), (1, 512, 2048)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_product_equals_f_linear_on_the_dequantized_weight(shape, bias):
    rows, n_out, n_in = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
    scale, b = torch.rand(n_out, generator=g) / 100, torch.randn(n_out, generator=g) if bias else None
    x, other = torch.randn(rows, 1, n_in, generator=g), torch.randn(rows, 1, n_out, generator=g)
    y = F.linear(x.double(), q.double() * scale.double()[:, None], None if b is None else b.double())
    for activation, act in ACTIVATIONS.items():
        for combine, then in COMBINES.items():
            got = cpu_kernels.product(q, b, activation, combine, scale=scale)(x, None if combine == "none" else other)
            assert got.shape == (rows, 1, n_out) and got.dtype == torch.float32
            torch.testing.assert_close(got, then(act(y), other.double()).float(), rtol=1e-5, atol=1e-5 * n_in ** 0.5)


@needs_kernels
def test_int8_product_gives_the_same_floats_for_any_thread_count_and_any_number_of_rows():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (1030, 515), generator=g, dtype=torch.int8)
    scale, b, x = torch.rand(1030, generator=g), torch.randn(1030, generator=g), torch.randn(6, 515, generator=g)
    run = cpu_kernels.product(q, b, "swish", scale=scale)
    results = []
    for n in (1, 2, 3):
        with threads(n):
            results.append(run(x))
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(torch.cat([run(x[i : i + 1]) for i in range(6)]), results[0])


@needs_kernels
def test_int8_linear_takes_a_few_rows_to_the_kernel_and_many_to_torch():
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(96, 40)
    layer = lm.quantize.Int8Linear(linear)
    dequantized = layer.dequantized()
    for rows, kernel in ((1, True), (8, True), (9, False), (64, False)):
        x = torch.randn(rows, 96, generator=g)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            y = layer(x)
        names = {event.name for event in profile.events()}
        if kernel:
            assert not names & {"aten::_weight_int8pack_mm", "aten::linear"}, names
            torch.testing.assert_close(y, F.linear(x, dequantized, layer.bias), rtol=1e-5, atol=1e-5)
        else:  # torch's kernels, in bfloat16 where torch has the fused one
            torch.testing.assert_close(y, F.linear(x, dequantized, layer.bias), rtol=2e-2, atol=5e-2)
    assert layer(torch.randn(2, 96, dtype=torch.float64)).dtype == torch.float64  # not float32: torch's path


@needs_kernels
def test_an_int8_model_steps_on_the_kernel_and_checks_as_it_steps():
    """An int8 model's one-token steps run on lm's int8 kernel (no torch product left), equal its
    module path to float rounding, and a check of four positions gives the floats of four steps."""
    net = lm.quantize.quantize_int8(model())
    lean = LeanStep(net)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(4))
    one, many, modules = (lm.KVCache(net, 1, max_len=20) for _ in range(3))
    with torch.no_grad():
        for cache in (one, many, modules):
            net(ids[:, :8], cache=cache)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            singles = torch.cat([lean(ids[:, i : i + 1], one) for i in range(8, 12)], 1)
        assert torch.equal(lean(ids[:, 8:], many), singles)
        torch.testing.assert_close(singles, net(ids[:, 8:], cache=modules, all_logits=True)[0], rtol=1e-5, atol=1e-5)
    names = {event.name for event in profile.events()}
    assert not names & {"aten::_weight_int8pack_mm", "aten::linear", "aten::addmm", "aten::mm"}, names


@needs_kernels
@pytest.mark.parametrize("options", [dict(), dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, bias=False),
                                     dict(ffn="gelu_tanh", norm_position="post")])
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_with_the_kernels_equals_the_modules(options, batch):
    net = model(**options)
    lean = LeanStep(net)
    assert lean.matvec  # the default wherever the kernels run
    prompt = torch.randint(0, 61, (batch, 5), generator=torch.Generator().manual_seed(1))
    caches = [lm.KVCache(net, batch, max_len=30), lm.KVCache(net, batch, max_len=30)]
    with torch.no_grad():
        for cache in caches:
            net(prompt, cache=cache)
        token = prompt[:, -1:]
        for chunk in (1, 1, 4, 1):  # one-token steps, and a speculative check of four
            ids = torch.cat([token] * chunk, 1)
            ours = net(ids, cache=caches[0], all_logits=True)[0]
            theirs = lean(ids, caches[1])
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
            token = ours[:, -1].argmax(-1, keepdim=True)


@needs_kernels
def test_a_one_token_step_runs_no_torch_product_or_attention():
    net = model()
    lean, cache = LeanStep(net), lm.KVCache(net, 1, max_len=4)
    with torch.no_grad():
        net(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            lean(torch.zeros(1, 1, dtype=torch.long), cache)
    names = {event.name for event in profile.events()}
    assert not names & {"aten::linear", "aten::addmm", "aten::mm", "aten::gelu", "aten::scaled_dot_product_attention",
                        "mkldnn::_linear_pointwise"}, names


@needs_kernels
def test_speculative_checks_and_one_token_steps_give_the_same_floats():
    """What makes speculative decoding's tokens equal greedy decoding's: the target's logits for a
    position are the same floats whether it checks four drafted tokens at once or steps one by one."""
    net = model()
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    lean = LeanStep(net)
    one, many = lm.KVCache(net, 1, max_len=20), lm.KVCache(net, 1, max_len=20)
    with torch.no_grad():
        net(ids[:, :8], cache=one)
        net(ids[:, :8], cache=many)
        singles = torch.cat([lean(ids[:, i : i + 1], one) for i in range(8, 12)], 1)
        assert torch.equal(lean(ids[:, 8:], many), singles)


@needs_kernels
def test_a_weight_transposed_after_the_step_was_built_goes_to_torch():
    net = model()
    lean = LeanStep(net)
    lm.quantize.for_decoding(net, "columns")  # the layout F.linear reads fastest: the kernel must not read it
    with torch.no_grad():
        ours = net(torch.ones(1, 1, dtype=torch.long), cache=lm.KVCache(net, 1, max_len=4))[0]
        theirs = lean(torch.ones(1, 1, dtype=torch.long), lm.KVCache(net, 1, max_len=4))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_generate_uses_the_kernels_and_gives_the_module_paths_tokens(monkeypatch):
    net = model()
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    used = []
    real = cpu_kernels.product
    monkeypatch.setattr(cpu_kernels, "product", lambda *a, **k: used.append(1) or real(*a, **k))
    ids = net.generate(prompt, max_new_tokens=30, temperature=0)
    assert used  # LeanStep built its products on the kernel
    monkeypatch.setattr(LeanStep, "unsupported", staticmethod(lambda m: "switched off by the test"))
    assert torch.equal(ids, net.generate(prompt, max_new_tokens=30, temperature=0))


def test_switched_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    assert cpu_kernels.unavailable() == "LM_CPU_KERNELS=0 is set"
    with pytest.raises(RuntimeError, match="not available: LM_CPU_KERNELS=0"):
        matvec(torch.randn(4), torch.randn(3, 4))
    net = model()
    assert not LeanStep(net).matvec
    prompt = torch.zeros(1, 3, dtype=torch.long)
    ids = net.generate(prompt, max_new_tokens=5, temperature=0)
    assert ids.shape == (1, 8)
    assert net.blocks[0].attn.qkv.weight.stride() == (1, 120)  # torch's products: the transposed layout


def test_no_compiler_leaves_torch_s_products(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    if cpu_kernels.platform.system() != "Linux" or cpu_kernels.platform.machine() != "x86_64":
        pytest.skip("the kernels are only built on Linux x86-64")
    assert "no C compiler" in cpu_kernels.unavailable()
    assert not LeanStep(model()).matvec


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for the compiler")
def test_a_failing_compile_leaves_no_partial_file(fresh, monkeypatch, tmp_path):
    """A compiler that writes half an output and fails: the error says so, and nothing is left that a
    later process could load."""
    if cpu_kernels.platform.system() != "Linux" or cpu_kernels.platform.machine() != "x86_64":
        pytest.skip("the kernels are only built on Linux x86-64")
    script = tmp_path / "badcc"
    script.write_text('#!/bin/sh\nfor a; do out="$a"; done\n'
                      'case "$1" in --version) echo badcc 1.0; exit 0;; esac\n'
                      'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo junk > "$2"; fi; shift; done\n'
                      'echo "badcc: error: no" >&2; exit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(script))
    why = cpu_kernels.unavailable()
    assert why.startswith("compiling decode.c failed") and "badcc: error" in why
    assert list(fresh.iterdir()) == []


@needs_kernels
def test_the_build_is_cached_and_kept_private(fresh):
    assert cpu_kernels.unavailable() is None
    built = list(fresh.iterdir())
    assert len(built) == 1 and built[0].name.startswith("decode-") and built[0].suffix == ".so"
    assert stat.S_IMODE(fresh.stat().st_mode) & 0o077 == 0
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels._load.cache_clear()
    assert cpu_kernels.unavailable() is None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_kernels
def test_a_folder_others_can_write_to_is_not_used(fresh):
    fresh.mkdir(mode=0o777)
    fresh.chmod(0o777)
    assert cpu_kernels.unavailable() is None  # built elsewhere, in a private temporary folder
    assert list(fresh.iterdir()) == []


@needs_kernels
def test_a_folder_that_cannot_be_made_falls_back_to_a_private_one(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LM_KERNEL_DIR", str(blocker / "kernels"))  # a folder inside a file: mkdir fails
    assert cpu_kernels.unavailable() is None


def test_a_cpu_without_avx2_keeps_torch_s_products(fresh, monkeypatch):
    if cpu_kernels.platform.system() != "Linux" or cpu_kernels.platform.machine() != "x86_64":
        pytest.skip("the kernels are only built on Linux x86-64")
    monkeypatch.setattr(cpu_kernels, "_has_avx2_and_fma", lambda: False)
    assert "no AVX2 and FMA" in cpu_kernels.unavailable()
    net = model()
    assert not LeanStep(net).matvec
    with torch.no_grad():  # the step still runs, on torch's products
        logits = LeanStep(net)(torch.zeros(1, 1, dtype=torch.long), lm.KVCache(net, 1, max_len=2))
    assert logits.shape == (1, 1, 61)
