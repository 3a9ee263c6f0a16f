"""lm's compiled CPU kernels: for decoding, products and attention as fast as memory delivers the weights;
for training, float32 causal attention forward and backward (at the end of this module).

Decoding one token at batch 1 reads every weight of the model once and does one multiply-add with
each, so a step takes as long as the weights take to stream in from memory. Neither of torch's CPU
products gets there at batch 1: on a 2-core AVX2 CPU the BLAS behind F.linear keeps the stream on
one core (11-15 GB/s) and oneDNN's inner product, which splits it, reached 11-20 GB/s, while a
plain `torch.sum` over the same 101 MB of weights streams at 23-30 GB/s. `lm/csrc/decode.c` holds
kernels written for this case alone (about 200 lines of C):

- `lm_matvec`, a few rows times a weight matrix (`matvec`): the weight's rows split between the
  threads, four at a time per thread, eight floats per load, one fused multiply-add per float, and
  the bias, the activation (GELU, tanh-GELU, SiLU) and the residual addition (or SwiGLU's
  multiplication) applied as each output is written;
- `lm_matvec_int8`, the same for an `lm.quantize.Int8Linear`'s int8 weight and float scale per row
  (`product(..., scale=...)`): a quarter of the bytes, widened to float32 as they are read;
- `lm_attend`, the attention of a few new queries over a KV cache (`attend`), each query's scores,
  softmax and weighted sum of the values on one thread.
- `lm_decode_step`, a whole decoding step of a pre-norm model made of these, every block's norms, products,
  RoPE, KV-cache writes and attention in one call and one parallel region (`Kernels.step`, called by
  `lm.decode_step.StepInC`, which `LeanStep` uses wherever the model allows).

Each output is summed by one thread in one fixed order, so the results depend neither on the number
of threads nor on how many rows or queries came together: a speculative step's check of k tokens
gives the logits of k one-token steps bit for bit. Against F.linear and F.scaled_dot_product_attention
they differ in the last bits (another order of additions), as oneDNN's do. Every kernel here and in
causal.c reads and writes subnormal floats (below 2^-126, 1.2e-38) as zero while it runs, and gives each
thread back its own setting when it is done: softmax's tail over sharp scores and GELU's far tails are
subnormal, and on x86 each one costs a microcode assist (one layer's attention forward and backward took
183 ms instead of 5.3 with q and k of standard deviation 20; `bench/sharp_attention.py`).

The file is compiled once per machine with the system's C compiler (`cc -O2 -mavx2 -mfma -fopenmp`,
about a second) into ~/.cache/lm/kernels (or $LM_KERNEL_DIR; a private temporary folder where that
one cannot be written or others may write to it), named by a hash of its source, the flags and the
compiler (`lm.native.build`), and loaded with ctypes: no torch headers, no build step at install time. The OpenMP
runtime is the one PyTorch loaded, so the kernels run on PyTorch's threads (`torch.get_num_threads()`).
Where they cannot run (not Linux on x86-64, no AVX2, no compiler, LM_CPU_KERNELS=0 in the
environment, or the compiled kernels disagreeing with torch on a small check) `unavailable()` says
why and decoding keeps torch's products. `lm.decode_step.LeanStep` uses them for `generate`'s
float32 steps on a CPU (`bench/cpu_decode.py` measures them against transformers).

`lm/csrc/causal.c` (`causal_attention`, `CausalAttention`) is built and checked the same way, as its
own library (compiled with -O3: at -O2 the compiler spills its register blocks). It computes causal
attention keeping the probabilities for backward, skipping the blocks above the diagonal that SDPA's
CPU flash kernel also computes; `lm.attention.kernels.sdpa` takes it for float32 CPU training
(`bench/cpu_train_throughput.py`). Where the CPU has AVX-512 it is built for it; LM_CPU_KERNELS=avx2 asks
for the AVX2 build instead (the same numbers to the bit, slower).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .native import CSRC, build, compiler, kernel_dir, switched_off, unbuildable

SOURCE = CSRC / "decode.c"
FLAGS = ("-O2", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "swish": 3}
COMBINES = {"none": 0, "add": 1, "mul": 2}
FEW_ROWS = 8  # what counts as "a few rows": decoding sends products of up to this many rows here
MAX_KEYS = 32768  # attention keeps a query's scores on its thread's stack: 128 KiB at most


class Kernels:
    """The C functions of the library at `path`, their argument types declared: `matvec`, `matvec_int8`,
    `attend` and `step` (a whole decoding step, called by `lm.decode_step.LeanStep`)."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        pointer, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self.matvec, self.matvec_int8, self.attend = library.lm_matvec, library.lm_matvec_int8, library.lm_attend
        self.step = library.lm_decode_step
        self.matvec.argtypes = [pointer] * 5 + [long] * 3 + [int_] * 3
        self.matvec_int8.argtypes = [pointer] * 6 + [long] * 3 + [int_] * 3
        self.attend.argtypes = [pointer] * 4 + [long] * 18 + [ctypes.c_float, int_]
        self.step.argtypes = [pointer] * 2 + [ctypes.c_float] * 2 + [pointer] * 3 + [int_]
        self.matvec.restype = self.matvec_int8.restype = self.attend.restype = self.step.restype = None


