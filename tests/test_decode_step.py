"""LeanStep: one decoding step through the functional ops gives the module path's logits, bit for bit
with F.linear's products and to float tolerance with oneDNN's (the default on a CPU for several rows
and models of 32 MiB of weights and more) and lm's compiled kernel's (one row: tests/test_cpu_kernels.py)."""

from __future__ import annotations

import pytest
import torch

import lm
from lm import decode_step
from lm.decode_step import LeanStep, onednn_usable
from lm.quantize import Int8Linear, for_decoding, quantize_int8

SHAPES = {
    "gpt2": dict(),
    "llama": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, bias=False, tie_weights=False),
    "post_norm": dict(norm_position="post"),
    "manual_tanh_sinusoidal": dict(attention="manual", ffn="gelu_tanh", pos="sinusoidal"),
    "scalenorm_mqa_nopos": dict(norm="scalenorm", n_kv_heads=1, pos="none"),
}


def small(**options) -> lm.GPT:
    torch.manual_seed(0)
    config = lm.ModelConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, d_model=32, dropout=0.0, **options)
    return lm.GPT(config).eval()


needs_onednn = pytest.mark.skipif(not onednn_usable(), reason="this torch has no oneDNN linear for the CPU")


def module_and_lean(model, prompt, steps, onednn=False, matvec=False):
    """Logits of `steps` one-token steps after `prompt`, through model(...) and through LeanStep,
    each with its own cache, feeding both the module path's greedy tokens."""
    lean = LeanStep(model, onednn=onednn, matvec=matvec)
    if onednn is not None:
        assert lean.onednn == (onednn and onednn_usable())
    caches = [lm.KVCache(model, prompt.size(0), max_len=prompt.size(1) + steps), None]
    caches[1] = lm.KVCache(model, prompt.size(0), max_len=prompt.size(1) + steps)
    with torch.no_grad():
        model(prompt, cache=caches[0])
        model(prompt, cache=caches[1])
        token = prompt[:, -1:]
        pairs = []
        for _ in range(steps):
            ours = model(token, cache=caches[0])[0]
            lean_logits = lean(token, caches[1])
            pairs.append((ours, lean_logits))
            token = ours[:, -1].argmax(-1, keepdim=True)
    return pairs, caches


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_equals_the_modules_bit_for_bit(shape, batch):
    model = small(**SHAPES[shape])
    prompt = torch.randint(0, 61, (batch, 5), generator=torch.Generator().manual_seed(1))
    pairs, caches = module_and_lean(model, prompt, steps=12)
    for ours, lean_logits in pairs:
        assert lean_logits.shape == ours.shape == (batch, 1, 61)
        assert torch.equal(lean_logits, ours)
    assert caches[0].length == caches[1].length == 17
    for a, b in zip(caches[0].layers, caches[1].layers):  # the same keys and values were stored
        assert torch.equal(a.k[:, :, :17], b.k[:, :, :17]) and torch.equal(a.v[:, :, :17], b.v[:, :, :17])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("onednn", [False, True])
def test_several_new_tokens_at_once_equal_the_modules(shape, onednn):
    """A forward over T new tokens after cached ones (a speculative step's check): the logits of every
    position, and the cache after it, as model(ids, cache=cache, all_logits=True) gives them."""
    model = small(**SHAPES[shape])
    lean = LeanStep(model, onednn=onednn, matvec=False)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 61, (2, 6), generator=g)
    chunks = [torch.randint(0, 61, (2, t), generator=g) for t in (4, 1, 3)]
    caches = [lm.KVCache(model, 2, max_len=20), lm.KVCache(model, 2, max_len=20)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache)
        for chunk in chunks:
            ours = model(chunk, cache=caches[0], all_logits=True)[0]
            theirs = lean(chunk, caches[1])
            assert theirs.shape == ours.shape == (2, chunk.size(1), 61)
            if lean.onednn:
                torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(theirs, ours)
            for cache in caches:  # step back over the last token, as speculative decoding does
                cache.crop(cache.length - 1)
    assert caches[0].length == caches[1].length == 6 + 4 + 1 + 3 - 3
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(b.k[:, :, :11], a.k[:, :, :11], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v[:, :, :11], a.v[:, :, :11], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="do not fit"):
        lean(torch.zeros(2, 10, dtype=torch.long), caches[1])
    with torch.no_grad():  # only the last position through the head: what model(ids, cache=cache) returns
        ours, theirs = model(chunks[0], cache=caches[0])[0], lean(chunks[0], caches[1], last=1)
    assert theirs.shape == ours.shape == (2, 1, 61)
    if not lean.onednn:
        assert torch.equal(theirs, ours)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
