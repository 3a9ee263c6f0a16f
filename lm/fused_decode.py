"""The decoding step as five fused GPU kernels per block (Triton): what makes batch-1 decoding fast.

At batch 1 a GPT-2 124M step reads 250 MB of weights, which an H200 does in about 60 us. Replayed
as a CUDA graph of the model's own step, compiled by `torch.compile`, it took 440 us, because it was
136 kernels: a replayed kernel costs 2-4 us however little it does, cuBLAS splits the long
matrix-vector products in two kernels, and cuDNN's attention kernel, built for long queries, took
7 us for one query. The step here is 64 kernels and takes 285 us, and about 40 us less launched
with programmatic dependent launch (PDL, below; `bench/gpu_decode.py`):

    embedding: token row + position row, in one kernel
    for each block:
        1. norm1 + qkv projection (+ bias), writing the new key and value into the cache
        2. attention of the new query over the cache (online softmax; a long cache is split over
           several programs per head, and the last to finish joins their results: flash-decoding)
        3. output projection (+ bias) + the residual
        4. norm2 + fc (+ bias) + GELU        (or SwiGLU's two projections and their gate)
        5. the second projection (+ bias) + the residual
    final norm + head, which also finds each row's largest logit (greedy decoding needs no argmax)

Kernels 1, 3, 4, 5 and the head are one matrix-vector kernel, `norm_linear_kernel`: each program
computes two output columns for every row (so GPT-2's qkv projection is 1,152 programs, and every SM
reads at once), reading its weight rows and the whole input row in one load; it normalises the row
itself, so the normalised activations never go to memory. The products are CUDA-core multiply-adds
in float32: at batch 1 and 2 the weights' bytes are the cost, and larger batches (matrix products)
stay with cuBLAS.

The numbers are the module path's up to float rounding: the accumulation order differs. The tests
check the logits against `model(token, cache=cache)` to a tolerance, and greedy ids equal in float32.

`FusedStep(model, cache)` is the step; `lm.cuda_graph.GraphedStep` records it as a CUDA graph
whenever `FusedStep.unsupported(model, cache)` is None: CUDA, Triton (it ships with PyTorch's CUDA
builds), pre-norm blocks of LayerNorm or RMSNorm, the GELU, tanh-GELU or SwiGLU feed-forward, plain
`nn.Linear` layers, `CausalSelfAttention` (RoPE is applied by the model's own module between
kernels 1 and 2), a power-of-two head size, a static cache of at most 2 rows.

PDL: on Hopper and later GPUs the kernels launch with programmatic dependent launch (`PDL = False`
turns it off): each lets the next one start at once, and the next loads its weights, which no
kernel writes, before it waits (`gdc_wait`) for the kernels before it to finish; so one kernel's
weights stream in while the previous one computes. Every kernel waits before its first read of
what another wrote and before its first write.

With `TRITON_INTERPRET=1` set before Triton is imported, Triton's interpreter runs the same kernels on
the CPU, slowly: a way to test them, or to step through one with a debugger.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn

from .attention.modules import CausalSelfAttention
from .decode_step import LeanStep
from .feedforward import MLP, SwiGLU, TanhMLP
from .kv_cache import StaticCache
from .norms import LayerNorm, RMSNorm
from .positions import LearnedPositionEmbedding, SinusoidalPositionEmbedding

try:  # PyTorch's CUDA wheels bring Triton; a CPU-only install has none, and needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_ROWS = 2  # batches up to 2 rows decode fused; larger ones are matrix products, cuBLAS's work (measured)

# activations the matrix-vector kernel applies to its output
NO_ACT, GELU, GELU_TANH, SWIGLU = 0, 1, 2, 3
# norms it applies to its input
NO_NORM, LAYER_NORM, RMS_NORM = 0, 1, 2


def _pack_argmax(value, col):
    """One int64 per value whose order is (value, then the earlier column): the float's bits made
    to sort as signed integers (negative floats have their other 31 bits flipped) in the high half,
    4294967295 - col in the low half. The largest packed number is the first column of the
    largest value, which is what torch.argmax returns."""
    bits = value.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (4294967295 - col.to(tl.int64))


def embed_kernel(TOKEN, stride_t, TOK_EMB, POS_EMB, POS, X, AMAX, C, HAS_POS: tl.constexpr, BC: tl.constexpr,
                 PDL: tl.constexpr):
    """X[b] = TOK_EMB[token b] (+ POS_EMB[pos]); also starts row b's argmax afresh."""
    b = tl.program_id(0)
    if PDL:  # see norm_linear_kernel
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    c = tl.arange(0, BC)
    ok = c < C
    x = tl.load(TOK_EMB + tl.load(TOKEN + b * stride_t) * C + c, mask=ok, other=0.0)
    if HAS_POS:
        x = x + tl.load(POS_EMB + tl.load(POS) * C + c, mask=ok, other=0.0)
    tl.store(X + b * C + c, x, mask=ok)
    tl.store(AMAX + b, -9223372036854775807)