def _agrees_with_torch(kernels: Kernels) -> bool:
    """Whether the compiled kernels compute what F.linear, the activations, the combinations and
    F.scaled_dot_product_attention do: a product with ragged tails (13 outputs of 37 inputs: the 4-row
    blocks and 8-float loads leave remainders) and one of a real model's size; attention of 3 new
    queries (4 heads sharing 2 key-value heads) after 5 cached positions."""
    g = torch.Generator().manual_seed(0)
    randn = functools.partial(torch.randn, generator=g, dtype=torch.float32)
    for n_rows, n_out, n_in in ((3, 13, 37), (1, 384, 512)):
        weight, bias, x, other = randn(n_out, n_in), randn(n_out), randn(n_rows, n_in), randn(n_rows, n_out)
        y = F.linear(x, weight, bias)
        expected = {"none": y, "gelu": F.gelu(y), "gelu_tanh": F.gelu(y, approximate="tanh"), "swish": F.silu(y)}
        for activation, want in expected.items():
            for combine, then in (("none", want), ("add", want + other), ("mul", want * other)):
                got = product(weight, bias, activation, combine, kernels)(x, None if combine == "none" else other)
                if not torch.allclose(got, then, rtol=1e-4, atol=1e-4):
                    return False
    bias, x = randn(13), randn(3, 37)
    q8, scale = torch.randint(-127, 128, (13, 37), generator=g, dtype=torch.int8), randn(13).abs()
    want = F.gelu(F.linear(x, q8.float() * scale[:, None], bias))
    if not torch.allclose(product(q8, bias, "gelu", kernels=kernels, scale=scale)(x), want, rtol=1e-4, atol=1e-4):
        return False
    q, (keys, values) = randn(1, 4, 3, 12), randn(2, 1, 2, 8, 12).unbind(0)
    mask = torch.ones(3, 8, dtype=torch.bool).tril(5)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    return torch.allclose(attention(q, keys, values, kernels), expected.reshape(1, 3, 48), rtol=1e-4, atol=1e-5)


def _cpu_flags() -> set[str] | None:
    """The instruction-set flags /proc/cpuinfo lists for this CPU, or None where it cannot be read."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        return set(flags.split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return None


def _has_avx2_and_fma() -> bool:
    """Whether the CPU has the AVX2 and FMA instructions the kernels are compiled for: the flags in
    /proc/cpuinfo, else what torch's own kernels chose (AVX2 or AVX-512)."""
    flags = _cpu_flags()
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
    return {"avx2", "fma"} <= flags


def _not_here() -> str | None:
    """Why no kernel of lm/csrc can run on this machine (switched off, another platform, no AVX2, no
    compiler), or None."""
    if switched_off():
        return "LM_CPU_KERNELS=0 is set"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for Linux on x86-64, not {platform.system()} on {platform.machine()}"
    if not _has_avx2_and_fma():
        return f"this CPU has no AVX2 and FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return unbuildable()


def _built(source: Path, flags: tuple[str, ...], wrap, agrees):
    """(wrap(the compiled library), None), or (None, why not): compiled once per machine, checked by
    `agrees` once per process."""
    why = _not_here()
    if why is not None:
        return None, why
    try:
        kernels = wrap(build(source, flags, compiler()))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        return None, f"compiling {source.name} failed: {error}"
    if not agrees(kernels):
        return None, f"the kernels compiled from {source.name} disagree with torch on a small check"
    return kernels, None


@functools.cache
def _load():
    """(the decoding kernels, None) or (None, why they are not available); computed once a process."""
    return _built(SOURCE, FLAGS, Kernels, _agrees_with_torch)


def unavailable() -> str | None:
    """Why the compiled kernels cannot run here, or None when they can (compiling them on the first call)."""
    return _load()[1]