def test_lean_step_with_onednn_products_equals_the_modules_to_float_tolerance(shape, batch):
    """oneDNN's products (with the GELU / SiLU, the gate and the residual additions fused into them)
    sum in another order than F.linear's BLAS: the same logits to float32 rounding, the same tokens."""
    model = small(**SHAPES[shape])
    prompt = torch.randint(0, 61, (batch, 5), generator=torch.Generator().manual_seed(1))
    pairs, caches = module_and_lean(model, prompt, steps=12, onednn=True)
    for ours, lean_logits in pairs:
        assert lean_logits.shape == ours.shape == (batch, 1, 61)
        torch.testing.assert_close(lean_logits, ours, rtol=1e-5, atol=1e-5)
        assert torch.equal(lean_logits.argmax(-1), ours.argmax(-1))
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.k[:, :, :17], b.k[:, :, :17], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_products_fuse_the_activation_and_the_residual_additions():
    model = small()
    lean = LeanStep(model, onednn=True, matvec=False)
    assert lean.onednn
    cache = lm.KVCache(model, 1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with profile:
            lean(torch.zeros(1, 1, dtype=torch.long), cache)
    names = [event.name for event in profile.events()]
    # every product: the head, and each block's qkv, proj (+ x), fc (with its GELU) and proj (+ x)
    assert names.count("mkldnn::_linear_pointwise") == 1 + 2 * 4
    assert not {"aten::gelu", "aten::addmm", "aten::mm", "aten::linear"} & set(names)
    assert names.count("aten::add") == 1  # the embedding's (token + position); no residual addition of its own


def test_onednn_is_only_used_for_float32_weights():
    model = small().to(torch.float64)
    lean = LeanStep(model)
    cache = lm.KVCache(model, 1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        logits = lean(torch.zeros(1, 1, dtype=torch.long), cache)
    assert logits.dtype == torch.float64  # F.linear's path: oneDNN takes float32 products here


@pytest.mark.parametrize("change", ["for_decoding", "int8", "int8_gpt2", "lora"])
def test_lean_step_calls_layers_it_does_not_take_apart(change):
    """Bit for bit with F.linear's products: the transposed layout, int8 layers (biased or not, taken
    apart into their kernel call where torch has it), LoRA layers (called as modules)."""
    model = small(**SHAPES["gpt2" if change == "int8_gpt2" else "llama"])
    if change == "for_decoding":
        for_decoding(model, "columns")
    elif change.startswith("int8"):
        quantize_int8(model)
    else:
        lm.apply_lora(model, lm.LoRAConfig(rank=2))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter count
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(2))
    pairs, _ = module_and_lean(model, prompt, steps=6)
    for ours, lean_logits in pairs:
        assert torch.equal(lean_logits, ours)


@pytest.mark.parametrize("kernel", ["lm", "torch"])
def test_int8_layers_run_their_kernel_without_the_module(monkeypatch, kernel):
    """A step's int8 products: lm's int8 kernel where it runs (what Int8Linear.forward calls for a few
    rows), else torch's fused one, called directly, with the module's floats."""
    model = quantize_int8(small())
    if not model.blocks[0].attn.qkv.fused:
        pytest.skip("this torch has no fused int8 kernel for the CPU")
    if kernel == "torch":
        for where in (lm.quantize, lm.decode_step):
            monkeypatch.setattr(where, "int8_kernel_usable", lambda layer: False)
    elif lm.cpu_kernels.unavailable() is not None:
        pytest.skip(f"lm's CPU kernels: {lm.cpu_kernels.unavailable()}")
    lean = LeanStep(model, onednn=False, matvec=False)
    with torch.no_grad():
        expected = model(torch.ones(1, 1, dtype=torch.long), cache=lm.KVCache(model, 1, max_len=4))[0]
        monkeypatch.setattr(Int8Linear, "forward", lambda self, x: pytest.fail("the module was called"))
        profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with profile:
            logits = lean(torch.ones(1, 1, dtype=torch.long), lm.KVCache(model, 1, max_len=4))
    assert torch.equal(logits, expected)
    names = [event.name for event in profile.events()]
    # each block's four products (the tied head stays float)
    assert names.count("aten::_weight_int8pack_mm") == (2 * 4 if kernel == "torch" else 0)


def greedy_without_lean(model, prompt, monkeypatch, **options):
    with monkeypatch.context() as patch:
        patch.setattr(LeanStep, "unsupported", staticmethod(lambda model: "switched off by the test"))
        return model.generate(prompt, **options)


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_generate_gives_the_same_tokens_with_and_without_the_lean_step(shape, monkeypatch):
    model = small(**SHAPES[shape])
    prompt = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    calls = []
    real_call = LeanStep.__call__
    monkeypatch.setattr(LeanStep, "__call__", lambda self, idx, cache: calls.append(1) or real_call(self, idx, cache))
    for options in [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=7)]:
        lean_ids = model.generate(prompt, max_new_tokens=60, **options)  # runs past block_size 48: refills
        plain_ids = greedy_without_lean(model, prompt, monkeypatch, max_new_tokens=60, **options)
        assert torch.equal(lean_ids, plain_ids)
    assert len(calls) > 60  # the lean step did the one-token steps


