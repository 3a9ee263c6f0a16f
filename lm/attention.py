"""Causal self-attention and its variants, chosen by name with `ModelConfig(attention=...)`.

    name             each query at position t sees                     cost per layer (time, memory)
    sdpa / manual    every key s <= t                                  O(T^2 D), O(T^2) (sdpa: less)
    sliding_window   keys t-window+1 .. t                              O(T window D)
    block_sparse     its own block, `sparse_local` earlier blocks and  O(T (T/stride + local block) D)
                     every "summary" block (index % stride == stride-1)
    linear           all keys s <= t, through a kernel feature map     O(T D^2), no T x T matrix

Every variant is an `nn.Module` built as `cls(config)` with the same call:

    y = attn(x)                                          # x (B, T, C) -> y (B, T, C)
    y = attn(x, rope=rope, attention_mask=mask)          # RoPE on q and k; mask (B, T), True = real token
    y, weights = attn(x, return_weights=True)            # weights (B, H, T, T), rows sum to 1

All share one fused projection `qkv` (C -> (H + 2 H_kv) D, in the order q, k, v) and one output
projection `proj` (C -> C). With `n_kv_heads` H_kv < H, several query heads share one key/value
head: grouped-query attention (GQA); H_kv = 1 is multi-query attention (MQA). Query head h uses
key/value head h // (H / H_kv), the `repeat_interleave` order of Hugging Face's `repeat_kv` and of
`scaled_dot_product_attention(enable_gqa=True)`.

Padding. `attention_mask` (B, T) marks real tokens True and padding False. Padded keys get zero
weight. The rows of padded queries are finite but meaningless (each padded query sees at least
itself). Pad on the LEFT for batched generation: causal attention then needs the mask, and with
RoPE (relative) the real tokens' outputs equal an unpadded run exactly. Right padding needs no mask
at all in a causal model (padding comes after every real token). Absolute positions (learned,
sinusoidal) shift under left padding; `block_sparse` blocks are laid out on absolute positions
too, so it is exact under left padding only for pads that are a multiple of
sparse_block * sparse_stride.

The math lives in functions (`masked_attention`, `local_block_attention`,
`causal_linear_attention`, the mask builders); the modules hold the projections and choose a path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .positions import table_rows
from .registry import ATTENTION

if TYPE_CHECKING:  # only for type hints: config.py may import this package's registries
    from .config import ModelConfig
    from .positions import RotaryEmbedding


# ---- masks -------------------------------------------------------------------------------------
def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean mask, True where a query may look at a key (key position <= query position)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def sliding_window_mask(T: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean mask: query t sees keys t-window+1 .. t (window keys, itself included)."""
    t = torch.arange(T, device=device)
    distance = t[:, None] - t[None, :]  # query position - key position
    return (distance >= 0) & (distance < window)


def block_sparse_layout(
    n_blocks: int, local: int, stride: int, pattern: str = "local_strided", device: torch.device | None = None
) -> torch.Tensor:
    """(n_blocks, n_blocks) boolean block layout, True where query block i may look at key block j.

    "local_strided": j in i-local .. i, or j <= i a summary block (j % stride == stride-1; none when
    stride == 0). "full": every j <= i (then the token mask is plain causal attention).
    """
    i = torch.arange(n_blocks, device=device)[:, None]
    j = torch.arange(n_blocks, device=device)[None, :]
    causal = j <= i
    if pattern == "full":
        return causal
    allowed = causal & (i - j <= local)
    if stride > 0:
        allowed |= causal & (j % stride == stride - 1)
    return allowed