def _checked(name: str, tensor: torch.Tensor | None, size: int | None) -> None:
    if tensor is None:
        return
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"matvec: {name} must be a contiguous float32 CPU tensor, got {tensor.dtype} on "
                         f"{tensor.device}{'' if tensor.is_contiguous() else ', not contiguous'}; "
                         "use .float().contiguous()")
    if size is not None and tensor.numel() != size:
        raise ValueError(f"matvec: {name} has {tensor.numel()} elements, expected {size}")


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none",
           other: torch.Tensor | None = None, combine: str = "none") -> torch.Tensor:
    """`combine(activation(F.linear(x, weight, bias)), other)` for x (..., n_in) through the compiled
    kernel: activation "none", "gelu", "gelu_tanh" or "swish" (SiLU), combine "none", "add" (+ other)
    or "mul" (* other), other shaped like the output. Made for a few rows (decoding); a matrix product
    (torch's) is faster for many. Raises RuntimeError where the kernel is not available
    (`unavailable()` says why) and ValueError for inputs it does not take."""
    kernels, why = _load()
    if kernels is None:
        raise RuntimeError(f"lm's CPU kernels are not available: {why}.")
    if activation not in ACTIVATIONS or combine not in COMBINES:
        raise ValueError(f"matvec: activation {activation!r} / combine {combine!r}; choose the activation "
                         f"from {sorted(ACTIVATIONS)} and combine from {sorted(COMBINES)}")
    if weight.dim() != 2:
        raise ValueError(f"matvec: weight must be (n_out, n_in), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if x.dim() == 0 or x.size(-1) != n_in:
        raise ValueError(f"matvec: x must end in the weight's {n_in} inputs, got shape {tuple(x.shape)}")
    if (other is None) != (combine == "none"):
        raise ValueError("matvec: pass `other` exactly when combine is 'add' or 'mul'")
    rows = x.numel() // n_in
    for name, tensor, size in (("x", x, None), ("weight", weight, None), ("bias", bias, n_out),
                               ("other", other, rows * n_out)):
        _checked(name, tensor, size)
    return product(weight, bias, activation, combine, kernels)(x, other)


def product(weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none", combine: str = "none",
            kernels: Kernels | None = None, scale: torch.Tensor | None = None):
    """A function `(x, other) -> y` computing what `matvec` does with this weight and bias, without
    its checks (the caller makes sure x and other are contiguous float32): what LeanStep calls. With
    `scale`, `weight` is an int8 (n_out, n_in) matrix and `scale` its float32 factor per row, as
    `lm.quantize.Int8Linear` stores them: y = x @ (scale * weight)^T + bias, summed in float32."""
    kernels = kernels or _load()[0]
    n_out, n_in = weight.shape
    act, post = ACTIVATIONS[activation], COMBINES[combine]
    bias_at = (lambda: None) if bias is None else bias.data_ptr

    def run(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y, threads = torch.empty(*x.shape[:-1], n_out, dtype=torch.float32), torch.get_num_threads()
        rows, other_at = x.numel() // n_in, None if other is None else other.data_ptr()
        if scale is None:
            kernels.matvec(weight.data_ptr(), x.data_ptr(), bias_at(), other_at, y.data_ptr(), rows, n_out, n_in,
                           act, post, threads)
        else:
            kernels.matvec_int8(weight.data_ptr(), scale.data_ptr(), x.data_ptr(), bias_at(), other_at, y.data_ptr(),
                                rows, n_out, n_in, act, post, threads)
        return y

    return run


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kernels: Kernels | None = None) -> torch.Tensor:
    """Causal attention of the T new queries q (B, H, T, D) over keys and values (B, H_kv, S, D) of
    the S - T cached positions and the new ones (as `DynamicCache.update` returns them), as (B, T, H * D):
    the query at t sees the first S - T + 1 + t keys. Float32 CPU tensors whose last dimension is
    contiguous; a query's output does not depend on T (see `attend` in lm/csrc/decode.c)."""
    B, H, T, D = q.shape
    S, H_kv = keys.size(2), keys.size(1)
    out = torch.empty(B, T, H * D, dtype=torch.float32)
    (kernels or _load()[0]).attend(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), B, H, H_kv, T, S, D, *q.stride()[:3],
        *keys.stride()[:3], *values.stride()[:3], T * H * D, D, H * D, D ** -0.5, torch.get_num_threads())
    return out


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`attention` with its inputs checked: (B, T, H * D) from q (B, H, T, D) and keys, values
    (B, H_kv, S, D), S >= T, H a multiple of H_kv; ValueError for what the kernel does not take."""
    kernels, why = _load()
    if kernels is None:
        raise RuntimeError(f"lm's CPU kernels are not available: {why}.")
    if q.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"attend: q must be (B, H, T, D) and keys, values (B, H_kv, S, D) alike, got "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    (B, H, T, D), (_, H_kv, S, _) = q.shape, keys.shape
    if q.numel() == 0 or keys.numel() == 0:
        raise ValueError(f"attend: empty inputs, q {tuple(q.shape)} and keys {tuple(keys.shape)}")
    if keys.size(0) != B or keys.size(3) != D or S < T or H % H_kv:
        raise ValueError(f"attend: keys {tuple(keys.shape)} do not fit q {tuple(q.shape)}: same batch and head "
                         "size, at least T positions, a number of key-value heads dividing the query heads")
    if S > MAX_KEYS:
        raise ValueError(f"attend: {S} keys is more than the kernel's {MAX_KEYS}; use F.scaled_dot_product_attention")
    for name, tensor in (("q", q), ("keys", keys), ("values", values)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.stride(-1) != 1:
            raise ValueError(f"attend: {name} must be float32 on the CPU with a contiguous last dimension, got "
                             f"{tensor.dtype} on {tensor.device} with strides {tensor.stride()}")
    return attention(q, keys, values, kernels)


# ---- causal attention for training (lm/csrc/causal.c) ------------------------------------------
CAUSAL_SOURCE = CSRC / "causal.c"
CAUSAL_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")  # -O2 spills the 6 x 16 blocks


def _causal_flags() -> tuple[str, ...]:
    """CAUSAL_FLAGS, plus -mavx512f where the CPU has AVX-512 (blocks of 8 rows x two 16-float registers:
    1.8 + 2.9 ms a layer of the book's model forward and backward against 2.8 + 4.5 for the AVX2 build on a
    2-core Xeon), unless LM_CPU_KERNELS=avx2 asks for the AVX2 build (to measure what a CPU without AVX-512
    would get). The flags are part of the built file's name, so a kernel folder shared by two machines keeps
    one build for each."""
    wide = "avx512f" in (_cpu_flags() or ()) and os.environ.get("LM_CPU_KERNELS") != "avx2"
    return CAUSAL_FLAGS + (("-mavx512f",) if wide else ())


class CausalKernels:
    """The C functions of causal.c, their argument types declared: `forward`, `backward`, `stride` (the
    floats of a row of the transposed k or v), `probs` (the floats of one head's kept probabilities: the
    lower triangle by blocks of rows, about half of T x T) and `scratch` (the floats each thread needs); and
    `gelu_forward`, `gelu_backward` and `gelu_scratch`, the MLP's bias and GELU; `norm_forward`, `norm_backward`
    and `norm_scratch`, RMSNorm; `gate_forward` and `gate_backward`, SwiGLU's gate; `rope`, the rotary embedding;
    `residual`, a residual sum with its sublayer's output bias."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        pointer, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self.forward, self.backward = library.lm_causal_forward, library.lm_causal_backward
        self.stride, self.scratch, self.probs = library.lm_causal_stride, library.lm_causal_scratch, library.lm_causal_probs
        self.forward.argtypes = [pointer] * 7 + [long] * 16 + [ctypes.c_float, int_]
        self.backward.argtypes = [pointer] * 12 + [long] * 19 + [ctypes.c_float, int_]
        self.forward.restype = self.backward.restype = None
        self.stride.argtypes, self.scratch.argtypes, self.probs.argtypes = [long], [long, long, int_], [long]
        self.stride.restype = self.scratch.restype = self.probs.restype = long
        self.gelu_forward, self.gelu_backward = library.lm_bias_gelu_forward, library.lm_bias_gelu_backward
        self.gelu_scratch = library.lm_bias_gelu_scratch
        self.gelu_forward.argtypes = [pointer] * 3 + [long] * 2 + [int_]
        self.gelu_backward.argtypes = [pointer] * 6 + [long] * 2 + [int_]
        self.gelu_forward.restype = self.gelu_backward.restype = None
        self.gelu_scratch.argtypes, self.gelu_scratch.restype = [long, long], long
        self.norm_forward, self.norm_backward = library.lm_rms_norm_forward, library.lm_rms_norm_backward
        self.norm_scratch = library.lm_rms_norm_scratch
        self.norm_forward.argtypes = [pointer] * 4 + [long] * 2 + [ctypes.c_float, int_]
        self.norm_backward.argtypes = [pointer] * 7 + [long] * 2 + [int_]
        self.norm_forward.restype = self.norm_backward.restype = None
        self.norm_scratch.argtypes, self.norm_scratch.restype = [long, long], long
        self.gate_forward, self.gate_backward = library.lm_silu_gate_forward, library.lm_silu_gate_backward
        self.gate_forward.argtypes = [pointer] * 3 + [long] * 2 + [int_]
        self.gate_backward.argtypes = [pointer] * 5 + [long] * 2 + [int_]
        self.gate_forward.restype = self.gate_backward.restype = None
        self.rope = library.lm_rope
        self.rope.argtypes, self.rope.restype = [pointer] * 4 + [long] * 7 + [int_] * 2, None
        self.residual = library.lm_bias_residual
        self.residual.argtypes, self.residual.restype = [pointer] * 3 + [long] * 2 + [int_], None