def test_padded_prompts_fall_back_to_the_modules(monkeypatch):
    model = small()
    prompt = torch.randint(1, 61, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, :3] = False  # left padding: the cache then holds padding, which the lean step does not mask
    calls = []
    monkeypatch.setattr(LeanStep, "__call__", lambda *args: calls.append(1))
    ids = model.generate(prompt, attention_mask=mask, max_new_tokens=5, temperature=0)
    assert ids.shape == (2, 11) and not calls


class OwnForward(lm.GPT):
    def forward(self, idx, targets=None, **options):
        return super().forward(idx, targets, **options)


def test_what_a_lean_step_refuses():
    assert "its own way" in LeanStep.unsupported(OwnForward(small().config))
    assert LeanStep.unsupported(small(attention="sliding_window", window=4)) is not None
    assert "experts" in LeanStep.unsupported(small(ffn="moe", n_experts=2))
    model = small()
    handle = model.blocks[0].attn.register_forward_hook(lambda *args: None)
    assert "hooks" in LeanStep.unsupported(model)
    with pytest.raises(ValueError, match="hooks"):
        LeanStep(model)
    handle.remove()
    lean = LeanStep(model)
    static = lm.KVCache(model, 1, max_len=8, static=True)
    assert not LeanStep.usable(static, 1) and not LeanStep.usable(lm.KVCache(model, 1, max_len=8), 0)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        lean(torch.zeros(1, 1, dtype=torch.long), lm.KVCache(model, 1, max_len=8))
    model.eval()
    full = lm.KVCache(model, 1, max_len=2)
    model(torch.zeros(1, 2, dtype=torch.long), cache=full)
    with pytest.raises(RuntimeError, match="max_len"):
        lean(torch.zeros(1, 1, dtype=torch.long), full)


def fp32_linear_bytes(model) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear)


@needs_onednn
def test_by_default_onednn_is_used_for_large_models_on_two_threads_or_more(monkeypatch):
    threads = torch.get_num_threads()
    model = small()
    try:
        torch.set_num_threads(2)
        assert fp32_linear_bytes(model) < decode_step.ONEDNN_MIN_BYTES
        assert not LeanStep(model).onednn and LeanStep(model, onednn=True).onednn  # small: F.linear
        pairs, _ = module_and_lean(model, torch.zeros(1, 2, dtype=torch.long), steps=3, onednn=None)
        assert all(torch.equal(a, b) for a, b in pairs)  # several rows' default on a small model: F.linear's floats
        monkeypatch.setattr(decode_step, "ONEDNN_MIN_BYTES", fp32_linear_bytes(model))
        assert decode_step.onednn_pays(model) and LeanStep(model).onednn  # as large as the threshold: oneDNN
        assert not LeanStep(model, onednn=False).onednn
        with torch.backends.mkldnn.flags(enabled=False):
            assert not LeanStep(model).onednn
        assert not decode_step.onednn_pays(small().to(torch.float64))  # only float32 weights count
        torch.set_num_threads(1)
        assert not LeanStep(model).onednn  # one thread: oneDNN gains nothing
    finally:
        torch.set_num_threads(threads)
