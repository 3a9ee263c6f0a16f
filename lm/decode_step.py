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

with exactly the operations the modules run, in the same order, so the logits are the same
floats (tests/test_decode_step.py checks them bit for bit against `model(idx, cache=cache)`).

Only what it knows is taken apart: LayerNorm and RMSNorm, plain `nn.Linear`, the GELU, tanh-GELU
and SwiGLU feed-forwards, `CausalSelfAttention` with a `DynamicCache`. Anything else (int8 or
LoRA layers, other norms) is called as its module, which gives the same result more slowly.
`LeanStep.supports(model)` says whether a model can use it at all (no hooks, no MoE, a plain
causal attention); generation uses it on its one-token steps whenever it can, and falls back to
`model(idx, cache=cache)` when the cache holds padding (batched prompts) or is static (CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention.kernels import attend_over
from .attention.modules import CausalSelfAttention
from .feedforward import MLP, MoE, SwiGLU, TanhMLP
from .kv_cache import DynamicCache
from .norms import LayerNorm, RMSNorm, rms_norm


def _linear(layer: nn.Module):
    """A function computing `layer(x)`: F.linear with its tensors for a plain Linear."""
    if type(layer) is not nn.Linear:
        return layer  # an int8 or LoRA layer: its own forward
    weight, bias = layer.weight, layer.bias
    return lambda x: F.linear(x, weight, bias)


def _norm(norm: nn.Module):
    """A function computing `norm(x)`, functional for LayerNorm and RMSNorm."""
    if type(norm) is LayerNorm or type(norm) is nn.LayerNorm:
        shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)  # what F.layer_norm calls
    if type(norm) is RMSNorm:
        weight, eps = norm.weight, norm.eps
        return lambda x: rms_norm(x, weight, eps)
    return norm


def _feedforward(ffn: nn.Module):
    """A function computing `ffn(x)` in eval mode, from the layers' functions."""
    if type(ffn) in (MLP, TanhMLP):
        fc, proj, approximate = _linear(ffn.fc), _linear(ffn.proj), ffn.approximate
        return lambda x: proj(F.gelu(fc(x), approximate=approximate))
    if type(ffn) is SwiGLU:
        w1, w2, w3 = _linear(ffn.w1), _linear(ffn.w2), _linear(ffn.w3)
        return lambda x: w3(F.silu(w1(x)) * w2(x))
    return ffn


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


class LeanStep:
    """`step(idx, cache)` == `model(idx, cache=cache)[0]` for idx (B, 1), in eval mode, with a
    `KVCache` of `DynamicCache` layers that holds no padding; see the module docstring."""

    def __init__(self, model):
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanStep cannot run this model: {reason}.")
        self.model = model
        config = model.config
        self.pre_norm = config.norm_position == "pre"
        self.layers = []
        for block in model.blocks:
            attn = block.attn
            self.layers.append((_norm(block.norm1), _linear(attn.qkv), _linear(attn.proj), _norm(block.norm2),
                                _feedforward(block.mlp), attn.use_sdpa))
        self.heads = (config.n_head, config.kv_heads, config.head_dim)
        self.norm_f = _norm(model.norm_f) if self.pre_norm else None
        self.head = _linear(model.lm_head)

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
        """Whether a step of T new tokens with `cache` can run lean: one token, a growing cache of
        plain keys and values, no padding."""
        return (T == 1 and not cache.static and cache.cursor.real is None
                and all(type(layer) is DynamicCache for layer in cache.layers))

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, V) of the next token after idx (B, 1), which is stored in `cache`."""
        model = self.model
        if model.training:
            raise RuntimeError("LeanStep runs the model in eval mode (no dropout); call model.eval() first.")
        B = idx.size(0)
        n = cache.cursor.length
        if n + 1 > cache.max_len:
            raise RuntimeError(f"the KV cache holds {cache.max_len} positions and all are filled; reset it or "
                               f"build it with a larger max_len.")
        cache.cursor.masks = {}
        x = model.embed(idx, n)
        H, H_kv, D = self.heads
        sizes = [H * D, H_kv * D, H_kv * D]
        rope = model.rope
        for (norm1, qkv, proj, norm2, ffn, use_sdpa), layer in zip(self.layers, cache.layers):
            h = norm1(x) if self.pre_norm else x
            q, k, v = qkv(h).split_with_sizes(sizes, dim=2)
            q = q.view(B, 1, H, D).transpose(1, 2)
            k = k.view(B, 1, H_kv, D).transpose(1, 2)
            v = v.view(B, 1, H_kv, D).transpose(1, 2)
            if rope is not None:
                q, k = rope(q, k, offset=n)
            layer.k.narrow(2, n, 1).copy_(k)  # narrow/copy_: what k[:, :, n:n+1] = ... does, without parsing the index
            layer.v.narrow(2, n, 1).copy_(v)
            y = attend_over(q, layer.k.narrow(2, 0, n + 1), layer.v.narrow(2, 0, n + 1), None, use_sdpa)
            y = proj(y.transpose(1, 2).contiguous().view(B, 1, H * D))
            if self.pre_norm:
                x = x + y
                x = x + ffn(norm2(x))
            else:
                x = norm1(x + y)
                x = norm2(x + ffn(x))
        cache.cursor.length = n + 1
        model.aux_loss = None
        return self.head(self.norm_f(x) if self.pre_norm else x)


__all__ = ["LeanStep", "has_hooks"]
