"""The k-th largest value of each row on a GPU, in two small Triton kernels, for top-k sampling.

Top-k sampling keeps the k most likely tokens: everything below the row's k-th largest logit goes.
`torch.topk(x, 50)` over one row of GPT-2's 50,304 logits takes 50 us (k = 50) to 63 us (k = 200)
inside a CUDA graph on an H200, a fifth of a whole decoding step of the model; splitting the row
in chunks first only brought it to 41 us, so the cost is not the row's length. But the filter
needs no sorted top k, only the threshold, and that takes two kernels of about 5 us each:

1. `block_top_kernel`: program (row, block of 2,048 columns) keeps the K' largest of its block
   (K' = k rounded up to a power of two, 2 at least; Triton's bitonic `tl.topk`) as candidates;
2. `threshold_kernel`: one program per row takes the k-th largest of the candidates.

That is exactly the row's k-th largest: a block holds at most k of the row's k largest values,
and all of those are among its K' >= k candidates. Ties are no exception (the k-th largest of
a multiset). `kth_largest` plans the blocks (`top_k_plan`: wider blocks when k is large, so the
candidates fit one program) and returns None where they cannot (k above MAX_KEPT); callers then
use `torch.topk`. `lm.sampling.top_k_filter` uses it on CUDA, `lm.fused_sampling.Draw` inside the draw.
"""

from __future__ import annotations

import torch

from .fused_decode import _cdiv, _pdl, _pow2, triton

if triton is not None:
    import triton.language as tl

BLOCK_COLUMNS = 2048  # on an H200 at k = 50, blocks of 1,024 made 4,096 candidates, twice as slow to sort
MAX_CANDIDATES = 8192  # the most candidates one row's threshold program sorts through
LARGEST_TOP_BLOCK = 8192  # the widest block one program of block_top_kernel takes the top K' of
MAX_KEPT = 1024  # the most candidates one such program keeps


def block_top_kernel(X, stride_x, N, scale, CANDIDATES, BN: tl.constexpr, KP: tl.constexpr,
                     PDL: tl.constexpr):
    """Row `program_id(0)`, block `program_id(1)` of BN columns: its KP largest values of X * scale
    (in float32, as lm.fused_sampling's draw_kernel computes x / T), in CANDIDATES[row, block * KP :][:KP]."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BN + tl.arange(0, BN)
    x = tl.load(X + row * stride_x + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    top = tl.topk(x * scale, KP)
    tl.store(CANDIDATES + (row * tl.num_programs(1) + block) * KP + tl.arange(0, KP), top)


def threshold_kernel(CANDIDATES, used, k, THRESHOLD, M: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """Row `program_id(0)`: THRESHOLD[row] = the k-th largest of its `used` candidates (k <= KP)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    i = tl.arange(0, M)
    candidates = tl.load(CANDIDATES + row * used + i, mask=i < used, other=float("-inf"))
    top = tl.topk(candidates, KP)  # descending
    kth = tl.max(tl.where(tl.arange(0, KP) == k - 1, top, float("-inf")), axis=0)
    tl.store(THRESHOLD + row, kth)


def top_k_plan(vocab_size: int, k: int) -> tuple[int, int] | None:
    """(columns per block_top_kernel program, candidates kept per block) for the k-th largest of
    rows of `vocab_size`, or None where the candidates would not fit one program (k above
    MAX_KEPT): the blocks widen from BLOCK_COLUMNS until their candidates fit MAX_CANDIDATES."""
    kept = max(2, _pow2(min(k, vocab_size)))  # tl.topk needs two at least
    width = BLOCK_COLUMNS
    while width <= LARGEST_TOP_BLOCK and kept <= MAX_KEPT:
        if kept < width and _cdiv(vocab_size, width) * kept <= MAX_CANDIDATES:
            return width, kept
        width *= 2
    return None


if triton is not None:
    _block_top_kernel = triton.jit(block_top_kernel)
    _threshold_kernel = triton.jit(threshold_kernel)


def usable(x: torch.Tensor) -> bool:
    """Whether `kth_largest` runs on `x`: (B, V) on CUDA, with Triton."""
    return triton is not None and x.is_cuda and x.dim() == 2


def kth_largest(x: torch.Tensor, k: int, scale: float = 1.0, buffers: dict | None = None) -> torch.Tensor | None:
    """The k-th largest of each row of (B, V) `x * scale` (computed in float32, as lm.fused_sampling's
    draw computes x / T), as a (B,) float32 tensor; None where the kernels do not run (see `usable`,
    `top_k_plan`). `buffers`, a dict kept by the caller, holds the candidates and the result between
    calls, so a CUDA graph that records the kernels reads and writes the same memory on every replay."""
    if not usable(x):
        return None
    B, N = x.shape
    plan = top_k_plan(N, k)
    if plan is None or B == 0:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    width, kept = plan
    blocks = _cdiv(N, width)
    buffers = {} if buffers is None else buffers
    candidates, threshold = buffers.get("candidates"), buffers.get("threshold")
    if candidates is None or candidates.shape != (B, blocks * kept) or candidates.device != x.device:
        candidates = buffers["candidates"] = torch.empty(B, blocks * kept, dtype=torch.float32, device=x.device)
    if threshold is None or threshold.shape != (B,) or threshold.device != x.device:
        threshold = buffers["threshold"] = torch.empty(B, dtype=torch.float32, device=x.device)
    pdl = _pdl(x.device)
    _block_top_kernel[(B, blocks)](x, x.stride(0), N, scale, candidates, BN=width, KP=kept, num_warps=8, **pdl)
    _threshold_kernel[(B,)](candidates, blocks * kept, min(k, N), threshold, M=_pow2(blocks * kept), KP=kept,
                            num_warps=16, **pdl)
    return threshold


__all__ = ["block_top_kernel", "kth_largest", "threshold_kernel", "top_k_plan", "usable"]