def block_sparse_mask(
    T: int, block: int, local: int, stride: int, pattern: str = "local_strided", device: torch.device | None = None
) -> torch.Tensor:
    """(T, T) token mask of `block_sparse_layout`: blocks of `block` positions, causal inside."""
    n_blocks = -(-T // block)
    layout = block_sparse_layout(n_blocks, local, stride, pattern, device)
    block_of = torch.arange(T, device=device) // block
    return layout[block_of][:, block_of] & causal_mask(T, device)


def with_padding(mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Combine a (T, T) layout with a (B, T) padding mask (True = real) into (B, 1, T, T).

    Padded keys are hidden. Every query keeps its own position, so a padded query whose keys are
    all padding still has one key and its softmax row stays finite instead of NaN; for a real
    query its own position is already allowed, so nothing changes there.
    """
    if attention_mask is None:
        return mask
    T = mask.size(-1)
    real_key = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    itself = torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask & (real_key | itself)


# ---- softmax attention -------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head repeated for its n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, causal when `mask` is None; k, v may have fewer heads (GQA).

    Fewer K/V heads go to the kernel as they are (`enable_gqa`, no copy) where its fast kernel
    takes them: on CPU, and on CUDA in half precision without a mask (flash attention). Elsewhere on
    CUDA (float32, or a mask) `enable_gqa` would fall back to the O(T^2)-memory math kernel, so the
    heads are repeated and the memory-efficient kernel runs instead. Measured: bench/attention_cost.py.
    """
    n_rep = q.size(1) // k.size(1)
    native_gqa = q.device.type == "cpu" or (mask is None and q.dtype in (torch.float16, torch.bfloat16))
    if n_rep > 1 and not native_gqa:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                          enable_gqa=k.size(1) != q.size(1))


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out step by step, under any boolean mask (True = may attend).

    q, k, v: (B, H, T, D); mask broadcastable to (B, H, T, T). Returns the output (B, H, T, D) and
    the weights (B, H, T, T). Every row of the mask needs at least one True.
    """
    D = q.size(-1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def manual_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention written out: q, k, v (B, H, T, D) -> output (B, H, T, D), weights (B, H, T, T)."""
    return masked_attention(q, k, v, causal_mask(q.size(-2), q.device), dropout_p)


def local_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    n_prev: int,
    window: int | None = None,
    summary_stride: int = 0,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention that computes only nearby blocks (and optional summary blocks) of keys.

    q, k, v: (B, H, T, D) -> (B, H, T, D). The T positions are cut into blocks of `block`. Query
    block i scores the keys of blocks i-n_prev .. i (masked to key <= query and, with `window`, to
    query - key < window) and, with summary_stride > 0, the keys of every earlier summary block
    j < i - n_prev with j % summary_stride == summary_stride - 1. Nothing else is computed, so the
    cost is O(T (n_prev + 1) block D) plus O(T^2 D / summary_stride) for the summary blocks, against
    O(T^2 D) for a mask over the full score matrix. One softmax runs over both sets of keys, so the
    result equals `masked_attention` under `sliding_window_mask` / `block_sparse_mask`.
    """
    B, H, T, D = q.shape
    n = -(-T // block)  # number of blocks
    pad = n * block - T
    span = (n_prev + 1) * block  # local keys per query block
    device = q.device
    real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    # Pad the end up to whole blocks, and the start with n_prev empty blocks so that block 0 has
    # "previous" blocks too. Padded keys are marked not real.
    q = F.pad(q, (0, 0, 0, pad))
    k = F.pad(k, (0, 0, n_prev * block, pad))
    v = F.pad(v, (0, 0, n_prev * block, pad))
    real = F.pad(real, (n_prev * block, pad), value=False)  # (B, n_prev*block + n*block)

    # unfold: windows of `span` positions every `block` positions -> (B, H, n, D, span), a view.
    k_local = k.unfold(2, span, block)
    v_local = v.unfold(2, span, block).transpose(-2, -1)  # (B, H, n, span, D)
    q_blocks = q.reshape(B, H, n, block, D)
    scores = [(q_blocks @ k_local) / math.sqrt(D)]  # (B, H, n, block, span)

    query_pos = torch.arange(n * block, device=device).view(n, block, 1)
    first_key = (torch.arange(n, device=device) - n_prev) * block  # position of each block's first local key
    key_pos = first_key.view(n, 1, 1) + torch.arange(span, device=device)  # (n, 1, span)
    allowed = (key_pos >= 0) & (key_pos <= query_pos)  # (n, block, span)
    if window is not None:
        allowed &= query_pos - key_pos < window
    real_local = real.unfold(1, span, block)[:, None, :, None, :]  # (B, 1, n, 1, span)
    masks = [allowed & (real_local | (key_pos == query_pos))]  # a padded query keeps itself

    # Summary blocks beyond the local ones: query block i sees summary block j when j < i - n_prev.
    last = n - 1 - n_prev  # the last query block is n - 1, so only j < last matter
    summary = list(range(summary_stride - 1, last, summary_stride)) if summary_stride > 0 else []
    has_summary = len(summary) > 0
    if has_summary:
        def summary_part(x: torch.Tensor) -> torch.Tensor:  # (B, ., pre-padded T, D) -> (B, ., S * block, D)
            x = x[:, :, n_prev * block :]
            return x.reshape(B, x.size(1), n, block, x.size(-1))[:, :, summary].flatten(2, 3)

        k_sum, v_sum = summary_part(k), summary_part(v)
        scores.append((q @ k_sum.transpose(-2, -1) / math.sqrt(D)).view(B, H, n, block, -1))
        query_block = torch.arange(n, device=device).view(n, 1, 1)
        key_block = torch.tensor(summary, device=device).repeat_interleave(block).view(1, 1, -1)
        real_sum = summary_part(real[:, None, :, None]).flatten(1)  # (B, S * block)
        masks.append((key_block < query_block - n_prev) & real_sum[:, None, None, None, :])

    mask = torch.cat([m.expand(B, 1, n, block, m.size(-1)) for m in masks], dim=-1)
    scores = torch.cat(scores, dim=-1).masked_fill(~mask, float("-inf"))  # (B, H, n, block, keys)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights[..., :span] @ v_local  # (B, H, n, block, D)
    if has_summary:
        out = out + (weights[..., span:].reshape(B, H, n * block, -1) @ v_sum).view(B, H, n, block, D)
    return out.reshape(B, H, n * block, D)[:, :, :T]


# ---- linear attention --------------------------------------------------------------------------
def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1: positive everywhere, so phi(q) . phi(k) can stand in for exp(q . k)."""
    return F.elu(x) + 1.0


def linear_attention_weights(
    q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """The (B, H, T, T) weights that causal linear attention implies, computed the quadratic way:

        w[t, s] = phi(q_t) . phi(k_s) / (sum_{s' <= t} phi(q_t) . phi(k_s') + eps)   for s <= t

    The O(T^2) reference for `causal_linear_attention` (output = weights @ v) and for plots.
    """
    T = q.size(-2)
    scores = elu_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)  # (B, H, T, T), all > 0
    keep = causal_mask(T, q.device)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()
    scores = scores * keep
    return scores / (scores.sum(-1, keepdim=True) + eps)


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal linear attention (Katharopoulos et al. 2020) without any T x T matrix.

    q, k: (B, H, T, D), v: (B, H, T, Dv) -> (B, H, T, Dv):

        out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  S_t = sum_{s<=t} phi(k_s) v_s^T,  z_t = sum_{s<=t} phi(k_s)

    Chunked: the sequence is cut into chunks of `chunk` positions. Inside a chunk the sum is done
    the quadratic way (a chunk x chunk matrix); everything before the chunk arrives as the running
    state S (D x Dv) and z (D), a prefix sum over chunks. Time O(T chunk D + T D Dv), memory
    O(T chunk + T/chunk D Dv), against O(T D Dv) memory for a per-position cumsum of S.
    Padded keys (attention_mask False) contribute nothing.
    """
    B, H, T, D = q.shape
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    if attention_mask is not None:
        phi_k = phi_k * attention_mask[:, None, :, None].to(phi_k.dtype)
    n = -(-T // chunk)
    pad = n * chunk - T
    # zero-padded keys at the end add nothing to any sum; padded queries are cut off at the end
    phi_q, phi_k, v = (F.pad(x, (0, 0, 0, pad)).view(B, H, n, chunk, x.size(-1)) for x in (phi_q, phi_k, v))

    # inside each chunk: (chunk, chunk) causal scores
    scores = (phi_q @ phi_k.transpose(-2, -1)) * causal_mask(chunk, q.device)  # (B, H, n, c, c)
    num = scores @ v  # (B, H, n, c, Dv)
    den = scores.sum(-1)  # (B, H, n, c)

    # from earlier chunks: state before chunk i = sum of chunk states 0 .. i-1
    chunk_kv = phi_k.transpose(-2, -1) @ v  # (B, H, n, D, Dv)
    chunk_z = phi_k.sum(-2)  # (B, H, n, D)
    state_kv = torch.cumsum(chunk_kv, dim=2) - chunk_kv  # exclusive prefix sum
    state_z = torch.cumsum(chunk_z, dim=2) - chunk_z
    num = num + phi_q @ state_kv
    den = den + (phi_q @ state_z.unsqueeze(-1)).squeeze(-1)
    out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(B, H, n * chunk, -1)[:, :, :T]


def _with_key_padding(mask, key_mask, n, T):
    """Hide padded keys from queries n .. n+T-1 (each query keeps itself, as `with_padding` does)."""
    S = key_mask.size(1)
    base = mask if mask is not None else torch.ones(T, S, dtype=torch.bool, device=key_mask.device)
    itself = torch.arange(n, n + T, device=key_mask.device)[:, None] == torch.arange(S, device=key_mask.device)
    return base & (key_mask[:, None, None, :] | itself)


def _attend_over(q, keys, values, mask, use_sdpa: bool):
    """Softmax attention of q (B, H, T, D) over keys/values (B, H_kv, S, D) under a boolean mask
    (None: every key), for the cached path; no causal shortcut (T queries are the last of S)."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.size(1) != q.size(1))
    n_rep = q.size(1) // keys.size(1)
    full = mask if mask is not None else torch.ones(q.size(-2), keys.size(-2), dtype=torch.bool, device=q.device)
    return masked_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), full)[0]


