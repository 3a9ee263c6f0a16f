"""The arithmetic of attention: functions of q, k, v tensors, no parameters.

Shapes: q (B, H, T, D); k, v (B, H_kv, S, D), with H_kv dividing H (grouped-query attention,
query head h uses key/value head h // (H / H_kv)); masks are boolean, True = may attend.

- `masked_attention`: softmax attention written out step by step, under any mask, with weights;
- `sdpa`: the same through `F.scaled_dot_product_attention`, a fused kernel;
- `attend_over`: either of them over the keys a KV cache returns (no causal shortcut);
- `local_block_attention`: causal attention that computes only nearby (and summary) blocks;
- `causal_linear_attention`: linear attention in chunks, with no T x T matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import cpu_kernels
from .masks import causal_mask


# ---- softmax attention -------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head repeated for its n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, causal when `mask` is None; k, v may have fewer heads (GQA).

    Fewer K/V heads are repeated where CPU training keeps the probabilities (see `_saved_probabilities_pay`);
    elsewhere they go to SDPA as they are (`enable_gqa`, no copy) where its fast kernel
    takes them: on CPU, and on CUDA in half precision without a mask (flash attention). Elsewhere on
    CUDA (float32, or a mask) `enable_gqa` would fall back to the O(T^2)-memory math kernel, so the
    heads are repeated and the memory-efficient kernel runs instead. Measured: bench/attention_cost.py.
    """
    n_rep = q.size(1) // k.size(1)
    if mask is None and dropout_p == 0.0 and _saved_probabilities_pay(q, k, v):
        return _keeping_probabilities(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))  # GQA: heads repeated
    native_gqa = q.device.type == "cpu" or (mask is None and q.dtype in (torch.float16, torch.bfloat16))
    if n_rep > 1 and not native_gqa:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                          enable_gqa=k.size(1) != q.size(1))


# Causal attention that keeps its probabilities. In bfloat16 on a CPU, SDPA's flash kernel takes 1.7 ms
# forward and 12 ms backward for B=8, H=6, T=256, D=64 (2 cores with AMX), while three batched products
# and a softmax take 2.6 and 5.0, keeping the (B*H, T, T) probabilities for backward: 6 ms less a layer,
# about an eighth of a bf16 training step of the book's 6-layer model. In float32 those products tie
# with the flash kernel (8.5 and 21 ms on a 2-core AVX2 CPU), but lm's own kernel (lm/csrc/causal.c,
# `lm.cpu_kernels.causal_attention`) skips the blocks above the diagonal and takes about 5 and 10 ms, so
# float32 takes that where it can run (x86-64 with AVX2, a C compiler, heads of a multiple of 16
# floats). Only while the probabilities stay small (SAVED_PROBABILITIES numbers: 64 MiB in bfloat16;
# lm's kernel keeps about half of them, the lower triangle, 64 MiB in float32); longer sequences keep the
# flash kernel, which holds no T x T matrix.
SAVED_PROBABILITIES = 1 << 25


def _saved_probabilities_pay(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether causal attention of q, k, v should keep its probabilities (`_keeping_probabilities`):
    training (a gradient will be wanted) on a CPU in bfloat16, or in float32 where lm's kernel runs, T == S,
    and B * H * T * T at most SAVED_PROBABILITIES. k and v may have fewer heads (GQA): they are repeated,
    a copy of (B, H, T, D) each whose gradients autograd sums back, far cheaper than the flash kernel's
    backward (a 6-layer model with 2 K/V heads: 1.19 times transformers' tokens/s in float32 instead of
    1.02, 1.27 in bfloat16 instead of 1.04)."""
    B, H, T, D = q.shape
    grouped = k.dim() == 4 and H % k.size(1) == 0  # GQA: fewer K/V heads
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and k.shape == v.shape
            and (k.shape == q.shape or grouped and (k.size(0), k.size(2), k.size(3)) == (B, T, D))
            and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad) and B * H * T * T <= SAVED_PROBABILITIES):
        return False
    return q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and c_kernel_takes(B, H, T, D))


def c_kernel_takes(B: int, H: int, T: int, D: int) -> bool:
    """Whether lm's float32 C kernel (`lm.cpu_kernels.causal_attention`) takes B x H heads of T positions and
    D floats here: their probabilities within SAVED_PROBABILITIES, the kernel built, and no torch.compile
    (it runs through ctypes, which a compiled graph cannot trace: compiled models keep the flash kernel)."""
    return (B * H * T * T <= SAVED_PROBABILITIES and not torch.compiler.is_compiling()
            and cpu_kernels.causal_unavailable(D) is None)


def _keeping_probabilities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention keeping its probabilities for backward: lm's C kernel in float32, batched products
    in bfloat16."""
    if q.dtype == torch.float32:
        return cpu_kernels.CausalAttention.apply(q, k, v)
    return _CausalAttentionKeepingProbabilities.apply(q, k, v)


class _CausalAttentionKeepingProbabilities(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal mask) v for q, k, v (B, H, T, D), as batched matrix products; the
    probabilities P are kept, so backward is four products and one pass of softmax's backward:

        dV = P^T dO      dP = dO V^T      dS = P * (dP - rowsum(dP * P))
        dQ = dS K / sqrt(D)      dK = dS^T Q / sqrt(D)
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        probs = torch.softmax(torch.baddbmm(future, q3, k3.transpose(1, 2), alpha=scale), dim=-1)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale = scale
        return torch.bmm(probs, v3).view(B, H, T, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q3, k3, v3, probs = ctx.saved_tensors
        g3 = grad.reshape(q3.shape)
        grad_v = torch.bmm(probs.transpose(1, 2), g3)
        grad_scores = torch._softmax_backward_data(torch.bmm(g3, v3.transpose(1, 2)), probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3).mul_(ctx.scale)
        return grad_q.view(grad.shape), grad_k.view(grad.shape), grad_v.view(grad.shape)


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


def attend_over(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                use_sdpa: bool = True) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over keys/values (B, H_kv, S, D) under a boolean mask
    broadcastable to (B, H, T, S) (None: every key), as a KV cache returns them. No causal shortcut:
    the T queries are not the first T of the S keys. `use_sdpa=False`: the written-out path."""
    if use_sdpa:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.size(1) != q.size(1))
    n_rep = q.size(1) // keys.size(1)
    full = mask if mask is not None else torch.ones(q.size(-2), keys.size(-2), dtype=torch.bool, device=q.device)
    return masked_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), full)[0]


__all__ = [
    "attend_over", "causal_linear_attention", "elu_feature_map", "linear_attention_weights", "local_block_attention",
    "manual_causal_attention", "masked_attention", "repeat_kv", "sdpa",
]
