"""The training loss without the logits: the output head and cross-entropy fused, a chunk of rows at a time.

The plain way computes every position's scores, then their cross-entropy in float32:

    logits = hidden @ weight.T                          (N, V): N = B*T positions, V the vocabulary
    loss = F.cross_entropy(logits.float(), targets)     a float32 copy, and its log-softmax, kept for backward

At GPT-2 124M with 16 x 1024 tokens and V = 50304 each (N, V) float32 tensor is 3.3 GB, far more than
anything else a step holds, and the passes over them are about 8% of a GPU step.
`linear_cross_entropy(hidden, weight, targets)` returns the same number without ever holding an (N, V)
tensor. It walks over chunks of rows; for each it computes the chunk's logits, their loss, and at once
the gradient of the mean loss with respect to them,

    d loss / d logits[i] = (softmax(logits[i]) - one_hot(targets[i])) / n_valid     (0 where ignored)

which it turns straight into what backward needs, then drops:

    grad_hidden[chunk] = g @ weight          grad_weight += g.T @ hidden[chunk]

The backward pass only scales those two by the incoming gradient (1 for `loss.backward()`, 1/k with k
micro-batches, the fp16 scaler's factor). The head's matrix products cost what they cost before (one
forward, two backward); they just all run during the forward pass.

Chunk size. `default_chunk_rows(V)` rows, so that a chunk's logits hold at most 2**26 numbers: 256 MiB
in float32 (1334 rows of GPT-2's 50304, rounded down to 1280, a multiple of 64 for the matrix units).
Large enough that each chunk's products are big matrix products that run at full speed, small enough
to be a rounding error next to the (N, V) tensors it replaces. It depends on V only, so a run's chunks
never change with the batch, the device or the dtype.

Dtypes. The products run in the dtype `nn.Linear` would use: the inputs' own, or under autocast the
autocast dtype (bfloat16, say), to which both are cast as `nn.Linear` casts them. Everything after the
products, the logsumexp, the loss and the softmax, is float32 (float64 stays float64), as
`F.cross_entropy(logits.float(), ...)` has it; the gradient g is rounded to the product dtype before
its two products, as autograd rounds it when it goes back through the cast. grad_weight adds up over
the chunks in float32 and is rounded to the weight's dtype once, at the end: under autocast
that is one rounding of the whole sum to bfloat16, what `nn.Linear`'s single (N-long) product gives,
instead of one per chunk; and what is kept for backward is bfloat16, half the bytes.

Memory, beyond the inputs: kept for backward, grad_hidden (N, C) and grad_weight (V, C) in the product
dtype (autograd casts them back to the inputs' dtype, float32 under autocast); while the forward runs,
the float32 accumulator (V, C) and one chunk's logits, 4 bytes per number in float32 and 6 with a
bfloat16 product (its output, then the float32 working copy, later the rounded gradient). At GPT-2's
shape under bfloat16 autocast: 25 MB + 77 MB kept, 154 MB + 380 MB while it runs, against 3.3 GB kept
(and as much again while the plain loss runs).

Only the gradients some input needs are computed (`ctx.needs_input_grad`: the head of a LoRA model is
frozen, so only grad_hidden); with gradients off, or when no input requires them, only the loss is.
Targets equal to `ignore_index` add nothing to the loss or to n_valid; when every target is ignored
the loss is nan (0 / 0), as `F.cross_entropy` gives, and the gradients are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_NUMBERS = 2 ** 26  # logits per chunk at most: 256 MiB in float32 (see the module docstring)


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: as many as keep a chunk's logits within CHUNK_NUMBERS, rounded down to a multiple
    of 64 (matrix units like multiples) once there are that many; at least 1."""
    rows = max(1, CHUNK_NUMBERS // vocab_size)
    return rows - rows % 64 if rows >= 64 else rows


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of the logits `hidden @ weight.T` against `targets`, without computing
    them all at once: `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)`,
    in chunks of `chunk_rows` rows (default: `default_chunk_rows(V)`), gradients included.

    hidden (N, C) or (B, T, C); weight (V, C), as `nn.Linear(C, V, bias=False).weight`; targets (N,) or
    (B, T), integers in [0, V) or `ignore_index`. Returns a 0-d tensor, float32 (float64 for float64
    inputs), also under autocast. See the module docstring for the method, dtypes and memory.

    Raises ValueError on inputs of the wrong shape, dtype or device. Targets outside [0, V) are
    reported on a CPU (outside torch.compile, which would have to break its graph for the test); on a
    GPU checking them would make the host wait for the device, so they are not checked, and the gather
    that reads them stops the program with a device-side assert, as `F.cross_entropy` does there.
    """
    _check(hidden, weight, targets, ignore_index, chunk_rows)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1).long()
    if flat_targets.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_target_range(flat_targets, weight.size(0), ignore_index)
    dtype = _product_dtype(flat_hidden, weight)
    flat_hidden, weight = flat_hidden.to(dtype), weight.to(dtype)  # as autocast casts nn.Linear's inputs
    rows = default_chunk_rows(weight.size(0)) if chunk_rows is None else chunk_rows
    if torch.is_grad_enabled() and (flat_hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(flat_hidden, weight, flat_targets, ignore_index, rows)
    return _chunked(flat_hidden, weight, flat_targets, ignore_index, rows, False, False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss, with the gradients worked out in the forward pass (`_chunked`) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                rows: int) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, ignore_index, rows,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # out of place: a graph kept for a second backward (retain_graph=True) must find them unchanged
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None, None)


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, rows: int,
             want_grad_hidden: bool, want_grad_weight: bool):
    """(loss, grad_hidden or None, grad_weight or None) of the mean loss, one chunk of `rows` rows at a time.
    hidden (N, C) and weight (V, C) in the product dtype, targets (N,) int64."""
    n = hidden.size(0)
    wide = torch.promote_types(hidden.dtype, torch.float32)  # float32 after the products (float64 stays)
    valid = targets != ignore_index
    n_valid = valid.sum()
    # each row's share of the mean: 1 / n_valid, or 0 where ignored (and everywhere when all are: then the
    # gradients are 0, while the loss is 0 / 0 = nan, as F.cross_entropy has both)
    share = valid.to(wide) / n_valid.clamp(min=1)
    safe_targets = torch.where(valid, targets, 0)  # an ignored row reads class 0, and its share is 0
    loss_sum = torch.zeros((), dtype=wide, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_grad_weight else None
    for start in range(0, n, rows):
        h = hidden[start:start + rows]
        t = safe_targets[start:start + rows, None]
        logits = F.linear(h, weight).to(wide)  # (rows, V); the product's own output when it is already wide
        top = logits.amax(dim=1, keepdim=True)
        target_logit = logits.gather(1, t)
        logits.sub_(top).exp_()  # in place from here on: no second (rows, V) tensor while the chunk runs
        total = logits.sum(dim=1, keepdim=True)
        row_loss = total.log() + top - target_logit  # logsumexp - the target's logit
        loss_sum = loss_sum + torch.where(valid[start:start + rows, None], row_loss, 0).sum()
        if not (want_grad_hidden or want_grad_weight):
            continue
        share_here = share[start:start + rows, None]
        logits.mul_(share_here / total).scatter_add_(1, t, -share_here)  # (softmax - one_hot) * share
        g = logits.to(hidden.dtype)
        del logits
        if want_grad_hidden:
            grad_hidden[start:start + rows] = g @ weight
        if want_grad_weight:
            if g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.t(), h)
            else:  # a bfloat16 product, added up in float32
                grad_weight += g.t() @ h
        del g  # (the same tensor as logits when no cast was needed): not alive beside the next chunk's
    loss = loss_sum / n_valid
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def _product_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply these in: autocast's, where it is on and casts them (floating
    point other than float64), else their own, which must then agree."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64 and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} and weight {weight.dtype}; give both the same dtype, or run "
                         f"under torch.autocast, which casts both.")
    return hidden.dtype


def _check(hidden, weight, targets, ignore_index, chunk_rows) -> None:
    """Shapes, dtypes and devices: checks that need nothing from the device, so never make the host wait."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(value).__name__}.")
    if hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point (N, C) or (B, T, C) tensor, got {hidden.dtype} of "
                         f"shape {tuple(hidden.shape)}.")
    if weight.dim() != 2 or not weight.is_floating_point() or weight.size(1) != hidden.size(-1):
        raise ValueError(f"weight must be a floating-point (V, C) tensor with C = hidden's last size "
                         f"{hidden.size(-1)}, got {weight.dtype} of shape {tuple(weight.shape)}.")
    if weight.size(0) == 0:
        raise ValueError("weight has shape (0, C): there must be at least one class.")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}; for hidden of shape {tuple(hidden.shape)} "
                         f"it must be {tuple(hidden.shape[:-1])}, one target per row.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class ids, got {targets.dtype}.")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device} and {targets.device}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index={ignore_index!r} must be an int (-100 by default).")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r} must be a positive int, or None for "
                         f"default_chunk_rows(V) = {default_chunk_rows(weight.size(0))} at V = {weight.size(0)}.")


def _check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets outside [0, V) that are not ignore_index: a ValueError naming the first (CPU tensors only)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] (of the flattened targets) is {int(targets[i])}, outside [0, {vocab_size}) "
                         f"for a weight of {vocab_size} rows; use ignore_index={ignore_index} for no target.")


__all__ = ["CHUNK_NUMBERS", "default_chunk_rows", "linear_cross_entropy"]