def _pointer(bias: torch.Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


def _causal_run(kernels: CausalKernels, q, k, v, bias=None):
    """(out, probabilities) for q, k, v (B, H, T, D) float32, D contiguous, plus `bias` (3 H D floats: q's,
    k's, v's, contiguous; None for none); out is a (B, H, T, D) view of a (B, T, H, D) tensor, so putting
    the heads side by side again copies nothing."""
    B, H, T, D = q.shape
    threads = torch.get_num_threads()
    out = torch.empty(B, T, H, D).transpose(1, 2)
    probs = torch.empty(B * H, kernels.probs(T))  # by blocks of rows, about half of T x T a head
    scratch = torch.empty(threads * kernels.scratch(T, D, 0))
    kernels.forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(bias), out.data_ptr(), probs.data_ptr(),
                    scratch.data_ptr(), B, H, T, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    *out.stride()[:3], D ** -0.5, threads)
    return out, probs


def _causal_gradients(kernels: CausalKernels, q, k, v, probs, grad, bias=None, into=None, bias_grad=False):
    """(dq, dk, dv, dbias) from the kept probabilities and the output's gradient `grad` (D contiguous); written
    into `into`, three (B, H, T, D) views with the same strides, where given. dbias, the gradient of the bias
    (3 H D floats), is summed by the kernel where `bias_grad`, else None."""
    B, H, T, D = q.shape
    threads = torch.get_num_threads()
    dq, dk, dv = torch.empty(3, B, T, H, D).transpose(2, 3) if into is None else into
    scratch = torch.empty(threads * kernels.scratch(T, D, 1))
    dbias, partial = (torch.empty(3 * H * D), torch.empty(3 * B * H * D)) if bias_grad else (None, None)
    kernels.backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(bias), probs.data_ptr(), grad.data_ptr(),
                     dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _pointer(dbias), _pointer(partial),
                     scratch.data_ptr(), B, H, T, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad.stride()[:3],
                     *dq.stride()[:3], D ** -0.5, threads)
    return dq, dk, dv, dbias


def _causal_agrees(kernels: CausalKernels) -> bool:
    """Whether causal.c computes what attention and its gradients are, written out in float64, on 2 x 3 heads
    of 16 floats and 21 positions (blocks of 6 or 8 rows and 16 columns leave remainders), q, k, v strided as a
    model's are, with a bias added to them. No autograd: the check may first run under no_grad, inference_mode or saved-tensor hooks."""
    g = torch.Generator().manual_seed(0)
    qkv, grad = torch.randn(2, 21, 3 * 48, generator=g, dtype=torch.float64), torch.randn(2, 3, 21, 16, generator=g)
    bias = torch.randn(3 * 48, generator=g)
    q, k, v = (x.view(2, 21, 3, 16).transpose(1, 2) for x in (qkv + bias).split(48, dim=2))
    scale, grad64 = 16 ** -0.5, grad.double()
    future = torch.ones(21, 21, dtype=torch.bool).triu(1)
    probs = torch.softmax((q @ k.transpose(2, 3) * scale).masked_fill(future, float("-inf")), dim=-1)
    dp = grad64 @ v.transpose(2, 3)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
    want = (probs @ v, ds @ k, ds.transpose(2, 3) @ q, probs.transpose(2, 3) @ grad64)
    q32, k32, v32 = (x.view(2, 21, 3, 16).transpose(1, 2) for x in qkv.float().split(48, dim=2))
    out, kept = _causal_run(kernels, q32, k32, v32, bias.float())
    got = (out, *_causal_gradients(kernels, q32, k32, v32, kept, grad, bias.float(), bias_grad=True))
    dbias = torch.cat([x.sum((0, 2)).flatten() for x in want[1:]])  # q's, k's, v's: (part, head, column)
    if not all(torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5) for a, b in zip(got, (*want, dbias))):
        return False
    h, bias, grad = torch.randn(5, 32, generator=g) * 4, torch.randn(32, generator=g), torch.randn(5, 32, generator=g)
    x = (h + bias).double()
    cdf, pdf = 0.5 * torch.erfc(-x / 2 ** 0.5), torch.exp(-x * x / 2) / (2 * torch.pi) ** 0.5
    dh = grad * (cdf + x * pdf)
    got = (_bias_gelu_run(kernels, h, bias), *_bias_gelu_gradients(kernels, h, bias, grad))
    if not all(torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5) for a, b in zip(got, (x * cdf, dh, dh.sum(0)))):
        return False
    return (_rms_norm_agrees(kernels, h, bias, grad) and _silu_gate_agrees(kernels, h, bias, grad)
            and _rope_agrees(kernels, qkv.float()) and _bias_residual_agrees(kernels, h, bias, grad))