# ---- modules -----------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@ATTENTION.register("sdpa")
@ATTENTION.register("manual")
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused Q/K/V projection, H query heads, H_kv key/value heads,
    an output projection.

    attention="sdpa" runs `F.scaled_dot_product_attention` (a fused kernel; GQA through its
    `enable_gqa`, which needs no copy of K/V); "manual" runs `masked_attention`, written out.
    Both give the same outputs. Asking for the weights always takes the written-out path.
    Subclasses change which keys each query sees by overriding `layout` (and may override
    `attend` with a cheaper computation of the same thing).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H = config.d_model, config.n_head
        if C % H != 0:
            raise ValueError(f"d_model={C} is not divisible by n_head={H}; pick n_head from {_divisors(C)}.")
        H_kv = getattr(config, "n_kv_heads", None) or H
        if H_kv < 1 or H % H_kv != 0:
            raise ValueError(f"n_kv_heads={H_kv} must divide n_head={H}; choose one of {_divisors(H)} "
                             f"(or None for one key/value head per query head).")
        self.n_head, self.n_kv_heads, self.head_dim = H, H_kv, C // H
        self.dropout = config.dropout
        self.use_sdpa = getattr(config, "attention", "sdpa") != "manual"
        self.qkv = nn.Linear(C, (H + 2 * H_kv) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        C, H = config.d_model, config.n_head
        H_kv = getattr(config, "n_kv_heads", None) or H
        qkv_out = (H + 2 * H_kv) * (C // H)
        return C * qkv_out + C * C + ((qkv_out + C) if config.bias else 0)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None = None,
        attention_mask: torch.Tensor | None = None,
        return_weights: bool = False,
        cache=None,
        static: bool = False,
    ):
        """x: (B, T, C) -> (B, T, C); with `return_weights`, also the (B, H, T, T) weights.

        With a layer `cache` (see `lm.kv_cache`), x holds only the new positions: their keys and
        values are stored and the queries attend over everything cached. `static`: x is one new
        token per row at the device position of a static cache (`attend_static`)."""
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        offset = 0 if cache is None else cache.owner.position if static else cache.offset
        if rope is not None:
            q, k = rope(q, k, offset=offset)  # before K/V heads are repeated: fewer heads to rotate
        if cache is not None:
            y, weights = (self.attend_static if static else self.attend_cached)(q, k, v, cache), None
        else:
            dropout_p = self.dropout if self.training else 0.0
            y, weights = self.attend(q, k, v, attention_mask, dropout_p, return_weights)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_drop(self.proj(y))
        return (y, weights) if return_weights else y

    def layout(self, T: int, device: torch.device) -> torch.Tensor | None:
        """(T, T) boolean mask of the keys each query may see, or None for plain causal attention."""
        return None

    # ---- with a KV cache ---------------------------------------------------------------------
    def new_layer_cache(self, owner, batch_size, max_len, device, dtype):
        from .kv_cache import LayerCache

        return LayerCache(owner, batch_size, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def attend_cached(self, q, k, v, cache):
        """New queries q (B, H, T, D) at positions n .. n+T-1 over all cached keys 0 .. n+T-1."""
        n, T = cache.offset, q.size(-2)
        keys, values = cache.append(k, v)
        S = n + T
        layout = self.layout(S, q.device)
        if layout is not None:
            mask = layout[n:S]
        elif T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=n)
        else:
            mask = None  # one new token sees every cached one
        key_mask = cache.owner.key_mask
        if key_mask is not None:
            mask = _with_key_padding(mask, key_mask[:, :S], n, T)
        return _attend_over(q, keys, values, mask, self.use_sdpa)

    def attend_static(self, q, k, v, cache):
        """One new query per row, q (B, H, 1, D), at position p = the static cache's device position.

        Its key and value go to slot p, and the query attends over every slot of the buffer,
        masked to slots 0 .. p (and the layout's row p) that hold real tokens: no shape depends on
        p, so the step can be replayed as a CUDA graph. Same result as `attend_cached`."""
        owner, p = cache.owner, cache.owner.position
        cache.write(k, v, p)
        layout = self.layout(cache.slots, q.device)
        if layout is None:
            allowed = torch.arange(cache.slots, device=q.device) <= p
        else:
            allowed = layout.index_select(0, p.view(1))[0]
        mask = (allowed & owner.key_mask[:, : cache.slots])[:, None, None, :]  # (B, 1, 1, S)
        return _attend_over(q, cache.k, cache.v, mask, self.use_sdpa)

    def attend(self, q, k, v, attention_mask, dropout_p, return_weights):
        """q (B, H, T, D), k and v (B, H_kv, T, D) -> y (B, H, T, D) and weights (B, H, T, T) or None."""
        T = q.size(-2)
        layout = self.layout(T, q.device)
        n_rep = self.n_head // self.n_kv_heads
        if self.use_sdpa and not return_weights:
            mask = None
            if layout is not None or attention_mask is not None:
                mask = with_padding(causal_mask(T, q.device) if layout is None else layout, attention_mask)
            return sdpa(q, k, v, mask, dropout_p), None
        mask = with_padding(causal_mask(T, q.device) if layout is None else layout, attention_mask)
        return masked_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, dropout_p)