def unpack_argmax_kernel(AMAX, NEXT, TOKEN, HISTORY, POS, stride_t, stride_h, COUNT, FINISHED, STOPS, PAD,
                  FEED: tl.constexpr, WATCH: tl.constexpr, N_STOPS: tl.constexpr, COUNTS: tl.constexpr,
                  PDL: tl.constexpr):
    """The choice of the fused greedy head and of `lm.fused_sampling`'s draws, from its packed
    maximum. Row `program_id(0)`: NEXT = the column packed in AMAX (then reset for the next draw);
    WATCH: the padding id PAD if the row had finished, and FINISHED notes a stop id among STOPS (-1:
    an empty slot); FEED: also TOKEN (the next step's input) and HISTORY at POS, the cache's
    position (already moved past this step). COUNTS: row 0 counts the draw (COUNT)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    col = 4294967295 - (tl.load(AMAX + b) & 4294967295)
    tl.store(AMAX + b, -9223372036854775807)  # below every packed value: ready for the next draw
    if WATCH:
        done = tl.load(FINISHED + b) != 0
        col = tl.where(done, tl.load(PAD), col)
        stops = tl.load(STOPS + tl.arange(0, N_STOPS))
        hit = tl.sum((stops == col).to(tl.int32), axis=0) > 0
        tl.store(FINISHED + b, (done | hit).to(tl.int1))
    tl.store(NEXT + b, col)
    if FEED:
        tl.store(TOKEN + b * stride_t, col)
        tl.store(HISTORY + b * stride_h + tl.load(POS), col)
    if COUNTS:
        if b == 0:
            tl.store(COUNT, tl.load(COUNT) + 1)


def norm_linear_kernel(
    X, stride_x, W, W2, BIAS, BIAS2, NW, NB, R, stride_r, Y, stride_y,
    KC, VC, POS, stride_cb, stride_ch, stride_cs, AMAX,
    B, N, K, eps,
    NORM: tl.constexpr, NORM_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr, KV: tl.constexpr, Q_COLS: tl.constexpr, KV_COLS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_ROW: tl.constexpr,
    ONE_TILE: tl.constexpr, ARGMAX: tl.constexpr, PDL: tl.constexpr,
):
    """Y[b, cols] = act(norm(X[b]) @ W[cols].T + bias) (+ R[b, cols]) for this program's BN columns
    and the BM (>= B) rows. ONE_TILE: K <= BK, every input read in one load. K_ROW > 0: a power of
    two >= K, the statistics read each row at once. ARGMAX: also fold each row's largest output
    (and its column) into AMAX[b] (see `_pack_argmax`).

    PDL (programmatic dependent launch, Hopper and later): the kernel lets the next one start at
    once, and waits (gdc_wait) for the one before it to finish only after loading what does not
    depend on it, its weights and bias: so each kernel's weights stream in while the previous
    kernel is still running, and its launch and first memory wait are hidden."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    row_ok = rows < B
    col_ok = cols < N
    out_ok = row_ok[:, None] & col_ok[None, :]
    x_rows = X + rows[:, None] * stride_x
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    if HAS_BIAS:  # loads that depend on nothing are issued first, to wait for memory once
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 3:
            acc2 += tl.load(BIAS2 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ONE_TILE:  # the whole weight tile in one go
        k_ok = ks < K
        w_tile = cols[:, None] * K + ks[None, :]
        w_ok = col_ok[:, None] & k_ok[None, :]
        w = tl.load(W + w_tile, mask=w_ok, other=0.0).to(tl.float32)
        if ACT == 3:
            w2 = tl.load(W2 + w_tile, mask=w_ok, other=0.0).to(tl.float32)
    if PDL:  # from here on, reads of what the kernels before wrote, and writes
        tl.extra.cuda.gdc_wait()
    if RESIDUAL:
        res = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=out_ok, other=0.0).to(tl.float32)
    if ONE_TILE:  # and the whole input row
        m = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + ks[None, :], mask=m, other=0.0).to(tl.float32)
        if NORM != 0:
            nw = tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if NORM_BIAS:
                nb = tl.load(NB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            mean = tl.sum(x, axis=1) / K
            if NORM == 2:  # RMSNorm does not centre
                mean = mean * 0.0
            d = tl.where(m, x - mean[:, None], 0.0)
            x = d * (1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps))[:, None] * nw
            if NORM_BIAS:
                x = x + nb
            x = x.to(W.dtype.element_ty).to(tl.float32)  # rounded as the norm module's output is
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        if ACT == 3:
            acc2 += tl.sum(x[:, None, :] * w2[None, :, :], axis=2)
    elif NORM != 0:  # each row's statistics in float32: the mean, then the spread about it
        if K_ROW > 0:  # the whole row in one load: one memory latency instead of a loop of them
            kr = tl.arange(0, K_ROW)
            m = row_ok[:, None] & (kr < K)[None, :]
            xr = tl.load(x_rows + kr[None, :], mask=m, other=0.0).to(tl.float32)
            mean = tl.sum(xr, axis=1) / K
            if NORM == 2:  # RMSNorm does not centre
                mean = mean * 0.0
            d = tl.where(m, xr - mean[:, None], 0.0)
            spread = tl.sum(d * d, axis=1)
        else:
            mean = tl.zeros([BM], dtype=tl.float32)
            if NORM == 1:
                for k0 in range(0, K, BK):
                    m = row_ok[:, None] & (k0 + ks < K)[None, :]
                    mean += tl.sum(tl.load(x_rows + (k0 + ks)[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
                mean = mean / K
            spread = tl.zeros([BM], dtype=tl.float32)
            for k0 in range(0, K, BK):
                m = row_ok[:, None] & (k0 + ks < K)[None, :]
                d = tl.where(m, tl.load(x_rows + (k0 + ks)[None, :], mask=m, other=0.0).to(tl.float32)
                             - mean[:, None], 0.0)
                spread += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(spread / K + eps)
    if not ONE_TILE:
        for k0 in range(0, K, BK):
            kk = k0 + ks
            k_ok = kk < K
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if NORM != 0:  # normalised, then rounded to the weights' type as the norm module's output is
                x = (x - mean[:, None]) * rstd[:, None] * tl.load(NW + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                if NORM_BIAS:
                    x = x + tl.load(NB + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                x = x.to(W.dtype.element_ty).to(tl.float32)
            w_tile = cols[:, None] * K + kk[None, :]  # (BN, BK) of W (N, K), read along its rows
            w_ok = col_ok[:, None] & k_ok[None, :]
            w = tl.load(W + w_tile, mask=w_ok, other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            if ACT == 3:
                w = tl.load(W2 + w_tile, mask=w_ok, other=0.0).to(tl.float32)
                acc2 += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if ACT == 1:  # GELU: x * Phi(x)
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    if ACT == 2:  # GELU's tanh approximation; 0.5 (1 + tanh(u)) = sigmoid(2u)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    if ACT == 3:  # SwiGLU: silu(x W1) * (x W2)
        acc = acc * tl.sigmoid(acc) * acc2
    if RESIDUAL:
        acc += res
    out = acc.to(Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], out, mask=out_ok)
    if ARGMAX:
        packed = tl.where(out_ok, _pack_argmax(out.to(tl.float32), cols[None, :]), -9223372036854775807)
        tl.atomic_max(AMAX + rows, tl.max(packed, axis=1), mask=row_ok)
    if KV:  # columns Q_COLS.. are the new key, then the value: store them at the cache's position
        pos = tl.load(POS)
        c = cols - Q_COLS
        ok = out_ok & ((c >= 0) & (c < KV_COLS))[None, :]
        where = rows[:, None] * stride_cb + (c // HEAD_DIM)[None, :] * stride_ch + pos * stride_cs \
            + (c % HEAD_DIM)[None, :]
        tl.store(KC + where, out, mask=ok)
        c = cols - Q_COLS - KV_COLS
        ok = out_ok & ((c >= 0) & (c < KV_COLS))[None, :]
        where = rows[:, None] * stride_cb + (c // HEAD_DIM)[None, :] * stride_ch + pos * stride_cs \
            + (c % HEAD_DIM)[None, :]
        tl.store(VC + where, out, mask=ok)


def decode_attention_kernel(
    Q, stride_qb, KC, VC, stride_cb, stride_ch, stride_cs, POS, REAL, stride_rb, PART_ML, PART_ACC, COUNT,
    Y, stride_yb, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HAS_REAL: tl.constexpr, PDL: tl.constexpr,
):
    """One query head of one row over its share of the cached keys 0..pos (flash-decoding).

    The cache's S slots are cut into SPLITS stretches of NB blocks of BS keys; program (row, head,
    split) reads one stretch, with an online softmax: the running maximum m, the running sum l of
    exp(score - m), the weighted values acc. So a long cache is read by many programs at once, not by
    one per head. Only the `active` stretches that reach position pos have work; the others stop at once.
    With one active stretch, its program writes the output itself. Otherwise each leaves (m, l, acc) in
    PART_ML / PART_ACC and counts itself done in COUNT[row, head] (an atomic add, which also publishes its
    writes); the program that finds itself last joins the partial results, rescaling each by
    exp(m_s - max m), writes the output, and sets the count back to 0 for the next step."""
    if PDL:  # see norm_linear_kernel: everything here depends on the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    bh = pid // SPLITS
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * D + d).to(tl.float32) * scale
    pos = tl.load(POS)
    cache = b * stride_cb + (h // GROUP) * stride_ch
    split = pid % SPLITS
    active = pos // (NB * BS) + 1  # the splits that hold a visible key; the others have nothing to do
    if split < active:
        m_i = tl.zeros([D], dtype=tl.float32) - 1.0e30  # finite: a block with no visible key changes nothing
        l_i = tl.zeros([D], dtype=tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        first = split * (NB * BS)
        for i in range(NB):
            if first + i * BS <= pos:  # blocks past the position hold no visible key: skipped
                s = first + i * BS + tl.arange(0, BS)
                visible = s <= pos
                if HAS_REAL:  # padding is hidden, except from the query at its own position
                    real = tl.load(REAL + b * stride_rb + s, mask=visible, other=0)
                    visible = visible & ((real != 0) | (s == pos))
                where = cache + s[:, None] * stride_cs + d[None, :]
                k = tl.load(KC + where, mask=visible[:, None], other=0.0).to(tl.float32)
                scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=0))
                p = tl.exp(scores - tl.max(m_new, axis=0))
                alpha = tl.exp(m_i - m_new)
                v = tl.load(VC + where, mask=visible[:, None], other=0.0).to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                m_i = m_new
        out = Y + b * stride_yb + h * D + d
        if active == 1:  # all the keys in one split (a short cache, or early positions): no partial results
            tl.store(out, (acc / l_i).to(Y.dtype.element_ty))
        else:
            tl.store(PART_ACC + pid * D + d, acc)
            tl.store(PART_ML + 2 * pid, tl.max(m_i, axis=0))
            tl.store(PART_ML + 2 * pid + 1, tl.max(l_i, axis=0))
            tl.debug_barrier()  # every thread's stores are made before the count goes up
            done = tl.atomic_add(COUNT + bh, 1)  # acq_rel: the stores above are seen by whoever counts last
            if done == active - 1:
                part = bh * SPLITS + tl.arange(0, SPLITS_P2)
                ok = tl.arange(0, SPLITS_P2) < active
                m_s = tl.load(PART_ML + 2 * part, mask=ok, other=-1.0e30, cache_modifier=".cg")
                l_s = tl.load(PART_ML + 2 * part + 1, mask=ok, other=0.0, cache_modifier=".cg")
                acc_s = tl.load(PART_ACC + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                                cache_modifier=".cg")
                weight = tl.exp(m_s - tl.max(m_s, axis=0))
                total = tl.sum(acc_s * weight[:, None], axis=0) / tl.sum(l_s * weight, axis=0)
                tl.store(out, total.to(Y.dtype.element_ty))
                tl.store(COUNT + bh, 0)


# The kernels above are plain Python functions, so that they can be read (and shown in the book) on a
# machine without Triton; here they become Triton kernels. `_pack_argmax` is called from inside a
# kernel, so its name must be the compiled function.
if triton is not None:
    _pack_argmax = triton.jit(_pack_argmax)
    _norm_linear_kernel = triton.jit(norm_linear_kernel)
    _decode_attention_kernel = triton.jit(decode_attention_kernel)
    _embed_kernel = triton.jit(embed_kernel)
    _unpack_argmax_kernel = triton.jit(unpack_argmax_kernel)


def use_pdl(device) -> bool:
    """Whether the kernels launch with programmatic dependent launch: on Hopper and later GPUs
    (compute capability 9+), unless `PDL` below is set False (bench/fused_kernels.py compares)."""
    if not PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


PDL = True


def _pdl(device) -> dict:
    """The kernels' PDL switch, and Triton's launch option that goes with it."""
    on = use_pdl(device)
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=False)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(B: int, N: int, K: int) -> dict:
    """Rows, columns and inputs per program, and warps, for a (B, K) @ (K, N) product.

    A matrix-vector product is memory-bound: what counts is that many SMs read at once and that each
    program waits for memory few times. So a program takes a long stretch of K per load (up to 1,024
    inputs) and only 2 output columns (4 for a vocabulary-sized head): GPT-2's qkv projection is then
    1,152 programs. Chosen by timing every combination on an H200 (`bench/fused_kernels.py --sweep`):
    2.7-4.5 us for GPT-2's four layer shapes at batch 1, where cuBLAS takes 4.0-6.9 us."""
    return dict(BM=_pow2(B), BN=4 if N > 8192 else 2, BK=min(_pow2(K), 1024), num_warps=2)


SPLIT_KEYS = True  # long caches are read by several programs per head (False: one; bench/fused_kernels.py compares)


def attention_config(head_dim: int, max_len: int, split: bool | None = None) -> dict:
    """Keys per block (BS), blocks per program (NB) and programs per head (SPLITS) of the attention kernel
    for a cache of `max_len` slots. A block is as many keys as fit the registers; with `split` (None:
    SPLIT_KEYS; False: one program per head reads every key) a
    program reads at most one block of 128 keys (64 at head_dim 128 and up), and a head takes as many
    programs as its cache needs, up to 16 (then each reads several blocks): GPT-2's 1,024 slots are 8
    programs per head. On an H200 (`bench/fused_kernels.py`, 2026-12-04) that takes 4.5 us over 1,001
    keys, where one program per head took 10.2; other splits have not been swept yet (`--sweep`)."""
    block = max(16, min(256, 16384 // head_dim))
    if not (SPLIT_KEYS if split is None else split):
        return dict(BS=block, NB=_cdiv(max_len, block), SPLITS=1, num_warps=4)
    block = min(block, 8192 // head_dim if head_dim >= 128 else 128)
    blocks = _cdiv(max_len, block)
    per_program = _cdiv(blocks, 16)
    return dict(BS=block, NB=per_program, SPLITS=_cdiv(blocks, per_program), num_warps=4)


def norm_linear(x: torch.Tensor, linear: nn.Linear, norm: nn.Module | None = None, act: int = NO_ACT,
                residual: torch.Tensor | None = None, gate: nn.Linear | None = None, kv=None,
                argmax: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """act(norm(x) @ linear.weight.T + linear.bias) (+ residual) for x (B, K) in one kernel; any B works,
    but past MAX_ROWS rows cuBLAS's tensor cores are faster.

    `gate`: SwiGLU's second projection (act=SWIGLU gives silu(x W1) * (x W2)). `kv`: (k_cache,
    v_cache, position, q_cols, kv_cols, head_dim): the output's columns q_cols.. are also stored
    into the caches (B, H_kv, S, D) at the position (a 0-d device tensor). `argmax` (B,) int64, filled
    with the smallest int64: each row's largest output and its column are folded into it (see
    `_pack_argmax`; `unpack_argmax` reads the columns)."""
    B, K = x.shape
    W = linear.weight
    N = W.size(0)
    y = torch.empty(B, N, device=x.device, dtype=x.dtype)
    kind = NO_NORM if norm is None else RMS_NORM if type(norm) is RMSNorm else LAYER_NORM
    norm_w = W if norm is None else norm.weight  # W: a placeholder the kernel does not read
    if norm is not None and norm_w is None:  # a norm without a learned scale
        norm_w = torch.ones(K, device=x.device, dtype=x.dtype)
    norm_b = getattr(norm, "bias", None)
    bias = linear.bias
    k_cache, v_cache, position, q_cols, kv_cols, head_dim = kv if kv is not None else (W, W, W, 0, 0, 1)
    cache_strides = k_cache.stride()[:3] if kv is not None else (0, 0, 0)
    config = config or launch_config(B, N, K)
    k_row = _pow2(K) if config["BM"] * _pow2(K) <= 8192 else 0
    _norm_linear_kernel[(triton.cdiv(N, config["BN"]),)](
        x, x.stride(0), W, W if gate is None else gate.weight, W if bias is None else bias,
        W if gate is None or gate.bias is None else gate.bias, norm_w, W if norm_b is None else norm_b,
        y if residual is None else residual, 0 if residual is None else residual.stride(0), y, y.stride(0),
        k_cache, v_cache, position, *cache_strides, W if argmax is None else argmax,
        B, N, K, float(getattr(norm, "eps", 0.0) or 0.0),
        NORM=kind, NORM_BIAS=norm_b is not None, ACT=act, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        KV=kv is not None, Q_COLS=q_cols, KV_COLS=kv_cols, HEAD_DIM=head_dim,
        K_ROW=k_row, ONE_TILE=K <= config["BK"], ARGMAX=argmax is not None, **config, **_pdl(x.device),
    )
    return y


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                     n_head: int, real: torch.Tensor | None = None, config: dict | None = None,
                     scratch: dict | None = None) -> torch.Tensor:
    """The new queries (the first H*D columns of qkv (B, ...)) over keys 0..position of the caches
    (B, H_kv, S, D), hiding positions where `real` (B, S) is False except each query's own; (B, H*D).
    `config`: attention_config's keys (default: attention_config(D, S)). `scratch`: the split programs'
    partial results and counts, from `attention_scratch` (a step keeps one for all its layers; without
    one each call makes its own)."""
    B = qkv.size(0)
    H_kv, S, D = k_cache.size(1), k_cache.size(2), k_cache.size(3)
    config = dict(config or attention_config(D, S))
    splits = config["SPLITS"]
    if splits * config["NB"] * config["BS"] < S:
        covered = splits * config["NB"] * config["BS"]
        raise ValueError(f"attention config {config} covers {covered} of the cache's {S} slots; give SPLITS x NB x BS "
                         f">= {S}, or leave config=None for attention_config(D, S).")
    if scratch is None:
        scratch = attention_scratch(B, n_head, D, splits, qkv.device)
    elif scratch["count"].numel() < B * n_head or scratch["ml"].numel() < 2 * B * n_head * splits:
        raise ValueError(f"the scratch holds {scratch['ml'].numel() // 2} partial results, and {B} rows x {n_head} "
                         f"heads x {splits} splits need more; make it with attention_scratch(B, H, D, splits).")
    y = torch.empty(B, n_head * D, device=qkv.device, dtype=qkv.dtype)
    cb, ch, cs = k_cache.stride()[:3]
    _decode_attention_kernel[(B * n_head * splits,)](
        qkv, qkv.stride(0), k_cache, v_cache, cb, ch, cs, position,
        position if real is None else real, 0 if real is None else real.stride(0),
        scratch["ml"], scratch["acc"], scratch["count"], y, y.stride(0), 1.0 / math.sqrt(D),
        H=n_head, GROUP=n_head // H_kv, D=D, SPLITS_P2=_pow2(splits), HAS_REAL=real is not None, **config,
        **_pdl(qkv.device),
    )
    return y


def attention_scratch(B: int, n_head: int, head_dim: int, splits: int, device) -> dict:
    """What split programs leave for the last of them: (m, l) and acc per (row, head, split), float32, and
    a count per (row, head) that starts at 0 (the kernel sets it back to 0 after each call)."""
    n = B * n_head * max(splits, 1)
    return {"ml": torch.empty(2 * n, device=device, dtype=torch.float32),
            "acc": torch.empty(n * head_dim, device=device, dtype=torch.float32),
            "count": torch.zeros(B * n_head, device=device, dtype=torch.int32)}


def embed(token: torch.Tensor, tok_emb: torch.Tensor, pos_table: torch.Tensor | None, position: torch.Tensor,
          argmax: torch.Tensor) -> torch.Tensor:
    """(B, C): the embeddings of token (B, 1) plus row `position` of `pos_table` (None: no positions),
    in one kernel, which also fills `argmax` (B,) with the smallest int64 for the head to fold into."""
    B, C = token.size(0), tok_emb.size(1)
    x = torch.empty(B, C, device=tok_emb.device, dtype=tok_emb.dtype)
    table = tok_emb if pos_table is None else pos_table
    _embed_kernel[(B,)](token, token.stride(0), tok_emb, table, position, x, argmax, C,
                        HAS_POS=pos_table is not None, BC=_pow2(C), **_pdl(x.device))
    return x


def unpack_argmax(argmax: torch.Tensor, out: torch.Tensor | None = None, feed=None, watch=None,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1) long, into `out` if given: the columns that `norm_linear(..., argmax=...)` (or a draw of
    `lm.fused_sampling`) packed into `argmax` (B,), which is reset for the next one, in one kernel.
    `feed=(token (B, 1), history (B, S), position)`: also write them into token, and into history at
    the 0-d device `position`. `watch=(finished (B,) bool, stop_ids, pad)`: a row already finished
    gets the padding id `pad` (0-d), and is marked when it makes one of `stop_ids` (a power-of-two
    length, -1 in unused slots). `count` (0-d), if given, goes up by one (the draws made)."""
    B = argmax.numel()
    out = torch.empty(B, 1, device=argmax.device, dtype=torch.long) if out is None else out
    token, history, position = feed if feed is not None else (out, out, argmax)
    finished, stops, pad = watch if watch is not None else (out, out, argmax)
    n_stops = stops.numel() if watch is not None else 1
    if n_stops & (n_stops - 1):
        raise ValueError(f"stop_ids holds {n_stops} slots; give a power of two (fill with -1).")
    _unpack_argmax_kernel[(B,)](argmax, out, token, history, position, token.stride(0), history.stride(0),
                                argmax if count is None else count, finished, stops, pad, FEED=feed is not None,
                                WATCH=watch is not None, N_STOPS=n_stops, COUNTS=count is not None,
                                **_pdl(argmax.device))
    return out


_NORMS = (LayerNorm, nn.LayerNorm, RMSNorm)
_ACTIVATIONS = {MLP: GELU, TanhMLP: GELU_TANH, SwiGLU: SWIGLU}  # the feed-forwards it knows, and their kernel


class FusedStep:
    """`step(token)` == `model(token, cache=cache)[0]` (to float rounding) for token (B, 1) on a static
    cache, in fused Triton kernels; it moves the cache's device position by one, like the model.
    `greedy=True`: the head kernel also finds each row's largest logit, and the step returns
    (logits, next (B, 1)), the same token torch.argmax would choose, without an argmax kernel.
    `feed=(token, history)`: greedy steps also write their choice into `token` (B, 1), the next
    step's input, and into `history` (B, max_len + 1) at the position it takes in the cache.
    `watch=(finished, stop_ids, pad)`: and a row that has finished gets the padding id, and is marked
    when it makes a stop id (in the same one kernel, `unpack_argmax`)."""

    def __init__(self, model, cache, greedy: bool = False, feed=None, watch=None):
        reason = self.unsupported(model, cache)
        if reason is not None:
            raise ValueError(f"FusedStep cannot run this model: {reason}.")
        self.model, self.cache, self.greedy, self.feed, self.watch = model, cache, greedy, feed, watch
        config = model.config
        self.H, self.H_kv, self.D = config.n_head, config.kv_heads, config.head_dim
        pos = model.pos_emb
        # one embedding kernel for a table of positions (or none); other position kinds: the model's own
        self.pos_table = pos.weight if type(pos) is LearnedPositionEmbedding else pos.table \
            if type(pos) is SinusoidalPositionEmbedding else None
        self.own_embed = pos is not None and self.pos_table is None
        self.argmax = torch.empty(cache.batch_size, dtype=torch.long, device=cache.cursor.position.device)
        self.chosen = torch.empty(cache.batch_size, 1, dtype=torch.long, device=self.argmax.device)
        self.attention = attention_config(self.D, cache.max_len)  # one scratch for every layer: they run in turn
        self.scratch = attention_scratch(cache.batch_size, self.H, self.D, self.attention["SPLITS"], self.argmax.device)

    @staticmethod
    def unsupported(model, cache=None) -> str | None:
        """Why `model` (with `cache`, if given) cannot decode through FusedStep, or None when it can."""
        if triton is None:
            return "Triton is not installed (PyTorch's CUDA builds bring it)"
        if model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the fused kernels run on CUDA (the model is on {model.device.type})"
        reason = LeanStep.unsupported(model)
        if reason is not None:
            return reason
        config = model.config
        if config.norm_position != "pre":
            return "post-norm blocks normalise a whole output row after the projection"
        if next(model.parameters()).dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"parameters of dtype {next(model.parameters()).dtype}"
        D = config.head_dim
        if D & (D - 1) or D > 256:
            return f"head_dim={D} is not a power of two up to 256"
        for block in model.blocks:
            mlp = block.mlp
            if type(mlp) not in _ACTIVATIONS:
                return f"feed-forward {type(mlp).__name__}"
            ffn = [mlp.w1, mlp.w2, mlp.w3] if type(mlp) is SwiGLU else [mlp.fc, mlp.proj]
            if any(type(layer) is not nn.Linear for layer in [block.attn.qkv, block.attn.proj, *ffn]):
                return "a layer is not a plain nn.Linear (int8 or LoRA)"
            if type(block.norm1) not in _NORMS or type(block.norm2) not in _NORMS:
                return f"norm {type(block.norm1).__name__} is not LayerNorm or RMSNorm"
        if type(model.norm_f) not in _NORMS or type(model.lm_head) is not nn.Linear:
            return "the final norm or head is not a plain LayerNorm/RMSNorm and nn.Linear"
        if cache is not None:
            if not cache.static or any(type(layer) is not StaticCache for layer in cache.layers):
                return "the cache is not a static cache of keys and values"
            if cache.batch_size > MAX_ROWS:
                return f"batch size {cache.batch_size} > {MAX_ROWS} (larger batches are matrix products, cuBLAS's work)"
        return None

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        B = token.size(0)
        position = cache.cursor.position
        real = cache.cursor.real
        H, H_kv, D = self.H, self.H_kv, self.D
        if self.own_embed:
            x = model.embed(token, position).view(B, -1)
            self.argmax.fill_(-(2**63) + 1)
        else:
            x = embed(token, model.tok_emb.weight, self.pos_table, position, self.argmax)
        rope = model.rope
        for block, layer in zip(model.blocks, cache.layers):
            attn, mlp = block.attn, block.mlp
            kv = None if rope is not None else (layer.k, layer.v, position, H * D, H_kv * D, D)
            qkv = norm_linear(x, attn.qkv, block.norm1, kv=kv)
            if rope is not None:  # rotate the new query and key, then store key and value
                q, k, v = qkv.view(B, 1, H + 2 * H_kv, D).transpose(1, 2).split([H, H_kv, H_kv], dim=1)
                q, k = rope(q, k, offset=position)
                layer.k.index_copy_(2, position.view(1), k)
                layer.v.index_copy_(2, position.view(1), v)
                qkv = q.transpose(1, 2).reshape(B, H * D)
            y = decode_attention(qkv, layer.k, layer.v, position, H, real, self.attention, self.scratch)
            x = norm_linear(y, attn.proj, residual=x)
            if type(mlp) is SwiGLU:
                h = norm_linear(x, mlp.w1, block.norm2, SWIGLU, gate=mlp.w2)
                x = norm_linear(h, mlp.w3, residual=x)
            else:
                h = norm_linear(x, mlp.fc, block.norm2, _ACTIVATIONS[type(mlp)])
                x = norm_linear(h, mlp.proj, residual=x)
        cache.end(1)
        model.aux_loss = None
        logits = norm_linear(x, model.lm_head, model.norm_f, argmax=self.argmax if self.greedy else None)
        if not self.greedy:
            return logits.view(B, 1, -1)
        feed = None if self.feed is None else (*self.feed, position)
        return logits.view(B, 1, -1), unpack_argmax(self.argmax, self.chosen, feed, self.watch)


__all__ = ["FusedStep", "MAX_ROWS", "SPLIT_KEYS", "attention_config", "attention_scratch", "decode_attention", "embed",
           "launch_config", "norm_linear", "unpack_argmax"]
