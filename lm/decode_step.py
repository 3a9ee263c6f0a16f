"""One decoding step without the module machinery: the same operations, fewer Python calls.

Decoding one token at batch 1 on a CPU spends most of its time reading weights (`F.linear`), but
not all: each step also makes about a hundred `nn.Module` calls (every call checks for hooks and
goes through `__call__` and `forward`), looks up attributes, and asks the KV cache for a mask it
does not need. For the seed 000 model that was about 1 ms of a 4.5 ms step (cProfile).

`LeanStep(model)` reads the model once and keeps, for every block, plain functions that call the
functional ops with the layer's tensors: `torch.layer_norm(x, (C,), w, b, eps)` for a LayerNorm,
`F.linear(x, W, b)` for a Linear, `F.scaled_dot_product_attention` over the cache's buffers. A
step then runs

    x = tok_emb[idx] (+ pos_emb[n])
    for each block:  x = x + proj(attend(qkv(norm1(x))))   x = x + ffn(norm2(x))     (or post-norm)
    logits = lm_head(norm_f(x))

with the operations the modules run, in the same order. With `onednn=False, matvec=False` the
logits are the same floats (tests/test_decode_step.py checks them bit for bit against
`model(idx, cache=cache)`).

By default, wherever lm's compiled CPU kernels run (`lm.cpu_kernels`: Linux on x86-64 with AVX2 and
a C compiler), the float32 products of up to MATVEC_MAX_ROWS (8) rows and the attention over the
cache go to them instead: a product streams its weight at the memory's speed with the bias, the
activation and the residual addition (or SwiGLU's gate) applied as it writes, and each new query's
attention is computed on its own. On a 2-core AVX2 CPU that decodes seed 000's model in about 6 ms a
token where oneDNN took 8 (bench/cpu_decode.py). Each output is summed in one fixed order whatever
the threads and the rows beside it, so a speculative step's check of k tokens gives the same logits,
bit for bit, as k one-token steps; against the modules they differ in the last bits (another order
of additions), like any two BLAS libraries.

Where the model allows, the whole step then runs in one call of the C library (`StepInC`, `lm_decode_step`):
every block's norms, products, RoPE, cache writes and attention, the same kernels in the same order, with
no return to Python between them (LeanStep's functions made about ten calls a block; on seed 000's model
that was close to a third of a step).

Where they do not run (and for more rows: a prompt), the float32 products of models large enough
go to oneDNN's inner-product kernel instead
of the BLAS that `F.linear` calls (`torch.ops.mkldnn._linear_pointwise`, PyTorch's own fused linear
for the CPU, which its compiler uses): at batch 1 a product reads its whole weight for one row of
input, and oneDNN splits that stream over the threads where the BLAS keeps it on one core. The
same kernel applies the GELU (or SiLU) of the first feed-forward product, the gate's multiplication,
and the residual additions as it writes its output, so these cost no pass of their own. Summed in
another order, the logits differ from the modules' in the last bits (about 1e-6 relative), like
any two BLAS libraries. Each oneDNN call costs about 30 us more to start, so `onednn_pays` keeps
F.linear for models under 32 MiB of weights (they sit in the CPU's cache) and on one thread. On a
2-core AVX2 CPU, seed 000's model decodes about 1.17x faster than with F.linear at batch 1 and
1.5x at batch 8 (bench/cpu_decode.py has the figures against transformers).

Only what it knows is taken apart: LayerNorm and RMSNorm, plain `nn.Linear`, the GELU, tanh-GELU
and SwiGLU feed-forwards, `CausalSelfAttention` with a `DynamicCache`. Anything else (int8 or
LoRA layers, other norms) is called as its module, which gives the same result more slowly.
`LeanStep.unsupported(model)` says whether a model can use it at all (no hooks, no MoE, a plain
causal attention); generation uses it on its one-token steps whenever it can, and falls back to
`model(idx, cache=cache)` when the cache holds padding (batched prompts) or is static (CUDA graphs).
A step may also take several new tokens, attending through the mask the cache builds for the
modules: speculative decoding checks a draft's guesses that way (`lm.speculative`).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .attention.kernels import attend_over
from .attention.modules import CausalSelfAttention
from .feedforward import MLP, MoE, SwiGLU, TanhMLP
from .kv_cache import DynamicCache
from .norms import LayerNorm, RMSNorm, rms_norm
from .quantize import Int8Linear, int8_kernel_usable, int8_product


@functools.cache
def onednn_usable() -> bool:
    """Whether this torch has oneDNN's fused linear for the CPU (`torch.ops.mkldnn._linear_pointwise`)
    and it computes what F.linear and the activations compute, checked once on a small product."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, other = torch.randn(3, 1, 16, generator=g), torch.randn(3, 1, 24, generator=g)
        weight, bias = torch.randn(16, 24, generator=g).t(), torch.randn(24, generator=g)  # transposed, as laid out
        y = F.linear(x, weight, bias)
        pairs = [(op(x, weight, bias, "none", [], ""), y), (op(x, weight, None, "none", [], ""), F.linear(x, weight)),
                 (op(x, weight, bias, "gelu", [], "none"), F.gelu(y)),
                 (op(x, weight, bias, "gelu", [], "tanh"), F.gelu(y, approximate="tanh")),
                 (op(x, weight, bias, "swish", [], ""), F.silu(y)),
                 (op.binary(x, other, weight, bias, "add"), y + other),
                 (op.binary(x, other, weight, bias, "mul"), y * other)]
        return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in pairs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN_MIN_BYTES = 32 * 2**20  # float32 Linear weights; below this, F.linear's products are faster