def _bias_residual_agrees(kernels: CausalKernels, x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether lm_bias_residual writes x + (h + bias) into h, as torch rounds it, for x and h (N, C)"""
    want, got = x + (h + bias), h.clone()
    kernels.residual(x.data_ptr(), got.data_ptr(), bias.data_ptr(), *x.shape, 1)
    return torch.equal(got, want)


def _rope_agrees(kernels: CausalKernels, qkv: torch.Tensor) -> bool:
    """Whether lm_rope rotates, and rotates back for backward, as the written-out rotation does, on heads of 32
    floats strided as a model's q is in its qkv projection's output"""
    B, T = qkv.shape[:2]
    x = qkv[..., :96].view(B, T, 3, 32).transpose(1, 2)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * torch.rand(16, generator=torch.Generator().manual_seed(1))
    cos, sin = (f(torch.cat((angles, angles), 1)).float() for f in (torch.cos, torch.sin))
    x64, c64, s64 = x.double(), cos.double(), sin.double()
    half = lambda u: torch.cat((-u[..., 16:], u[..., :16]), -1)  # noqa: E731 (rotate_half)
    back = lambda u: torch.cat((u[..., 16:], -u[..., :16]), -1)  # noqa: E731 (its transpose)
    want = (x64 * c64 + half(x64) * s64, x64 * c64 + back(x64 * s64))
    got = (_rotated_by(kernels, x, cos, sin, False), _rotated_by(kernels, x, cos, sin, True))
    return all(torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want))


def _rms_norm_agrees(kernels: CausalKernels, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether lm_rms_norm_* compute RMSNorm and its gradients, written out in float64, for x (N, C)"""
    x64, w64, g64 = x.double(), weight.double(), grad.double()
    r = (x64.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    xhat = x64 * r
    gw = g64 * w64
    want = (xhat * w64, r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True)), (g64 * xhat).sum(0))
    y, rstd = torch.empty_like(x), torch.empty(x.size(0))
    kernels.norm_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), *x.shape, 1e-5, 1)
    dx, dw, partial = torch.empty_like(x), torch.empty_like(weight), torch.empty(kernels.norm_scratch(*x.shape))
    kernels.norm_backward(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(), dx.data_ptr(),
                          dw.data_ptr(), partial.data_ptr(), *x.shape, 1)
    return all(torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5) for a, b in zip((y, dx, dw), want))


