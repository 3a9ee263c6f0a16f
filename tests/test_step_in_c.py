"""StepInC: a whole decoding step in one call of lm's C kernel (lm_decode_step, lm/csrc/decode.c) gives the
modules' logits to float32 tolerance, LeanStep's own functions' greedy tokens, the same floats whatever the
threads and the rows beside a row, and steps aside (to LeanStep's functions) wherever it cannot run."""

from __future__ import annotations

import ctypes

import pytest
import torch

import lm
from lm import cpu_kernels
from lm.decode_step import LeanStep, StepInC
from lm.lora import apply_lora
from lm.quantize import for_decoding, quantize_int8

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable() is not None,
                                reason=f"lm's CPU kernels cannot run here: {cpu_kernels.unavailable()}")

SHAPES = {  # every kind the kernel takes: norms, feed-forwards, positions, grouped-query heads, biases
    "gpt2": dict(),
    "gpt2_no_bias_tanh": dict(bias=False, ffn="gelu_tanh", pos="sinusoidal"),
    "llama": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, bias=False, tie_weights=False),
    "llama_mqa_bias": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=1, norm_eps=1e-6),
    "no_positions": dict(pos="none", n_layer=3),
    "ragged_sizes": dict(d_model=36, n_head=4, vocab_size=67),  # heads of 9, widths and vocabulary off 4 and 8
    "ragged_llama": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, d_model=40, n_head=4, vocab_size=67),
}


def small(**options) -> lm.GPT:
    torch.manual_seed(0)
    settings = dict(vocab_size=61, block_size=48, n_layer=2, n_head=4, d_model=32, dropout=0.0) | options
    return lm.GPT(lm.ModelConfig(**settings)).eval()


def steps(model, prompt, n_steps, in_c=True):
    """The logits of the prompt's last token and of `n_steps` greedy one-token steps after it, through a
    LeanStep with (in_c) or without its C step, and the tokens chosen."""
    lean = LeanStep(model)
    assert (lean.in_c is not None) is True  # every model here is one the C step takes
    if not in_c:
        lean.in_c = None
    cache = lm.KVCache(model, prompt.size(0), max_len=prompt.size(1) + n_steps + 1)
    logits, out = [], []
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
        token = prompt[:, -1:]
        for _ in range(n_steps):
            step = lean(token, cache)
            logits.append(step)
            token = step[:, -1].argmax(-1, keepdim=True)
            out.append(token)
    return torch.cat(logits, 1), torch.cat(out, 1)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
def test_the_c_step_gives_the_modules_logits(shape, batch):
    model = small(**SHAPES[shape])
    prompt = torch.randint(0, 61, (batch, 6), generator=torch.Generator().manual_seed(1))
    ours, tokens = steps(model, prompt, 20)
    assert ours.shape == (batch, 20, model.config.vocab_size)
    functions, their_tokens = steps(model, prompt, 20, in_c=False)
    assert torch.equal(tokens, their_tokens)
    torch.testing.assert_close(ours, functions, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the modules, over the whole sequence at once
        whole = model(torch.cat([prompt, tokens[:, :-1]], 1), all_logits=True)[0][:, prompt.size(1) - 1:]
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-4)


def test_a_step_of_several_tokens_gives_each_the_logits_of_its_own_step_bit_for_bit():
    """What speculative decoding relies on: the check of k draft tokens in one step (k rows) gives the
    floats that k one-token steps give, so its accepted tokens are greedy decoding's."""
    model = small(**SHAPES["llama"])
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(2))
    new = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(3))
    lean = LeanStep(model)
    caches = [lm.KVCache(model, 1, max_len=16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache)
        together = lean(new, caches[0])
        apart = torch.cat([lean(new[:, i:i + 1], caches[1]) for i in range(4)], 1)
    assert torch.equal(together, apart)
    for a, b in zip(caches[0].layers, caches[1].layers):  # the same keys and values were stored
        assert torch.equal(a.k[:, :, :9], b.k[:, :, :9]) and torch.equal(a.v[:, :, :9], b.v[:, :, :9])
    assert caches[0].length == caches[1].length == 9


def test_the_logits_do_not_depend_on_the_number_of_threads():
    model = small(d_model=64, n_head=4)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(steps(model, prompt, 8)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_int8_models_step_in_c():
    model = quantize_int8(small(d_model=64))
    lean = LeanStep(model)
    assert lean.in_c is not None
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(5))
    ours, tokens = steps(model, prompt, 12)
    functions, their_tokens = steps(model, prompt, 12, in_c=False)
    assert torch.equal(tokens, their_tokens)
    torch.testing.assert_close(ours, functions, rtol=1e-5, atol=1e-5)


def test_the_step_runs_in_c_when_it_can(monkeypatch):
    model = small()
    calls = []
    real = cpu_kernels.Kernels.__init__

    def counting(self, path):
        real(self, path)
        step = self.step
        self.step = lambda *args: calls.append(1) or step(*args)

    monkeypatch.setattr(cpu_kernels.Kernels, "__init__", counting)
    cpu_kernels._load.cache_clear()
    try:
        ids = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=10, temperature=0)
    finally:
        cpu_kernels._load.cache_clear()
    assert ids.shape == (1, 13) and len(calls) == 9  # the prompt goes through the modules, then 9 steps