def onednn_pays(model: nn.Module) -> bool:
    """Whether oneDNN's products are the faster choice for `model` on this CPU, as `LeanStep` decides
    by default: torch may use oneDNN (`torch.backends.mkldnn.flags`), it runs on two threads or more,
    and the model's float32 Linear weights fill at least ONEDNN_MIN_BYTES (32 MiB).

    Measured on a 2-core CPU: at batch 1 the BLAS behind F.linear runs a matrix-vector product on
    one core, and oneDNN splits it over both, so it streams weights from memory faster (seed 000's
    101 MB model: 6.9 against 8.0 ms per step); but each oneDNN call costs about 30 us more before
    it starts, which a small model, whose weights sit in the CPU's cache, never earns back (the
    4.8M-parameter Shakespeare model: 2.6 against 2.3 ms; its 1M-parameter draft 0.81 against
    0.51). On one thread oneDNN gains nothing at any size."""
    if not torch.backends.mkldnn.enabled or torch.get_num_threads() < 2:
        return False
    size = sum(m.weight.numel() * 4 for m in model.modules() if _fast(m, True))
    return size >= ONEDNN_MIN_BYTES


def _fast(layer: nn.Module, onednn: bool) -> bool:
    """Whether `layer` is a plain Linear whose products go to oneDNN: float32 weights on a CPU."""
    weight = getattr(layer, "weight", None)
    return onednn and type(layer) is nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _linear(layer: nn.Module, onednn: bool = False, activation: str = "none", approximate: str = "",
            matvec: bool = False):
    """A function computing `activation(layer(x))` (activation "none", "gelu" or "swish"): oneDNN's
    kernel when `onednn` and the layer is a float32 Linear, else F.linear with its tensors for a plain
    Linear, else the layer itself (int8, LoRA) followed by the activation; with `matvec`, lm's compiled
    kernel takes the products of a few rows (`_few_rows_first`)."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if _fast(layer, onednn):
        op = torch.ops.mkldnn._linear_pointwise
        rows = lambda x: op(x, weight, bias, activation, [], approximate)
    else:
        product = ((lambda x: F.linear(x, weight, bias)) if type(layer) is nn.Linear
                   else _int8_product(layer) or layer)  # LoRA and the rest: its own forward
        if activation == "gelu":
            rows = lambda x: F.gelu(product(x), approximate=approximate)
        elif activation == "swish":
            rows = lambda x: F.silu(product(x))
        else:
            rows = product
    kernel_activation = "gelu_tanh" if activation == "gelu" and approximate == "tanh" else activation
    return _few_rows_first(layer, rows, kernel_activation) if matvec else rows


MATVEC_MAX_ROWS = cpu_kernels.FEW_ROWS  # products of up to 8 rows go to lm's kernels; more: a matrix product


def _few_rows_first(layer: nn.Module, rows, activation: str = "none", combine: str = "none"):
    """`rows` (a function for any number of rows: of x, or of x and other), except that products of
    up to MATVEC_MAX_ROWS contiguous rows go to lm's compiled kernels (`lm.cpu_kernels`: float32 and,
    for an Int8Linear, int8 weights), with the activation and the combination done as they write.
    `rows` takes the rest: more rows, a weight stored transposed (`for_decoding(model, "columns")`),
    layers that are neither float32 CPU Linears nor CPU Int8Linears."""
    bias = getattr(layer, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return rows
    if _fast(layer, True):
        weight, few = layer.weight, cpu_kernels.product(layer.weight, bias, activation, combine)
    elif int8_kernel_usable(layer):
        weight = layer.weight_int8
        few = cpu_kernels.product(weight, bias, activation, combine, scale=layer.scale)
    else:
        return rows
    most = MATVEC_MAX_ROWS * weight.size(1)
    # checked at every call: `for_decoding(model, "columns")` may transpose the weight in memory later
    if combine == "none":
        return lambda x: few(x) if x.numel() <= most and x.is_contiguous() and weight.is_contiguous() else rows(x)
    return lambda x, other: (few(x, other) if x.numel() <= most and x.is_contiguous() and other.is_contiguous()
                             and weight.is_contiguous() else rows(x, other))


def _int8_product(layer: nn.Module):
    """A function computing `layer(x)` for float32 x as an Int8Linear's forward does on a CPU, without its
    checks: a few rows through lm's int8 kernel where it runs, else torch's fused int8 kernel without
    the reshapes and casts (the bias addition converts the bfloat16 product to float32 as it adds: the
    same floats); None for other layers."""
    if not (type(layer) is Int8Linear and layer.fused and layer.weight_int8.device.type == "cpu"
            and layer.scale.dtype == torch.float32 and layer.scale_bf16.dtype == torch.bfloat16  # a float32 model
            and (layer.bias is None or layer.bias.dtype == torch.float32)):
        return None
    q, scale, bias, n_out = layer.weight_int8, layer.scale_bf16, layer.bias, layer.out_features
    if bias is None:
        many = lambda x: int8_product(x, q, scale, n_out).float()
    else:
        many = lambda x: torch.add(bias, int8_product(x, q, scale, n_out))
    if not int8_kernel_usable(layer):
        return many
    # as Int8Linear.forward: a few contiguous float32 rows through lm's int8 kernel
    few, most = cpu_kernels.product(q, bias, scale=layer.scale), MATVEC_MAX_ROWS * layer.in_features
    return lambda x: few(x) if x.numel() <= most and x.is_contiguous() else many(x)


def _linear_then(layer: nn.Module, onednn: bool, combine: str, matvec: bool = False):
    """A function computing `layer(x) + other` (combine "add") or `layer(x) * other` ("mul") from
    (x, other), the addition or multiplication done by oneDNN's kernel where `_linear` would use it,
    and by lm's compiled kernel for a few rows with `matvec`."""
    if _fast(layer, onednn):
        op, weight, bias = torch.ops.mkldnn._linear_pointwise.binary, layer.weight, layer.bias
        rows = lambda x, other: op(x, other, weight, bias, combine)
    else:
        product = _linear(layer)
        if combine == "add":
            rows = lambda x, other: other + product(x)
        else:
            rows = lambda x, other: product(x) * other
    return _few_rows_first(layer, rows, combine=combine) if matvec else rows


