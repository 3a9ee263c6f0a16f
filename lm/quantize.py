"""Faster inference: weights laid out for decoding, and weight-only int8 quantization.

Decoding one token at batch 1 reads every weight once and does little arithmetic with it, so its
speed is set by how many bytes the weights take. Storing each Linear weight as int8 with one float
scale per output row cuts those bytes by 4 (from fp32):

    scale[o] = max_i |W[o, i]| / 127        q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]
    y = x @ (scale * q)^T + b                 (the error of each weight is at most scale[o] / 2)

Activations stay in floating point ("weight-only"). On a CPU, a few float32 rows (up to
`cpu_kernels.FEW_ROWS`, 8: a decoding step, a speculative check) go to lm's own int8 kernel
(`cpu_kernels.product` with the scale, `lm_matvec_int8` in lm/csrc/decode.c), which widens the int8 weights
to float32 as it streams them and sums in float32, in the fixed order LeanStep relies on; more rows go
to torch's fused int8 kernel (`_weight_int8pack_mm`), in bfloat16 straight from the int8 weights;
elsewhere the weights are dequantized on the fly. `quantize_int8(model)` swaps every Linear except a head
tied to the embedding (the embedding is a lookup, not a product), in place, for inference only.

`for_decoding(model)` keeps float weights but stores each Linear's weight in the order the CPU's
decoding products read fastest: row by row, as nn.Linear stores it, for lm's compiled kernel
(`lm.cpu_kernels`, which `generate`'s one-token steps use wherever it runs), and otherwise transposed
in memory, (in, out) contiguous, the order in which the BLAS behind F.linear streams x @ W^T fastest
at batch 1 (bench/cpu_decode.py measures it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns q (out, in) int8 and scale (out,) float32 with W ≈ scale[:, None] * q."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_product(x: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    """x @ (scale * q)^T in bfloat16, shaped (..., out_features), through torch's fused int8 CPU kernel
    (`_weight_int8pack_mm`): x is cast to bfloat16 and flattened to the kernel's rows."""
    flat = x.reshape(-1, weight_int8.size(1)).to(torch.bfloat16)
    return torch.ops.aten._weight_int8pack_mm(flat, weight_int8, scale_bf16).view(*x.shape[:-1], out_features)


def int8_kernel_usable(layer: nn.Module) -> bool:
    """Whether lm's compiled int8 kernel (`lm.cpu_kernels.product` with a scale) can compute `layer`'s products:
    an Int8Linear on the CPU with its float32 scales (and bias), where the kernels are available."""
    if not (type(layer) is Int8Linear and layer.weight_int8.device.type == "cpu" and layer.weight_int8.is_contiguous()
            and layer.scale.dtype == torch.float32 and layer.scale.is_contiguous()
            and (layer.bias is None or (layer.bias.dtype == torch.float32 and layer.bias.is_contiguous()))):
        return False
    return cpu_kernels.unavailable() is None


def _fused_kernel_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with a float scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fused = _fused_kernel_available(q.device)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few = x.numel() <= cpu_kernels.FEW_ROWS * self.in_features and x.is_contiguous()
        if few and x.dtype == torch.float32 and x.device.type == "cpu" and int8_kernel_usable(self):
            # a few rows (a decoding step): lm's int8 kernel, in float32
            return cpu_kernels.product(self.weight_int8, self.bias, scale=self.scale)(x)
        if self.fused and x.device.type == "cpu":
            # The kernel wants scales in its input's dtype; model.to(torch.float16) casts this buffer
            # too, so convert back (free when it is still bfloat16).
            y = int8_product(x, self.weight_int8, self.scale_bf16.to(torch.bfloat16), self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@torch.no_grad()
def for_decoding(model: nn.Module, layout: str | None = None) -> nn.Module:
    """Store every Linear weight in the memory order the CPU's decoding products read fastest, in
    place, and return the model.

    layout "columns": each weight transposed in memory, its strides those of a contiguous (in, out)
    matrix, so that `F.linear` computes x @ W^T from a matrix the CPU's BLAS streams in the order it
    reads fastest at batch 1. "rows": the usual contiguous (out, in), which lm's compiled kernel
    (`lm.cpu_kernels`) streams row by row. None: "rows" where that kernel runs, else "columns". The
    weight keeps its shape (out, in), its values and its Parameter; only its strides change. Training,
    saving and loading work as before. `generate` does this on a CPU; doing it twice changes nothing."""
    if layout is None:
        layout = "rows" if cpu_kernels.unavailable() is None else "columns"
    if layout not in ("rows", "columns"):
        raise ValueError(f"for_decoding: layout {layout!r}; choose 'rows', 'columns' or None (the faster here)")
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dim() == 2:
            weight = module.weight.data
            if layout == "columns" and weight.is_contiguous():
                module.weight.data = weight.t().contiguous().t()
            elif layout == "rows" and not weight.is_contiguous():
                module.weight.data = weight.contiguous()
    return model


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's Linear layers by Int8Linear, in place, and return it (in eval mode).

    A head whose weight is tied to the token embedding stays as it is. The result is for inference:
    it cannot be trained, and checkpoints should be saved from the float model."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child.weight) not in tied:
                setattr(parent, name, Int8Linear(child))
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: every tensor of its state dict, that is its parameters
    and persistent buffers (Int8Linear's int8 weight, both copies of its scales and its bias), shared
    tensors once. Derived tables (RoPE's cos and sin, sinusoidal positions) are non-persistent buffers
    and not counted."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():  # keep_vars: the tensors themselves, so ids are stable
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
