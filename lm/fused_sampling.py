"""Drawing the next token on a GPU in two small Triton kernels: the Gumbel-max trick.

`torch.multinomial(softmax(x / T), 1)` at batch 1 on an H200 is about 66 us inside a CUDA graph:
a softmax over one row of 50,304 logits, checks of the probabilities, exponential noise, a division
and an argmax, each a kernel that runs a single row on one or two of the GPU's 132 SMs. The same
draw is an argmax: for independent Gumbel noise g_v = -log(-log(u_v)), u_v uniform in (0, 1),

    argmax_v (x_v / T + g_v)   is distributed as   softmax(x / T)

(the Gumbel-max trick), and needs no softmax at all. So:

1. `draw_kernel`: program (row, block of columns) adds the noise to its block of x / T and folds
   the largest score and its column into one int64 per row with an atomic max (the same packing
   as the fused head's argmax, `lm.fused_decode._pack_argmax`: ties go to the first column);
2. `lm.fused_decode.unpack_argmax`: one program per row unpacks the column, resets the
   packed maximum for the next draw, gives a row that has finished the padding id and notes whether
   the row has just made one of the stop ids, stores the token where the next step reads it and in
   the history, and moves the draw count on.

The noise comes from Philox (Triton's `tl.philox`), keyed by the seed, with the counter (row * V +
column, the count of draws made since `Draw.reseed`): a seeded generation draws the same tokens each
time, with the graph and without it, as long as the logits are the same, and two seeds never share
their numbers. These draws are not
`torch.multinomial`'s (on a CPU generation keeps that); they follow the same distribution, which
tests/test_fused_decode.py checks with a chi-square test.

Top-k alone (the most common filter; transformers' default of 50) is folded into the draw: the
k-th largest of x / T comes from `lm.fused_topk`'s two kernels instead of `torch.topk`, and
`draw_kernel` scores only the columns at or above it, as `top_k_filter` keeps them (ties at the
k-th value included).

Top-p, min-p and the penalties (and top-k with them) are applied to x first
(`lm.sampling.process_logits`), as -inf, which the draw never picks.
"""

from __future__ import annotations

import torch

from .fused_decode import _pdl, triton, unpack_argmax
from .fused_topk import kth_largest
from .sampling import SamplingConfig, check_a_token_is_left, process_logits, top_k_filter

if triton is not None:
    import triton.language as tl

LOWEST = -9223372036854775807  # below every packed (score, column)
BLOCK = 1024  # columns per program of the draw: 50 programs for GPT-2's 50,304