def _norm(norm: nn.Module):
    """A function computing `norm(x)`, functional for LayerNorm and RMSNorm."""
    if type(norm) is LayerNorm or type(norm) is nn.LayerNorm:
        shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)  # what F.layer_norm calls
    if type(norm) is RMSNorm:
        weight, eps = norm.weight, norm.eps
        return lambda x: rms_norm(x, weight, eps)
    return norm


def _feedforward_add(ffn: nn.Module, onednn: bool, matvec: bool = False):
    """A function computing `other + ffn(x)` in eval mode from (x, other), from the layers' functions."""
    if type(ffn) in (MLP, TanhMLP):
        fc = _linear(ffn.fc, onednn, "gelu", ffn.approximate, matvec)
        proj = _linear_then(ffn.proj, onednn, "add", matvec)
        return lambda x, other: proj(fc(x), other)
    if type(ffn) is SwiGLU:
        gate, value = _linear(ffn.w1, onednn, "swish", matvec=matvec), _linear_then(ffn.w2, onednn, "mul", matvec)
        down = _linear_then(ffn.w3, onednn, "add", matvec)
        return lambda x, other: down(value(x, gate(x)), other)  # silu(w1 x) * w2 x, as SwiGLU.forward
    return lambda x, other: other + ffn(x)