def test_what_the_c_step_does_not_take():
    assert "pre-norm" in StepInC.unsupported(small(norm_position="post"))
    assert "norms" in StepInC.unsupported(small(norm="scalenorm"))
    model = small()
    model.blocks[1].norm2.eps = 1e-3
    assert "one eps" in StepInC.unsupported(model)
    lora = small()
    apply_lora(lora)
    assert "LoRA" in StepInC.unsupported(lora)
    assert LeanStep(small(norm_position="post")).in_c is None
    assert LeanStep(small(), matvec=False).in_c is None  # no compiled kernels asked for


def test_a_call_it_cannot_run_goes_to_the_functions():
    """More rows than a few, a weight stored transposed since the step was built, a full cache: LeanStep's
    own functions take the call, with the same results and errors."""
    model = small()
    lean = LeanStep(model)
    prompt = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(6))
    cache = lm.KVCache(model, 1, max_len=20)
    with torch.no_grad():
        assert lean.in_c(prompt, cache, 0) is None  # 12 rows: a prompt, for the matrix products
        reference = model(prompt, all_logits=True)[0]
        torch.testing.assert_close(lean(prompt, cache), reference, rtol=1e-5, atol=1e-5)
        for_decoding(model, "columns")  # every weight transposed in memory
        token = prompt[:, -1:]
        assert lean.in_c(token, cache, cache.length) is None
        assert lean(token, cache).shape == (1, 1, 61)
        for_decoding(model, "rows")
        assert lean.in_c(token, cache, cache.length) is not None
        square = model.blocks[0].attn.proj.weight  # transposed in place: the same address, another layout
        square.data = square.data.t()
        assert lean.in_c(token, cache, cache.length) is None
        square.data = square.data.t()
    with torch.no_grad():  # a cache for one row, two rows given: the functions' error, nothing written past it
        two = torch.zeros(2, 1, dtype=torch.long)
        assert lean.in_c(two, cache, cache.length) is None
        with pytest.raises(RuntimeError):
            lean(two, cache)
    full = lm.KVCache(model, 1, max_len=2)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), cache=full)
        with pytest.raises(RuntimeError, match="max_len"):
            lean(torch.zeros(1, 1, dtype=torch.long), full)


def test_last_keeps_the_last_positions_only():
    model = small()
    lean = LeanStep(model)
    caches = [lm.KVCache(model, 2, max_len=8) for _ in range(2)]
    idx = torch.randint(0, 61, (2, 3), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        every = lean(idx, caches[0])
        last = lean(idx, caches[1], last=1)
    assert last.shape == (2, 1, 61) and torch.equal(last, every[:, -1:])


def test_a_kernel_is_rebuilt_when_a_header_beside_it_changes(tmp_path, monkeypatch):
    """decode.c and causal.c include vector_math.h: the compiled library's name covers the headers beside the
    source, so an edited header never leaves a stale library in the kernel folder."""
    from lm import native

    monkeypatch.setenv("LM_KERNEL_DIR", str(tmp_path / "kernels"))
    source = tmp_path / "src" / "k.c"
    source.parent.mkdir()
    source.write_text('#include "k.h"\nint lm_k(void) { return K; }\n')
    (source.parent / "k.h").write_text("#define K 1\n")
    flags = ("-O2", "-shared", "-fPIC")
    first = native.build(source, flags, native.compiler())
    (source.parent / "k.h").write_text("#define K 2\n")
    second = native.build(source, flags, native.compiler())
    assert first != second
    assert ctypes.CDLL(str(first)).lm_k() == 1 and ctypes.CDLL(str(second)).lm_k() == 2