@ATTENTION.register("sliding_window")
class SlidingWindowAttention(CausalSelfAttention):
    """Local attention: query t sees keys t-window+1 .. t, so information travels at most `window`
    positions per layer (n_layer * window in all), as in Longformer and Mistral.

    Without weights and when the window is shorter than T, the output is computed block by block
    (`local_block_attention`): queries in blocks of min(window, 64), each scoring only the keys that
    can fall in its window, O(T window) time and memory. Otherwise (weights requested) the
    `sliding_window_mask` goes through the written-out path; `use_blocks = False` sends the
    no-weights case through SDPA with that mask instead (same result, O(T^2)).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        window = getattr(config, "window", None)
        if window is None or window < 1:
            raise ValueError(f"attention='sliding_window' needs window >= 1 (keys per query), got window={window!r}; "
                             f"set e.g. window={max(1, config.block_size // 4)}.")
        self.window = window
        self.use_blocks = True

    def layout(self, T, device):
        return None if self.window >= T else sliding_window_mask(T, self.window, device)

    def attend(self, q, k, v, attention_mask, dropout_p, return_weights):
        T = q.size(-2)
        if return_weights or not self.use_blocks or self.window >= T:
            return super().attend(q, k, v, attention_mask, dropout_p, return_weights)
        block = min(self.window, 64)
        n_prev = -(-(self.window - 1) // block)  # earlier blocks that the window can reach
        n_rep = self.n_head // self.n_kv_heads
        y = local_block_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), block, n_prev, window=self.window,
                                  attention_mask=attention_mask, dropout_p=dropout_p)
        return y, None

    def new_layer_cache(self, owner, batch_size, max_len, device, dtype):
        from .kv_cache import LayerCache

        slots = min(self.window, max_len)  # a rolling buffer: memory O(window), whatever the length
        return LayerCache(owner, batch_size, self.n_kv_heads, slots, self.head_dim, device, dtype)

    def attend_cached(self, q, k, v, cache):
        n, T = cache.offset, q.size(-2)
        keys, values, key_pos = cache.window(k, v)
        distance = torch.arange(n, n + T, device=q.device)[:, None] - key_pos[None, :]
        mask = (distance >= 0) & (distance < self.window)  # (T, kept + T)
        key_mask = cache.owner.key_mask
        if key_mask is not None:
            real = key_mask[:, key_pos][:, None, None, :]
            mask = mask & (real | (distance == 0))  # a padded query still sees itself
        if T == 1 and key_mask is None:
            mask = None  # every kept key is inside the window
        return _attend_over(q, keys, values, mask, self.use_sdpa)

    def attend_static(self, q, k, v, cache):
        """The rolling buffer with the position p on the device: the new key goes to slot p % W, and
        slot j then holds position p - ((p - j) mod W) (negative: never filled)."""
        owner, p, W = cache.owner, cache.owner.position, cache.slots
        cache.write(k, v, p % W)
        key_pos = p - (p - torch.arange(W, device=q.device)) % W
        real = owner.key_mask.index_select(1, key_pos.clamp(min=0))  # (B, W)
        mask = ((key_pos >= 0) & real)[:, None, None, :]
        return _attend_over(q, cache.k, cache.v, mask, self.use_sdpa)

    def extra_repr(self) -> str:
        return f"window={self.window}"


SPARSE_PATTERNS = ("local_strided", "full")


@ATTENTION.register("block_sparse")
class BlockSparseAttention(CausalSelfAttention):
    """Block-sparse attention (experimental; in the spirit of Child et al. 2019, "fixed" pattern).

    Positions are grouped in blocks of `sparse_block`. Query block i sees its own block, the
    `sparse_local` blocks before it, and every earlier "summary" block j with
    j % sparse_stride == sparse_stride - 1 (sparse_stride=0: none), through which far-away
    information reaches every later block in one layer. sparse_pattern="full" allows all causal
    blocks, which is exactly full causal attention.

    Two computations of the same thing: `block_sparse_mask` through SDPA / the written-out path
    (the reference; a mask saves no compute), and, when no weights are asked for, the real one,
    `local_block_attention`, which scores only the allowed blocks, so its cost follows the layout:
    O(T (local + 1) block + T^2 / stride) instead of O(T^2). `use_blocks = False` forces the mask.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.block = getattr(config, "sparse_block", 16)
        self.local = getattr(config, "sparse_local", 2)
        self.stride = getattr(config, "sparse_stride", 4)
        self.pattern = getattr(config, "sparse_pattern", "local_strided")
        if self.block < 1:
            raise ValueError(f"sparse_block={self.block} must be >= 1 (positions per block), e.g. 16.")
        if self.local < 0:
            raise ValueError(f"sparse_local={self.local} must be >= 0 (earlier blocks each block sees), e.g. 2.")
        if self.stride < 0:
            raise ValueError(f"sparse_stride={self.stride} must be >= 0 (0 turns summary blocks off), e.g. 4.")
        if self.pattern not in SPARSE_PATTERNS:
            raise ValueError(f"sparse_pattern={self.pattern!r} is unknown; choose one of {list(SPARSE_PATTERNS)}.")
        self.use_blocks = True

    def layout(self, T, device):
        if self.pattern == "full":
            return None
        return block_sparse_mask(T, self.block, self.local, self.stride, self.pattern, device)

    def attend(self, q, k, v, attention_mask, dropout_p, return_weights):
        if return_weights or not self.use_blocks or self.pattern == "full":
            return super().attend(q, k, v, attention_mask, dropout_p, return_weights)
        n_rep = self.n_head // self.n_kv_heads
        y = local_block_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), self.block, self.local,
                                  summary_stride=self.stride, attention_mask=attention_mask, dropout_p=dropout_p)
        return y, None

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
    `return_weights=True` returns the weights it implies (`linear_attention_weights`), computed
    the O(T^2) way, with the output computed from them; rows sum to 1 up to eps.

    With RoPE, q and k are rotated before phi, like every other variant. Because phi acts on each
    channel, phi(R_t q) . phi(R_s k) is NOT a function of t - s alone: the positions stay
    absolute-ish, and left padding shifts the result (RoFormer, section 3.3, rotates phi(q), phi(k)
    in the numerator only instead; not done here).
    """

    chunk = 64

    def new_layer_cache(self, owner, batch_size, max_len, device, dtype):
        from .kv_cache import LinearState

        return LinearState(owner, batch_size, self.n_head, self.head_dim, device, dtype)

    def attend_cached(self, q, k, v, cache, eps: float = 1e-6):
        """Continue from the running state: out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)."""
        return self._continue_state(q, k, v, cache, cache.offset, eps)

    def attend_static(self, q, k, v, cache, eps: float = 1e-6):
        """The state has a fixed size already: only the padding mask needs the device position."""
        return self._continue_state(q, k, v, cache, cache.owner.position, eps)

    def _continue_state(self, q, k, v, cache, n, eps):
        T = q.size(-2)
        n_rep = self.n_head // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        key_mask = cache.owner.key_mask
        if key_mask is not None:  # rows n .. n+T-1 of the (B, max_len) mask, n an int or a tensor
            real = table_rows(key_mask.T, T, n).T
            phi_k = phi_k * real[:, None, :, None].to(phi_k.dtype)
        scores = (phi_q @ phi_k.transpose(-2, -1)) * causal_mask(T, q.device)  # within the new tokens
        num = scores @ v + phi_q @ cache.S
        den = scores.sum(-1) + (phi_q @ cache.z.unsqueeze(-1)).squeeze(-1)
        cache.S += phi_k.transpose(-2, -1) @ v
        cache.z += phi_k.sum(-2)
        return num / (den.unsqueeze(-1) + eps)

    def attend(self, q, k, v, attention_mask, dropout_p, return_weights):
        n_rep = self.n_head // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if return_weights:
            weights = linear_attention_weights(q, k, attention_mask)
            return weights @ v, weights
        return causal_linear_attention(q, k, v, attention_mask, chunk=self.chunk), None


__all__ = [
    "BlockSparseAttention", "CausalSelfAttention", "LinearAttention", "SlidingWindowAttention",
    "block_sparse_layout", "block_sparse_mask", "causal_linear_attention", "causal_mask", "elu_feature_map",
    "linear_attention_weights", "local_block_attention", "manual_causal_attention", "masked_attention",
    "repeat_kv", "sdpa", "sliding_window_mask", "with_padding",
]