def _silu_gate_agrees(kernels: CausalKernels, a: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether lm_silu_gate_* compute SiLU(a) b and its gradients, written out in float64, for a (N, F)"""
    b = grad.flip(0) + bias
    a64, b64, g64 = a.double(), b.double(), grad.double()
    s = torch.sigmoid(a64)
    want = (a64 * s * b64, g64 * b64 * s * (1 + a64 * (1 - s)), g64 * a64 * s)
    y, da, db = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    kernels.gate_forward(a.data_ptr(), b.data_ptr(), y.data_ptr(), *a.shape, 1)
    kernels.gate_backward(a.data_ptr(), b.data_ptr(), grad.data_ptr(), da.data_ptr(), db.data_ptr(), *a.shape, 1)
    return all(torch.allclose(x.double(), w, rtol=1e-5, atol=1e-5) for x, w in zip((y, da, db), want))


@functools.cache
def _load_causal():
    """(the causal attention kernels, None) or (None, why not); computed once a process."""
    return _built(CAUSAL_SOURCE, _causal_flags(), CausalKernels, _causal_agrees)


def causal_unavailable(head_size: int = 64) -> str | None:
    """Why `causal_attention` cannot run here for heads of `head_size` floats, or None when it can."""
    if head_size % 16:
        return f"the kernel takes heads of a multiple of 16 floats, not {head_size}"
    return _load_causal()[1]


def _ready(why: str | None, kernel: str) -> CausalKernels:
    """The loaded causal.c, or RuntimeError saying why `kernel` cannot run (`why`, from one of the *_unavailable)."""
    if why is not None:
        raise RuntimeError(f"lm's {kernel} kernel cannot run: {why}.")
    return _load_causal()[0]


def _causal_kernels(head_size: int) -> CausalKernels:
    """The loaded causal.c for heads of `head_size` floats, or RuntimeError saying why it cannot run."""
    return _ready(causal_unavailable(head_size), "causal attention")


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal mask) v for float32 CPU q, k, v (B, H, T, D), in lm/csrc/causal.c;
    the probabilities on and below the diagonal are kept for backward (about half of B * H * T * T floats),
    whose five products run in C too."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, probs = _causal_run(_causal_kernels(q.size(-1)), q, k, v)
        ctx.save_for_backward(q, k, v, probs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _causal_gradients(_load_causal()[0], q, k, v, probs, grad)[:3]


def _heads(qkv: torch.Tensor, n_head: int):
    """q, k, v (B, H, T, D) as views of qkv (B, T, 3 H D), laid out as a fused projection's output."""
    B, T, C3 = qkv.shape
    return (x.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for x in qkv.split(C3 // 3, dim=2))


class CausalAttentionQKV(torch.autograd.Function):
    """Causal attention straight from a fused projection's output: qkv (B, T, 3 C) float32 on the CPU, C = H D,
    q, k and v side by side as `lm.attention.CausalSelfAttention.qkv` lays them out, without its bias; `bias`
    (3 C,) or None is added to q, k and v as the kernel gathers each head. Returns (B, T, C), the heads side
    by side. Backward writes dq, dk and dv into one (B, T, 3 C) gradient, which is the projection's output
    gradient as it is: nothing to join; the bias's gradient, its column sums, the kernel adds up as it goes."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> torch.Tensor:
        B, T, C3 = qkv.shape
        q, k, v = _heads(qkv, n_head)
        bias = None if bias is None else bias.contiguous()
        out, probs = _causal_run(_causal_kernels(q.size(-1)), q, k, v, bias)
        ctx.save_for_backward(qkv, bias, probs)
        ctx.n_head = n_head
        return out.transpose(1, 2).reshape(B, T, C3 // 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        qkv, bias, probs = ctx.saved_tensors
        q, k, v = _heads(qkv, ctx.n_head)
        dqkv = torch.empty_like(qkv)
        grad = grad.contiguous().view(q.size(0), q.size(2), ctx.n_head, q.size(3)).transpose(1, 2)
        bias_grad = bias is not None and ctx.needs_input_grad[1]  # summed by the kernel as it goes
        dbias = _causal_gradients(_load_causal()[0], q, k, v, probs, grad, bias, into=tuple(_heads(dqkv, ctx.n_head)),
                                  bias_grad=bias_grad)[3]
        return dqkv, dbias, None


def _float32_cpu(function: str, **tensors) -> None:
    """ValueError naming the first of `tensors` that is not a float32 CPU tensor (None passes), or an empty one"""
    for name, tensor in tensors.items():
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"):
            raise ValueError(f"{function}: {name} must be float32 on the CPU, got {tensor.dtype} on {tensor.device}")
        if tensor is not None and tensor.numel() == 0:
            raise ValueError(f"{function}: empty {name} {tuple(tensor.shape)}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., F) as contiguous rows (N, F)"""
    return x.contiguous().view(-1, x.size(-1))


def causal_attention_qkv(qkv: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> torch.Tensor:
    """Causal attention of a fused projection's output qkv (B, T, 3 C), float32 on the CPU, with the projection's
    bias (3 C,) (None for none) added here rather than by the projection: `CausalAttentionQKV`. Returns
    (B, T, C). RuntimeError where `causal_unavailable(D)` says why it cannot run, ValueError for inputs it does
    not take."""
    if qkv.dim() != 3 or qkv.size(-1) % (3 * n_head) or qkv.numel() == 0:
        raise ValueError(f"causal_attention_qkv: qkv must be (B, T, 3 * {n_head} heads * D), got {tuple(qkv.shape)}")
    if bias is not None and tuple(bias.shape) != (qkv.size(-1),):
        raise ValueError(f"causal_attention_qkv: bias must be ({qkv.size(-1)},), got {tuple(bias.shape)}")
    _float32_cpu("causal_attention_qkv", qkv=qkv, bias=bias)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return CausalAttentionQKV.apply(qkv, bias, n_head)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of float32 CPU q, k, v (B, H, T, D), D a multiple of 16, through lm/csrc/causal.c
    (forward and backward); RuntimeError where `causal_unavailable(D)` says why not, ValueError for
    inputs it does not take."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"causal_attention: q, k, v must be (B, H, T, D) alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.numel() == 0:
        raise ValueError(f"causal_attention: empty inputs {tuple(q.shape)}")
    _float32_cpu("causal_attention", q=q, k=k, v=v)
    return CausalAttention.apply(q, k, v)  # RuntimeError there where the kernel cannot run


def float32_training_through(x: torch.Tensor, layer: nn.Module) -> bool:
    """Whether x goes through `layer` in a float32 training pass on a CPU that the training kernels here may take
    over from it: gradients wanted (of x or of the layer's weights), `layer` a plain nn.Linear without hooks (not
    LoRA's or int8's, whose forward must run), no autocast and no torch.compile (which cannot trace ctypes)."""
    return (type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
            and float32_training(x, layer.parameters()))


# ---- the MLP's bias and exact GELU for training (the end of lm/csrc/causal.c) ----------------------------
def _bias_gelu_run(kernels: CausalKernels, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(h + bias) for h (N, F) and bias (F,), both contiguous float32"""
    y = torch.empty_like(h)
    kernels.gelu_forward(h.data_ptr(), bias.data_ptr(), y.data_ptr(), *h.shape, torch.get_num_threads())
    return y


def _bias_gelu_gradients(kernels: CausalKernels, h, bias, grad):
    """(dh, dbias) from the output's gradient `grad` (N, F), all contiguous"""
    dh, dbias, partial = torch.empty_like(h), torch.empty_like(bias), torch.empty(kernels.gelu_scratch(*h.shape))
    kernels.gelu_backward(h.data_ptr(), bias.data_ptr(), grad.data_ptr(), dh.data_ptr(), dbias.data_ptr(),
                          partial.data_ptr(), *h.shape, torch.get_num_threads())
    return dh, dbias


def rows_unavailable(width: int) -> str | None:
    """Why the row kernels (`bias_gelu`, `rms_norm`, `silu_gate`) cannot run here for rows of `width` floats, or
    None when they can."""
    if width % 16:
        return f"the kernel takes rows of a multiple of 16 floats, not {width}"
    return _load_causal()[1]


class BiasGelu(torch.autograd.Function):
    """GELU(h + bias), the exact GELU, for float32 CPU h (..., F) and bias (F,), in lm/csrc/causal.c: the bias
    added as the GELU is taken, and in backward the bias's gradient summed in the same pass as h's. Saves h and
    the bias (as F.gelu(F.linear(...)) saves the linear's output)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        kernels = _ready(rows_unavailable(h.size(-1)), "bias-GELU")
        rows, bias = _rows(h), bias.contiguous()
        ctx.save_for_backward(rows, bias)
        return _bias_gelu_run(kernels, rows, bias).view(h.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, bias = ctx.saved_tensors
        dh, dbias = _bias_gelu_gradients(_load_causal()[0], rows, bias, grad.contiguous().view(rows.shape))
        return dh.view(grad.shape), dbias


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.gelu(h + bias) (the exact GELU) for float32 CPU h (..., F) and bias (F,), forward and backward in C:
    what `lm.feedforward.MLP` runs for training on a CPU (`F.linear(x, fc.weight)`, then this), instead of the
    linear's bias broadcast into its output, the GELU, and a pass of its own for the bias's gradient.
    ValueError for inputs it does not take; RuntimeError where `bias_gelu_unavailable(F)` says why it cannot run."""
    if h.dim() == 0 or bias.dim() != 1 or bias.size(0) != h.size(-1):
        raise ValueError(f"bias_gelu: bias {tuple(bias.shape)} must hold one number per column of h {tuple(h.shape)}")
    if h.numel() == 0:
        raise ValueError(f"bias_gelu: empty input {tuple(h.shape)}")
    _float32_cpu("bias_gelu", h=h, bias=bias)
    return BiasGelu.apply(h, bias)


# ---- RMSNorm and SwiGLU's gate for training (the end of lm/csrc/causal.c) --------------------------------------
def float32_training(x: torch.Tensor, parameters=()) -> bool:
    """Whether x, and the `parameters` it meets, are in a float32 training pass on a CPU that the training kernels
    here may take: gradients wanted (of x or of a parameter), no autocast and no torch.compile (which cannot
    trace ctypes)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or any(p is not None and p.requires_grad for p in parameters))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class RMSNormRows(torch.autograd.Function):
    """rms_norm(x, weight, eps) for float32 CPU x (..., C) and weight (C,) or None, in lm/csrc/causal.c: one pass
    forward, keeping each row's 1 / sqrt(mean(x^2) + eps); backward writes x's gradient and sums the weight's in
    the same pass. Saves x, the weight and those numbers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        kernels = _ready(rows_unavailable(x.size(-1)), "RMSNorm")
        rows, weight = _rows(x), None if weight is None else weight.contiguous()
        y, rstd = torch.empty_like(rows), torch.empty(rows.size(0))
        kernels.norm_forward(rows.data_ptr(), _pointer(weight), y.data_ptr(), rstd.data_ptr(), *rows.shape, eps,
                             torch.get_num_threads())
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        kernels, grad = _load_causal()[0], grad.contiguous().view(rows.shape)
        dx = torch.empty_like(rows)
        dweight = None if weight is None else torch.empty_like(weight)
        partial = torch.empty(kernels.norm_scratch(*rows.shape) if weight is not None else 0)
        kernels.norm_backward(rows.data_ptr(), _pointer(weight), rstd.data_ptr(), grad.data_ptr(), dx.data_ptr(),
                              _pointer(dweight), partial.data_ptr(), *rows.shape, torch.get_num_threads())
        return dx.view(ctx.shape), dweight, None


class SiluGate(torch.autograd.Function):
    """F.silu(a) * b for float32 CPU a and b of one shape (..., F), SwiGLU's gate, in lm/csrc/causal.c: one pass
    forward and one backward. Saves a and b (torch's silu and product keep SiLU(a) as well)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        kernels = _ready(rows_unavailable(a.size(-1)), "SwiGLU gate")
        a_rows, b_rows = _rows(a), _rows(b)
        y = torch.empty_like(a_rows)
        kernels.gate_forward(a_rows.data_ptr(), b_rows.data_ptr(), y.data_ptr(), *a_rows.shape, torch.get_num_threads())
        ctx.save_for_backward(a_rows, b_rows)
        ctx.shape = a.shape
        return y.view(a.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a_rows, b_rows = ctx.saved_tensors
        grad = grad.contiguous().view(a_rows.shape)
        da, db = torch.empty_like(a_rows), torch.empty_like(b_rows)
        _load_causal()[0].gate_backward(a_rows.data_ptr(), b_rows.data_ptr(), grad.data_ptr(), da.data_ptr(),
                                        db.data_ptr(), *a_rows.shape, torch.get_num_threads())
        return da.view(ctx.shape), db.view(ctx.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`lm.norms.rms_norm(x, weight, eps)` for float32 CPU x (..., C) and weight (C,) or None, forward and backward
    in C: what `lm.norms.RMSNorm` runs for training on a CPU, one pass where the written-out norm makes about ten.
    ValueError for inputs it does not take; RuntimeError where `rows_unavailable(C)` says why it cannot run."""
    if x.dim() == 0 or (weight is not None and tuple(weight.shape) != (x.size(-1),)):
        raise ValueError(f"rms_norm: weight {None if weight is None else tuple(weight.shape)} must hold one number "
                         f"per channel of x {tuple(x.shape)}")
    _float32_cpu("rms_norm", x=x, weight=weight)
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    return RMSNormRows.apply(x, weight, float(eps))


def silu_gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.silu(a) * b for float32 CPU a and b of the same shape (..., F), forward and backward in C: what
    `lm.feedforward.SwiGLU` runs for training on a CPU. ValueError for inputs it does not take; RuntimeError where
    `rows_unavailable(F)` says why it cannot run."""
    if a.shape != b.shape or a.dim() == 0:
        raise ValueError(f"silu_gate: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape")
    _float32_cpu("silu_gate", a=a, b=b)
    return SiluGate.apply(a, b)


bias_gelu_unavailable = rows_unavailable  # bias_gelu's name for it


# ---- a residual connection with its sublayer's output bias (lm_bias_residual, in lm/csrc/causal.c) -------------
class BiasResidual(torch.autograd.Function):
    """x + (h + bias) for float32 CPU x and h (..., C) and bias (C,), written into h: the residual connection around
    a sublayer whose output projection's product h was made without its bias. One pass forward; backward gives the
    output's gradient to x and h and its column sums to the bias, as torch's linear and sum would. Saves nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        kernels = _ready(rows_unavailable(h.size(-1)), "bias-residual")
        x_rows, h_rows, bias = _rows(x), h.view(-1, h.size(-1)), bias.contiguous()
        kernels.residual(x_rows.data_ptr(), h_rows.data_ptr(), bias.data_ptr(), *h_rows.shape, torch.get_num_threads())
        ctx.mark_dirty(h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad, grad, grad.reshape(-1, grad.size(-1)).sum(0) if ctx.needs_input_grad[2] else None


def bias_residual(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + (h + bias) for float32 CPU x and h of one shape (..., C), h contiguous, and bias (C,), in C: what
    `lm.model.Block` runs for training on a CPU around a sublayer that hands it its output projection's product
    without the bias (`before_bias`), in place of the bias broadcast into the projection's output and the residual
    sum's pass of its own. Overwrites h (a fresh product) with the sum and returns it. ValueError for inputs it does
    not take; RuntimeError where `rows_unavailable(C)` says why it cannot run."""
    if x.shape != h.shape or h.dim() == 0 or tuple(bias.shape) != (h.size(-1),):
        raise ValueError(f"bias_residual: x {tuple(x.shape)} and h {tuple(h.shape)} must have one shape, and bias "
                         f"{tuple(bias.shape)} one number per column")
    _float32_cpu("bias_residual", x=x, h=h, bias=bias)
    if not h.is_contiguous():
        raise ValueError("bias_residual: h must be contiguous (it is overwritten with the sum)")
    return BiasResidual.apply(x, h, bias)


# ---- the rotary embedding for training (the end of lm/csrc/causal.c) ------------------------------------------
def rope_unavailable(head_dim: int) -> str | None:
    """Why `rope` cannot run here for heads of `head_dim` floats, or None when it can."""
    if head_dim % 32:
        return f"the kernel takes heads of a multiple of 32 floats, not {head_dim}"
    return _load_causal()[1]


def _rotated_by(kernels: CausalKernels, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               transposed: bool) -> torch.Tensor:
    """lm_rope of x (B, H, T, D), D contiguous, into a new contiguous tensor"""
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(x.shape)
    kernels.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), *x.shape, *x.stride()[:3],
                 int(transposed), torch.get_num_threads())
    return y


class RotaryRows(torch.autograd.Function):
    """`lm.positions.apply_rotary(x, cos, sin)` for float32 CPU x (B, H, T, D) and tables (T, D), in
    lm/csrc/causal.c: one pass forward and one backward, the same numbers as torch's written-out rotation. Saves
    only the tables."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        kernels = _ready(rope_unavailable(x.size(-1)), "RoPE")
        ctx.save_for_backward(cos, sin)
        return _rotated_by(kernels, x, cos, sin, transposed=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotated_by(_load_causal()[0], grad, cos, sin, transposed=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`lm.positions.apply_rotary(x, cos, sin)` for float32 CPU x (B, H, T, D) and cos, sin (T, D), forward and
    backward in C: what `lm.positions.RotaryEmbedding` runs for training on a CPU, one pass where the written-out
    rotation makes five. ValueError for inputs it does not take; RuntimeError where `rope_unavailable(D)` says why
    it cannot run."""
    if x.dim() != 4 or cos.shape != (x.size(2), x.size(3)) or sin.shape != cos.shape:
        raise ValueError(f"rope: x must be (B, H, T, D) and cos, sin (T, D), got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    _float32_cpu("rope", x=x, cos=cos, sin=sin)
    return RotaryRows.apply(x, cos.contiguous(), sin.contiguous())


__all__ = ["attend", "bias_gelu", "bias_gelu_unavailable", "bias_residual", "causal_attention",
           "causal_attention_qkv", "causal_unavailable", "float32_training", "float32_training_through", "kernel_dir",
           "matvec", "rms_norm", "rope", "rope_unavailable", "rows_unavailable", "silu_gate", "unavailable"]