def _attend(attn: CausalSelfAttention, kernel: bool):
    """A function (q, keys, values, mask) -> (B, T, H * D): the attention of the new queries over the
    cache's keys and values, as the module computes it (F.scaled_dot_product_attention, or the
    written-out path), or with `kernel` through lm's compiled kernel for float32 on the CPU, which
    applies by itself the one mask a LeanStep's cache builds (causal, after the cached positions)."""
    use_sdpa = attn.use_sdpa

    def as_the_module(q, keys, values, mask):
        B, H, T, D = q.shape
        return attend_over(q, keys, values, mask, use_sdpa).transpose(1, 2).reshape(B, T, H * D)

    if not kernel:
        return as_the_module

    def compiled(q, keys, values, mask):
        if q.dtype is torch.float32 and q.device.type == "cpu" and keys.size(2) <= cpu_kernels.MAX_KEYS:
            return cpu_kernels.attention(q, keys, values)
        return as_the_module(q, keys, values, mask)

    return compiled


def has_hooks(model: nn.Module, backward: bool = False) -> bool:
    """Whether a forward hook (and with `backward`, a backward hook) would run on some module of
    `model`, its own or a global one: calling its functional ops instead would skip it."""
    from torch.nn.modules import module as torch_module

    kinds = ("forward_hooks", "forward_pre_hooks") + (("backward_hooks", "backward_pre_hooks") if backward else ())
    if any(getattr(torch_module, f"_global_{kind}") for kind in kinds):
        return True
    return any(getattr(module, f"_{kind}", None) for module in model.modules() for kind in kinds)


def _defined_by(cls: type, name: str) -> str | None:
    """"module.Class" of the class in `cls`'s MRO that defines method `name` (by name, so that this
    module need not import lm.model, which imports generation, which imports this module)."""
    owner = next((k for k in cls.__mro__ if name in vars(k)), None)
    return None if owner is None else f"{owner.__module__}.{owner.__qualname__}"


NORM_KINDS = {LayerNorm: 0, nn.LayerNorm: 0, RMSNorm: 1}  # lm_decode_step's NORM_LAYER, NORM_RMS
FFN_KINDS = {MLP: 1, TanhMLP: 2, SwiGLU: 3}  # its FFN_GELU, FFN_GELU_TANH, FFN_SWIGLU