def draw_kernel(X, stride_x, N, inv_temperature, SEED, COUNT, AMAX, THRESHOLD, BN: tl.constexpr,
                HAS_THRESHOLD: tl.constexpr, PDL: tl.constexpr):
    """Row `program_id(0)`, columns of block `program_id(1)`: score = X * inv_temperature + Gumbel
    noise (-inf where X * inv_temperature < THRESHOLD[row], with HAS_THRESHOLD); the largest score
    of the block and its column go into AMAX[row] (atomic max of packed)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
    # Philox keyed by the seed, its counter (column and row; the draw count): every draw of every seed
    # its own numbers, with no overlap between nearby seeds or counts
    count = tl.load(COUNT)
    where = row * N + cols
    zero = where * 0
    bits, _, _, _ = tl.philox(tl.load(SEED), where, zero + (count & 0x7FFFFFFF).to(tl.int32),
                              zero + ((count >> 31) & 0x7FFFFFFF).to(tl.int32), zero)
    u = tl.uint_to_uniform_float(bits)  # in [0, 1): u = 0 gives -inf, never chosen
    y = x * inv_temperature
    score = y - tl.log(-tl.log(u))
    if HAS_THRESHOLD:
        score = tl.where(y >= tl.load(THRESHOLD + row), score, float("-inf"))
    packed = tl.where(ok, _pack_argmax(score, cols), -9223372036854775807)  # LOWEST
    tl.atomic_max(AMAX + row, tl.max(packed, axis=0))


if triton is not None:
    from .fused_decode import _pack_argmax  # the jitted packing, called from inside draw_kernel

    _draw_kernel = triton.jit(draw_kernel)


def draw_input(logits: torch.Tensor, sampling: SamplingConfig, previous_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int | None]:
    """What `Draw` draws from for (B, V) logits under `sampling` (temperature > 0), at which
    temperature, and with which top-k: the raw logits at the sampling temperature and top-k when
    nothing else is on, else the processed logits (`process_logits`: penalties, given each row's
    history `previous_ids`; temperature; filters, as -inf) at temperature 1 with no top-k."""
    if sampling.top_p is None and sampling.min_p is None and not sampling.needs_history:
        return logits, sampling.temperature, sampling.top_k
    if previous_ids is None:
        previous_ids = logits.new_zeros(logits.size(0), 0, dtype=torch.long)
    return process_logits(logits, previous_ids, sampling, mask), 1.0, None


def usable(device: torch.device) -> bool:
    """Whether generation on `device` draws with these kernels: on CUDA, with Triton (which PyTorch's
    CUDA wheels bring)."""
    return triton is not None and torch.device(device).type == "cuda"


class Draw:
    """The state of a generation's draws on a GPU: the seed and the count of draws made (0-d device
    tensors, so that a CUDA graph reads them where they are), and the packed maximum per row.

        draw = Draw(batch_size, device)
        draw.reseed(1234)
        next_ids = draw(logits, temperature=0.8)           # (B, 1): a draw from softmax(logits / 0.8)
        next_ids = draw(logits, 0.8, top_k=50)             # ... from the 50 largest only

    `feed=(token, history, position)` also stores each choice in `token` (B, 1) and in `history`
    (B, S) at `position` (a 0-d device tensor); `watch=(finished, stop_ids, pad)` gives rows already
    `finished` (B,) bool the padding id `pad` (0-d), and marks the rows whose choice is one of
    `stop_ids` (a 1-d tensor of a power-of-two length, -1 in unused slots). Nothing waits for the GPU."""

    def __init__(self, batch_size: int, device):
        device = torch.device(device)
        self.seed = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.amax = torch.full((batch_size,), LOWEST, dtype=torch.long, device=device)
        self.next = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._top_k_buffers: dict = {}  # lm.fused_topk's candidates and threshold, made on the first top-k draw

    def reseed(self, seed: int) -> None:
        """Start the draws afresh from `seed` (an integer of up to 63 bits)."""
        self.seed.fill_(seed)
        self.count.zero_()

    def __call__(self, logits: torch.Tensor, temperature: float = 1.0, feed=None, watch=None,
                 top_k: int | None = None) -> torch.Tensor:
        B, N = logits.shape
        if B != self.amax.numel():
            raise ValueError(f"this Draw was made for {self.amax.numel()} rows, got logits of {B}.")
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        pdl = _pdl(logits.device)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be a positive integer or None (every column).")
        if top_k is not None and top_k >= N:  # keeps every column
            top_k = None
        threshold = None
        if top_k is not None:  # the k-th largest of x / T (lm.fused_topk), in buffers a graph can keep
            threshold = kth_largest(logits, top_k, 1.0 / temperature, self._top_k_buffers)
            if threshold is None:  # a k too large for the kernels: torch.topk's filter, then the plain draw
                logits, temperature = top_k_filter(logits.float() / temperature, top_k), 1.0
        _draw_kernel[(B, triton.cdiv(N, BLOCK))](logits, logits.stride(0), N, 1.0 / temperature, self.seed,
                                                self.count, self.amax, self.amax if threshold is None else threshold,
                                                BN=BLOCK, HAS_THRESHOLD=threshold is not None, **pdl)
        return unpack_argmax(self.amax, self.next, feed, watch, self.count)

    def choose(self, logits: torch.Tensor, sampling: SamplingConfig, previous_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, feed=None, watch=None) -> torch.Tensor:
        """(B, 1): a draw from (B, V) `logits` under `sampling` (temperature > 0), as `choose_next`
        draws, given each row's history `previous_ids` (B, t) and its `mask` for the penalties
        (`draw_input`); a SamplingError if no_repeat_ngram_size left a row nothing. `feed`, `watch`:
        see the class."""
        x, temperature, top_k = draw_input(logits, sampling, previous_ids, mask)
        check_a_token_is_left(x, sampling)
        return self(x, temperature, feed=feed, watch=watch, top_k=top_k)


__all__ = ["Draw", "draw_input", "draw_kernel", "usable"]
