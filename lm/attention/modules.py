"""The attention layers: projections, heads, and which path computes the attention.

Every variant is built as `cls(config)` and has one `forward`:

    y = attn(x)                                    # x (B, T, C) -> y (B, T, C), causal
    y = attn(x, rope, attention_mask)              # RoPE on q and k; mask (B, T), True = real token
    y = attn(x_new, rope, cache=layer_cache)       # x holds only new positions (see lm.kv_cache)
    w = attn.weights(x)                            # (B, H, T, T) attention weights, for plots

A variant says two things: which keys a query may see beyond causality (`allowed`, a pattern on
positions from `lm.attention.masks`, None for plain causal attention) and, optionally, a cheaper
way to compute attention over a whole sequence (`attend`). Where keys live during generation is
the cache's business: it stores them, and returns them with the mask that `allowed` asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels
from ..config import ModelConfig
from ..registry import ATTENTION
from .kernels import (
    attend_over, c_kernel_takes, causal_linear_attention, elu_feature_map, linear_attention_weights, local_block_attention,
    masked_attention, repeat_kv, sdpa,
)
from .masks import block_sparse, causal, causal_mask, grid, sliding_window, with_padding


@ATTENTION.register("sdpa")
@ATTENTION.register("manual")
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused Q/K/V projection, H query heads, H_kv key/value heads,
    an output projection.

    All variants share one fused projection `qkv` (C -> (H + 2 H_kv) D, in the order q, k, v) and
    one output projection `proj` (C -> C). With `n_kv_heads` H_kv < H several query heads share one
    key/value head (grouped-query attention; H_kv = 1 is multi-query attention).

    attention="sdpa" runs `F.scaled_dot_product_attention` (a fused kernel); "manual" runs
    `masked_attention`, written out. Both give the same outputs.
    """

    cache_kind = "keys"  # what a KV cache keeps for this layer: every key ("keys"), the last
    #                      `window` keys ("window"), or a running sum ("state"); see lm.kv_cache

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H, H_kv = config.d_model, config.n_head, config.kv_heads
        self.n_head, self.n_kv_heads, self.head_dim = H, H_kv, config.head_dim
        self.dropout = config.dropout
        self.use_sdpa = config.attention != "manual"
        self.qkv = nn.Linear(C, (H + 2 * H_kv) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        C, qkv_out = config.d_model, (config.n_head + 2 * config.kv_heads) * config.head_dim
        return C * qkv_out + C * C + ((qkv_out + C) if config.bias else 0)

    def forward(self, x: torch.Tensor, rope=None, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        With a layer `cache`, x holds only the positions after those already cached: their keys
        and values are stored and the queries attend over everything the cache returns."""
        if rope is None and attention_mask is None and cache is None and self._attention_in_c(x):
            return self._forward_in_c(x)  # float32 training on a CPU: the same, faster (chapter 6)
        B, T, C = x.shape
        q, k, v = self.project(x)
        if rope is not None:  # before K/V heads are repeated: fewer heads to rotate
            q, k = rope(q, k, offset=0 if cache is None else cache.offset)
        if cache is None:
            y = self.attend(q, k, v, attention_mask)
        else:
            y = self.attend_cached(q, k, v, cache)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        y = self.proj(y)
        return self.resid_drop(y) if self.training else y  # eval: skip the no-op call

    def _attention_in_c(self, x: torch.Tensor) -> bool:
        """Whether this layer's causal attention runs from the fused projection's output in lm's C kernel
        (`lm.cpu_kernels.causal_attention_qkv`): float32 training on a CPU where the kernel runs, as
        `lm.attention.sdpa` would take it for q, k, v (plain causal attention, as many K/V heads as query
        heads, no dropout, `c_kernel_takes` the heads). The kernel adds qkv's bias itself
        and its backward writes the projection's output gradient whole: no bias broadcast into the
        projection's output, no joining of dq, dk and dv. Not for variants (their own `allowed`, `attend`
        or `project`), a qkv that is not a plain nn.Linear (LoRA's, int8's) or has hooks, autocast, or
        torch.compile."""
        cls = type(self)
        B, T, _ = x.shape
        return (self.use_sdpa and self.allowed is None and self.n_kv_heads == self.n_head
                and cls.attend is CausalSelfAttention.attend and cls.project is CausalSelfAttention.project
                and (self.dropout == 0.0 or not self.training) and cpu_kernels.float32_training_through(x, self.qkv)
                and c_kernel_takes(B, self.n_head, T, self.head_dim))

    def _forward_in_c(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` through `lm.cpu_kernels.causal_attention_qkv`, where `_attention_in_c(x)` says so."""
        y = self.proj(self._heads_in_c(x))
        return self.resid_drop(y) if self.training else y

    def _heads_in_c(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs side by side (B, T, C), before the output projection, from lm's C kernel"""
        return cpu_kernels.causal_attention_qkv(F.linear(x, self.qkv.weight), self.qkv.bias, self.n_head)

    def before_bias(self, x: torch.Tensor, rope=None, attention_mask=None, cache=None):
        """(`forward`'s output without the output projection's bias, that bias) where `forward` runs in lm's C
        kernel and adds nothing after the projection (no dropout while training), so that `lm.model.Block` adds
        the bias with the residual in one pass; None otherwise (also for subclasses with a `forward` of their own)."""
        if (rope is None and attention_mask is None and cache is None
                and type(self).forward is CausalSelfAttention.forward
                and (self.resid_drop.p == 0.0 or not self.training)
                and cpu_kernels.float32_training_through(x, self.proj) and self.proj.bias is not None
                and cpu_kernels.rows_unavailable(self.proj.out_features) is None and self._attention_in_c(x)):
            return F.linear(self._heads_in_c(x), self.proj.weight), self.proj.bias
        return None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, H_kv, T, D)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, H_kv, D).transpose(1, 2)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        return q, k, v

    # Which keys a query may see beyond causality: None (every earlier key), or in a variant a
    # method allowed(query_pos, key_pos) -> bool tensor, a pattern from lm.attention.masks.
    allowed = None

    def mask(self, T: int, device=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The boolean mask over a whole sequence: causal, this variant's pattern, and padding
        ((T, T), or (B, 1, T, T) with a padding mask)."""
        query_pos, key_pos = grid(T, device)
        pattern = None if self.allowed is None else self.allowed(query_pos, key_pos)
        keep = causal_mask(T, device) if pattern is None else pattern & causal(query_pos, key_pos)
        return with_padding(keep, attention_mask)

    def attend(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """Attention over a whole sequence: q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D)."""
        dropout_p = self.dropout if self.training else 0.0
        T = q.size(-2)
        if self.use_sdpa:
            plain = attention_mask is None and self.allowed is None  # causal: the kernel's own mask
            return sdpa(q, k, v, None if plain else self.mask(T, q.device, attention_mask), dropout_p)
        n_rep = self.n_head // self.n_kv_heads
        mask = self.mask(T, q.device, attention_mask)
        return masked_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p)[0]

    def attend_cached(self, q, k, v, cache) -> torch.Tensor:
        """New queries over the cached keys: the cache stores k and v, and returns every key the
        queries may see with the mask (causality, this variant's pattern, padding)."""
        keys, values, mask = cache.update(k, v, self.allowed)
        return attend_over(q, keys, values, mask, self.use_sdpa)

    def weights(self, x: torch.Tensor, rope=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights (B, H, T, T) of x (B, T, C), written out; every row sums to 1."""
        q, k, v = self.project(x)
        if rope is not None:
            q, k = rope(q, k)
        n_rep = self.n_head // self.n_kv_heads
        mask = self.mask(q.size(-2), q.device, attention_mask)
        return masked_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask)[1]


@ATTENTION.register("sliding_window")
class SlidingWindowAttention(CausalSelfAttention):
    """Local attention: query t sees keys t-window+1 .. t, so information travels at most `window`
    positions per layer (n_layer * window in all), as in Longformer and Mistral.

    When the window is shorter than T the output is computed block by block
    (`local_block_attention`): queries in blocks of min(window, 64), each scoring only the keys that
    can fall in its window, O(T window) time and memory. `use_blocks = False` sends it through the
    masked path instead (same result, O(T^2)). A KV cache keeps only the last `window` keys.
    """

    cache_kind = "window"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.window = config.window
        self.use_blocks = True

    def allowed(self, query_pos, key_pos):
        return sliding_window(query_pos, key_pos, self.window)

    def attend(self, q, k, v, attention_mask=None):
        T = q.size(-2)
        if not self.use_blocks or self.window >= T or _is_document_mask(attention_mask):
            return super().attend(q, k, v, attention_mask)
        block = min(self.window, 64)
        n_prev = -(-(self.window - 1) // block)  # earlier blocks that the window can reach
        n_rep = self.n_head // self.n_kv_heads
        dropout_p = self.dropout if self.training else 0.0
        return local_block_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), block, n_prev, window=self.window,
                                     attention_mask=attention_mask, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return f"window={self.window}"


@ATTENTION.register("block_sparse")
class BlockSparseAttention(CausalSelfAttention):
    """Block-sparse attention (experimental; in the spirit of Child et al. 2019, "fixed" pattern).

    Positions are grouped in blocks of `sparse_block`. Query block i sees its own block, the
    `sparse_local` blocks before it, and every earlier "summary" block j with
    j % sparse_stride == sparse_stride - 1 (sparse_stride=0: none), through which far-away
    information reaches every later block in one layer. sparse_pattern="full" allows all causal
    blocks, which is exactly full causal attention.

    Two computations of the same thing: the `block_sparse` mask through SDPA / the written-out path
    (the reference; a mask saves no compute), and the real one, `local_block_attention`, which
    scores only the allowed blocks, so its cost follows the layout: O(T (local + 1) block +
    T^2 / stride) instead of O(T^2). `use_blocks = False` forces the mask.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.block, self.local = config.sparse_block, config.sparse_local
        self.stride, self.pattern = config.sparse_stride, config.sparse_pattern
        self.use_blocks = True

    def allowed(self, query_pos, key_pos):
        if self.pattern == "full":
            return None
        return block_sparse(query_pos, key_pos, self.block, self.local, self.stride, self.pattern)

    def attend(self, q, k, v, attention_mask=None):
        if not self.use_blocks or self.pattern == "full" or _is_document_mask(attention_mask):
            return super().attend(q, k, v, attention_mask)
        n_rep = self.n_head // self.n_kv_heads
        dropout_p = self.dropout if self.training else 0.0
        return local_block_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), self.block, self.local,
                                     summary_stride=self.stride, attention_mask=attention_mask, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return f"block={self.block}, local={self.local}, stride={self.stride}, pattern={self.pattern!r}"


@ATTENTION.register("linear")
class LinearAttention(CausalSelfAttention):
    """Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    exp(q . k) is replaced by phi(q) . phi(k) with phi = elu + 1; the sums over earlier keys then
    factor into a running D x D state, so time grows linearly in T and no T x T matrix exists
    (`causal_linear_attention`). Same `qkv`/`proj` parameters as softmax attention; GQA works the
    same way (K/V heads repeated). Differences: no 1/sqrt(D) scaling (phi's normaliser absorbs it)
    and no dropout on attention weights, since there are none (residual dropout still applies).
    `weights` returns the weights it implies (`linear_attention_weights`), computed the O(T^2) way.
    A KV cache keeps only the running state.

    With RoPE, q and k are rotated before phi, like every other variant. Because phi acts on each
    channel, phi(R_t q) . phi(R_s k) is NOT a function of t - s alone: the positions stay
    absolute-ish, and left padding shifts the result (RoFormer, section 3.3, rotates phi(q), phi(k)
    in the numerator only instead; not done here).
    """

    cache_kind = "state"
    chunk = 64

    def attend(self, q, k, v, attention_mask=None):
        if _is_document_mask(attention_mask):
            raise ValueError("linear attention takes a (B, T) padding mask only: it keeps no T x T matrix to "
                             "apply a (B, T, T) document mask to; fine-tune it without packing.")
        n_rep = self.n_head // self.n_kv_heads
        return causal_linear_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attention_mask, chunk=self.chunk)

    def attend_cached(self, q, k, v, cache, eps: float = 1e-6):
        """Continue from the running state: out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)."""
        n_rep = self.n_head // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        phi_q = elu_feature_map(q)
        S, z, phi_k = cache.update(elu_feature_map(k), v)  # the state before these keys; padded keys zeroed
        scores = (phi_q @ phi_k.transpose(-2, -1)) * causal_mask(q.size(-2), q.device)  # within the new tokens
        num = scores @ v + phi_q @ S
        den = scores.sum(-1) + (phi_q @ z.unsqueeze(-1)).squeeze(-1)
        return num / (den.unsqueeze(-1) + eps)

    def weights(self, x, rope=None, attention_mask=None):
        q, k, _ = self.project(x)
        if rope is not None:
            q, k = rope(q, k)
        return linear_attention_weights(q, repeat_kv(k, self.n_head // self.n_kv_heads), attention_mask)


__all__ = ["BlockSparseAttention", "CausalSelfAttention", "LinearAttention", "SlidingWindowAttention"]


def _is_document_mask(attention_mask) -> bool:
    """A (B, T, T) mask of packed documents, which the block-wise kernels do not take."""
    return attention_mask is not None and attention_mask.dim() == 3