def _c_linear(layer: nn.Module) -> list | None:
    """[weight, scale, bias] of `layer` as lm_decode_step takes a Linear (scale None: float32 weights), or None
    for one it does not take: it takes float32 CPU Linears and the Int8Linears lm's int8 kernel computes."""
    bias = getattr(layer, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    if _fast(layer, True):
        return [layer.weight, None, bias]
    if int8_kernel_usable(layer):
        return [layer.weight_int8, layer.scale, bias]
    return None


class StepInC:
    """A whole decoding step of a pre-norm model in one call of lm's C kernel (`lm_decode_step` in
    lm/csrc/decode.c): every block's norms, products, RoPE, KV-cache writes and attention, then the final
    norm and the head, with no return to Python in between. It computes what LeanStep's functions
    compute with the compiled kernels (the same products and attention, in the same order; the norms in C,
    equal to torch's to float32 rounding) and takes about a millisecond less a token on seed 000's model.

    `StepInC.unsupported(model)` says why a model cannot use it (None when it can); a call returns None
    when this call cannot (more than FEW_ROWS rows, a cache too short, a weight moved to another layout
    or dtype since), and LeanStep then runs its functions."""

    def __init__(self, model, kernels: cpu_kernels.Kernels):
        config = model.config
        self.model, self.kernels = model, kernels
        first = model.blocks[0]
        self.norm_kind, self.ffn_kind = NORM_KINDS[type(first.norm1)], FFN_KINDS[type(first.mlp)]
        self.eps = first.norm1.eps
        self.heads = (config.n_head, config.kv_heads, config.head_dim)
        # lm_decode_step's pointer slots: each block's tensors (None: no bias or scale), then its keys' and values'
        # (filled per call), then the final norm's and the head's
        self.order = []
        for block in model.blocks:
            up, value, down = _linears(block.mlp)
            self.order += [block.norm1.weight, getattr(block.norm1, "bias", None), block.norm2.weight,
                           getattr(block.norm2, "bias", None), *_c_linear(block.attn.qkv), *_c_linear(block.attn.proj),
                           *up, *value, *down, None, None]
        self.per_block = len(self.order) // len(model.blocks)
        self.width = self.order[10].size(0)  # the feed-forward width F: the first block's up weight's outputs
        self.order += [model.norm_f.weight, getattr(model.norm_f, "bias", None), *_c_linear(model.lm_head)]
        self.present = [t for t in self.order if t is not None]
        self.dtypes = [t.dtype for t in self.present]
        self.checked: list[int] | None = None  # the addresses last checked
        self.pointers: list[int] = []

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `model`'s steps cannot run in lm_decode_step (LeanStep must take the model, see
        `LeanStep.unsupported`), or None when they can."""
        why = cpu_kernels.unavailable()
        if why is not None:
            return f"lm's CPU kernels are not available: {why}"
        if model.config.norm_position != "pre":
            return "it takes pre-norm blocks only"
        blocks = list(model.blocks)
        norms = [m for b in blocks for m in (b.norm1, b.norm2)] + [model.norm_f]
        if any(type(m) not in NORM_KINDS for m in norms) or len({(type(m) is RMSNorm, m.eps) for m in norms}) != 1:
            return "its norms are not all LayerNorm, or all RMSNorm, with one eps"
        if any(getattr(m, "normalized_shape", (model.config.d_model,)) != (model.config.d_model,) or m.weight is None
               or m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" for m in norms):
            return "a norm has no float32 CPU weight over d_model"
        if len({type(b.mlp) for b in blocks}) != 1 or type(blocks[0].mlp) not in FFN_KINDS:
            return "its feed-forwards are not all GELU, tanh-GELU or SwiGLU MLPs of one kind"
        linears = [m for b in blocks for m in (b.attn.qkv, b.attn.proj, *_feedforward_layers(b.mlp))] + [model.lm_head]
        if any(_c_linear(m) is None for m in linears):
            return "a product is neither a float32 CPU Linear nor an int8 one of lm's kernel (LoRA, say)"
        return None

    def __call__(self, idx: torch.Tensor, cache, n: int) -> torch.Tensor | None:
        """Logits (B, T, V) of idx's (B, T) new tokens after n cached positions, their keys and values
        stored in `cache`; None where this call cannot run in C."""
        B, T = idx.shape
        model, layers, (H, H_kv, D) = self.model, cache.layers, self.heads
        slots = layers[0].slots
        if (B * T > cpu_kernels.FEW_ROWS or n + T > min(slots, cpu_kernels.MAX_KEYS) or cache.cursor.real is not None
                or layers[0].k.size(0) != B):
            return None
        # every tensor's address and layout; the other checks run again only when an address moved (for_decoding's
        # "columns", a cast, another cache)
        weights = [t.data_ptr() for t in self.present]
        caches = [t.data_ptr() for layer in layers for t in (layer.k, layer.v)]
        if not all(t.is_contiguous() for t in self.present):
            return None
        if weights + caches != self.checked:
            if not self._takes(layers, B):
                return None
            self.checked, at = weights + caches, iter(weights)
            self.pointers = [0 if t is None else next(at) for t in self.order]
        pointers = self.pointers[:]
        for i in range(len(layers)):  # the cache's keys and values sit in their blocks' last two slots
            end = (i + 1) * self.per_block
            pointers[end - 2 : end] = caches[2 * i : 2 * i + 2]
        if model.rope is not None:
            cos, sin = model.rope.tables(T, n)  # (T, D) for positions n .. n+T-1
            pointers += (cos.data_ptr(), sin.data_ptr())
        else:
            pointers += (0, 0)
        x = model.embed(idx, n).contiguous()  # a new tensor, overwritten by the step
        if x.dtype is not torch.float32:
            return None
        C, V, F_, R = x.size(-1), model.lm_head.out_features, self.width, B * T
        work = torch.empty(R * (C + (H + 2 * H_kv) * D + H * D + F_), dtype=torch.float32)
        logits = torch.empty(B, T, V, dtype=torch.float32)
        dims = (len(layers), B, T, C, H, H_kv, D, F_, V, n, slots, self.norm_kind, self.ffn_kind)
        self.kernels.step((ctypes.c_long * len(pointers))(*pointers), (ctypes.c_long * 13)(*dims), self.eps,
                          D ** -0.5, x.data_ptr(), work.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits

    def _takes(self, layers, B: int) -> bool:
        """Whether the weights still have their dtypes, on the CPU (their layout is checked at every call), and the
        cache layers are plain growing caches of float32 keys and values for this batch, one a block."""
        H, H_kv, D = self.heads
        if len(layers) * self.per_block + 5 != len(self.order) or not all(
                t.dtype is dtype and t.is_cpu for t, dtype in zip(self.present, self.dtypes)):
            return False
        slots = layers[0].slots
        return all(type(layer) is DynamicCache and layer.slots == slots and layer.k.dtype is torch.float32
                   and layer.k.shape == (B, H_kv, slots, D) and layer.v.shape == layer.k.shape
                   and layer.v.dtype is torch.float32 and layer.k.is_contiguous() and layer.v.is_contiguous()
                   for layer in layers)


def _feedforward_layers(ffn: nn.Module) -> list[nn.Module]:
    return [ffn.w1, ffn.w2, ffn.w3] if type(ffn) is SwiGLU else [ffn.fc, ffn.proj]


def _linears(ffn: nn.Module) -> tuple[list, list, list]:
    """The feed-forward's (up, value, down) Linears as lm_decode_step takes them; value all None but for SwiGLU."""
    linears = [_c_linear(layer) for layer in _feedforward_layers(ffn)]
    return tuple(linears) if len(linears) == 3 else (linears[0], [None, None, None], linears[1])


class LeanStep:
    """`step(idx, cache)` == `model(idx, cache=cache, all_logits=True)[0]` for idx (B, T), in eval mode, with a
    `KVCache` of `DynamicCache` layers that holds no padding: bit for bit with `onednn=False,
    matvec=False`, to float32 rounding with oneDNN's or lm's compiled products; see the module docstring.
    `in_c` is the `StepInC` that takes whole steps where it can (None where the model or `matvec` rules it out)."""

    def __init__(self, model, onednn: bool | None = None, matvec: bool | None = None):
        """`onednn`: float32 products on a CPU through oneDNN's kernel where torch has it (see
        `onednn_usable`); None: where that is faster (`onednn_pays`: two threads or more and at least
        32 MiB of float32 Linear weights, unless `torch.backends.mkldnn.flags(enabled=False)` is on).
        `matvec`: products of up to MATVEC_MAX_ROWS rows, and the attention, through lm's compiled
        kernels (`lm.cpu_kernels`) instead; None: wherever they are available. `onednn=False, matvec=False` keep
        F.linear, and the modules' floats bit for bit."""
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanStep cannot run this model: {reason}.")
        self.model = model
        wanted = onednn if onednn is not None else onednn_pays(model)
        self.onednn = bool(wanted) and onednn_usable()
        self.matvec = (matvec is None or bool(matvec)) and cpu_kernels.unavailable() is None
        # a whole step in one C call where the model allows it (float32 or int8 products, pre-norm, ...)
        in_c = self.matvec and StepInC.unsupported(model) is None
        self.in_c = StepInC(model, cpu_kernels._load()[0]) if in_c else None
        fast, one_row = self.onednn, self.matvec
        config = model.config
        self.pre_norm = config.norm_position == "pre"
        self.layers = []
        for block in model.blocks:
            attn = block.attn
            self.layers.append((_norm(block.norm1), _linear(attn.qkv, fast, matvec=one_row),
                                _linear_then(attn.proj, fast, "add", one_row), _norm(block.norm2),
                                _feedforward_add(block.mlp, fast, one_row), _attend(attn, one_row)))
        self.heads = (config.n_head, config.kv_heads, config.head_dim)
        self.norm_f = _norm(model.norm_f) if self.pre_norm else None
        self.head = _linear(model.lm_head, fast, matvec=one_row)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `model` cannot use a LeanStep, or None when it can."""
        if any(_defined_by(type(model), name) != "lm.model.GPT" for name in ("forward", "_residual_stream", "embed")):
            return f"{type(model).__name__} computes its forward its own way"
        if has_hooks(model):
            return "a module of the model has forward hooks, which a lean step would skip"
        for block in model.blocks:
            if _defined_by(type(block), "forward") != "lm.model.Block":
                return f"block {type(block).__name__} computes its forward its own way"
            if type(block.attn) is not CausalSelfAttention:
                return f"attention {type(block.attn).__name__} has its own cache or mask"
            if isinstance(block.mlp, MoE):
                return "a mixture of experts records its load-balancing loss at every call"
        return None

    @staticmethod
    def usable(cache, T: int) -> bool:
        """Whether a step of T new tokens with `cache` can run lean: a growing cache of plain keys
        and values, no padding."""
        return (T >= 1 and not cache.static and cache.cursor.real is None
                and all(type(layer) is DynamicCache for layer in cache.layers))

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, cache, last: int | None = None) -> torch.Tensor:
        """Logits (B, T, V) after each of idx's (B, T) tokens, which are stored in `cache`: one token
        when decoding, a few when a speculative step checks a draft's guesses. With T > 1 the queries
        see the keys through the mask the cache builds for the modules (causal, after the cached ones).
        `last`: only the last `last` positions go through the head, (B, last, V); a long prompt's
        forward then never computes scores nobody reads (`last=1` is `model(idx, cache=cache)`)."""
        model = self.model
        if model.training:
            raise RuntimeError("LeanStep runs the model in eval mode (no dropout); call model.eval() first.")
        B, T = idx.shape
        n = cache.cursor.length  # layer.update refuses tokens that do not fit, before anything is written
        cache.cursor.masks = {}
        if self.in_c is not None and (logits := self.in_c(idx, cache, n)) is not None:
            cache.cursor.length = n + T
            model.aux_loss = None
            return logits if last is None or last >= T else logits[:, T - last :]
        x = model.embed(idx, n)
        H, H_kv, D = self.heads
        sizes = [H * D, H_kv * D, H_kv * D]
        rope = model.rope
        for (norm1, qkv, proj_add, norm2, ffn_add, attend), layer in zip(self.layers, cache.layers):
            h = norm1(x) if self.pre_norm else x
            q, k, v = qkv(h).split_with_sizes(sizes, dim=2)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, H_kv, D).transpose(1, 2)
            v = v.view(B, T, H_kv, D).transpose(1, 2)
            if rope is not None:
                q, k = rope(q, k, offset=n)
            keys, values, mask = layer.update(k, v)  # mask None for one new token: it sees every key
            y = attend(q, keys, values, mask)  # (B, T, H * D)
            if self.pre_norm:
                x = proj_add(y, x)  # x + proj(y)
                x = ffn_add(norm2(x), x)  # x + ffn(norm2(x))
            else:
                x = norm1(proj_add(y, x))
                x = norm2(ffn_add(x, x))
        cache.cursor.length = n + T
        model.aux_loss = None
        if last is not None and last < T:
            x = x[:, T - last :]
        return self.head(self.norm_f(x) if self.pre_norm else x)


__all__ = ["ONEDNN_MIN_BYTES", "LeanStep", "has_hooks", "onednn_pays", "onednn_usable"]
