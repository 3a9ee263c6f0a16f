"""Memory of a training step, and the largest micro-batch that fits (seed 004's "dynamic batch size").

One step of AdamW training holds at its peak, for P bytes of parameters:
    params        P
    grads         one gradient per parameter, of its dtype: P
    optimizer     AdamW's exp_avg and exp_avg_sq, two fp32 tensors per parameter: 2P in fp32
    activations   the tensors autograd saves in the forward pass for the backward pass; they grow
                  with the batch B (linearly) and with the window T (linearly, or faster), on top of
                  the output head's weight gradient, which the trainer's fused loss works out in the
                  forward pass and keeps for the backward pass (`lm.losses`)
(plus `buffers`: tensors the model keeps that are not parameters, such as RoPE's tables).

`training_memory` measures each part on one real step: nothing is taken from a formula. The step is
the trainer's own (`lm.trainer.Trainer.train_step` on random tokens), so what is measured is what
training runs: autocast, gradient scaling for fp16, clipping and the fused AdamW.
`find_batch_size` searches for the largest batch (doubling, then bisecting):
- on a GPU it runs real steps, and a batch fits when its step does not run out of memory;
- on a CPU running out of memory cannot be caught (the operating system kills the process), so
  a batch fits when the measured need is at most the `memory_budget` you give.

    lm.training_memory(model, batch_size=8, seq_len=128)    # {"params": ..., "activations": ..., "total": ...}
    lm.find_batch_size(model, seq_len=128)                   # on a GPU
    lm.find_batch_size(model, 128, memory_budget=4 * 2**30)  # on a CPU: the largest batch within 4 GiB

Both leave the model as they found it: weights, buffers, gradients, train/eval mode and the random
generators (the trial steps draw dropout masks from them).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from typing import Callable

import torch
from torch import nn

from .device import resolve_device
from .trainer import PRECISIONS, TrainConfig, Trainer, check_precision

log = logging.getLogger(__name__)


# ---- measuring one step --------------------------------------------------------------------------
def training_memory(model: nn.Module, batch_size: int, seq_len: int, *, precision: str = "fp32") -> dict[str, int]:
    """Bytes one training step of `model` needs at micro-batch `batch_size` and window `seq_len`,
    measured on a real step (forward, backward, AdamW step) on the model's device.

    Returns {"params", "buffers", "grads", "optimizer", "activations", "total"}: each tensor is
    counted once, by the memory it lies in (tied weights once; a view adds nothing), and
    "activations" are the tensors autograd saved for the backward pass that are not parameters or
    buffers. The step's short-lived temporaries are not counted. With gradient checkpointing, the
    activations recomputed in the backward pass are not counted either.
    """
    _check_model(model, seq_len)
    _check_count("batch_size", batch_size)
    _check_precision(precision)
    with _unchanged(model):
        return _measure_step(model, batch_size, seq_len, precision)


def _measure_step(model: nn.Module, batch_size: int, seq_len: int, precision: str) -> dict[str, int]:
    params = {_storage_key(p): _storage_bytes(p) for p in model.parameters()}
    buffers = {_storage_key(b): _storage_bytes(b) for b in model.buffers()}
    buffers = {key: n for key, n in buffers.items() if key not in params}
    saved: dict[tuple, int] = {}
    grads: dict[tuple, int] = {}
    in_forward = False  # only the model's forward pass saves activations; the rest of the step is not counted

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if in_forward and key not in params and key not in buffers:
            saved[key] = _storage_bytes(tensor)
        return tensor

    def forward_starts(*_):
        nonlocal in_forward
        in_forward = True

    def forward_ends(*_):
        nonlocal in_forward
        in_forward = False

    def count_grads(*_):  # just before the optimizer step, when every gradient exists
        grads.update({_storage_key(p.grad): _storage_bytes(p.grad) for p in model.parameters() if p.grad is not None})

    trainer = _trial_trainer(model, batch_size, seq_len, precision)
    hooks = [model.register_forward_pre_hook(forward_starts), model.register_forward_hook(forward_ends),
             trainer.optimizer.register_step_pre_hook(count_grads)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.train_step()
    finally:
        for hook in hooks:
            hook.remove()
    state = {_storage_key(t): _storage_bytes(t) for s in trainer.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)}
    parts = {"params": sum(params.values()), "buffers": sum(buffers.values()), "grads": sum(grads.values()),
             "optimizer": sum(state.values()), "activations": sum(saved.values())}
    return {**parts, "total": sum(parts.values())}


def _trial_trainer(model: nn.Module, batch_size: int, seq_len: int, precision: str) -> Trainer:
    """A Trainer of `model` on random tokens whose `train_step()` is one training step at `batch_size`."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (batch_size * (seq_len + 1) + 1,), generator=generator)
    config = TrainConfig(max_steps=1, batch_size=batch_size, seq_len=seq_len, precision=precision, warmup_steps=0,
                         progress=False)
    model.train()
    return Trainer(model, tokens, tokens, config)


# ---- searching for the largest batch -------------------------------------------------------------
def find_batch_size(
    model: nn.Module,
    seq_len: int,
    *,
    device: str | torch.device | None = None,
    start: int = 1,
    max_batch_size: int = 1024,
    memory_budget: int | None = None,
    precision: str = "fp32",
    fits: Callable[[int], bool] | None = None,
) -> int:
    """The largest micro-batch (at most `max_batch_size`) for which one full training step of `model`
    with windows of `seq_len` tokens fits in memory.

    The search doubles the batch from `start` until a step fails (or reaches `max_batch_size`), then
    bisects between the last batch that fitted and the first that failed: about 2 log2(answer)
    trials. Every trial is logged (logger "lm.memory", level INFO).

    - On CUDA (`device`, default: the model's device) each trial runs the trainer's step: forward,
      backward, gradient clipping and an AdamW step. A batch fits unless it raises torch.OutOfMemoryError
      and, with `memory_budget` (bytes), unless its peak allocated memory exceeds the budget.
    - Elsewhere (CPU, MPS) running out of memory cannot be caught, so `memory_budget` is required:
      a batch fits when `training_memory(...)["total"]` is at most the budget. That count leaves
      out the step's short-lived temporaries, which raise the real peak above it, and the trial
      itself allocates the memory: give a budget well below the machine's free memory.
    - `fits(batch_size) -> bool` replaces the measurement (for tests, or another criterion); then
      `model` and `seq_len` are not used.

    `precision` ("fp32", "bf16" or "fp16") runs the forward pass under autocast, as training does.
    The model is left unchanged (see the module's docstring) and on its own device.
    """
    _check_count("start", start)
    _check_count("max_batch_size", max_batch_size)
    if start > max_batch_size:
        raise ValueError(f"start={start} is larger than max_batch_size={max_batch_size}; lower start or raise "
                         f"max_batch_size.")
    if fits is not None:
        if not callable(fits):
            raise TypeError(f"fits must be a function batch_size -> bool, got {type(fits).__name__}.")
        return _search(fits, start, max_batch_size, f"fits({start}) is False: not even batch size start={start} "
                                                    f"fits; lower start")

    _check_model(model, seq_len)
    _check_precision(precision)
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes, e.g. 8 * 2**30 for "
                         f"8 GiB.")
    home = _model_device(model)
    device = home if device is None else resolve_device(device)
    if device.type != "cuda" and memory_budget is None:
        raise ValueError(f"on {device.type} running out of memory cannot be caught safely, so find_batch_size needs "
                         f"memory_budget (bytes the step may use, e.g. memory_budget=4 * 2**30 for 4 GiB); "
                         f"or run it on a CUDA device.")
    if device.type == "cuda":
        check_precision(device, precision)

    model.to(device)
    try:
        with _unchanged(model):
            if device.type == "cuda":
                def step_fits(batch_size: int) -> bool:
                    return _fits_on_gpu(model, batch_size, seq_len, precision, memory_budget)
            else:
                def step_fits(batch_size: int) -> bool:
                    return _measure_step(model, batch_size, seq_len, precision)["total"] <= memory_budget
            budget = "" if memory_budget is None else f" within memory_budget={memory_budget:,} bytes"
            return _search(step_fits, start, max_batch_size,
                           f"not even batch size start={start} fits{budget} on {device} at seq_len={seq_len}, "
                           f"precision={precision!r}; lower start, shorten seq_len, try precision='bf16' or "
                           f"gradient checkpointing, or give more memory")
    finally:
        model.to(home)


def _search(fits: Callable[[int], bool], start: int, max_batch_size: int, failure: str) -> int:
    """Double from `start` until `fits` fails or `max_batch_size` is reached, then bisect."""
    trials = 0

    def trial(batch_size: int) -> bool:
        nonlocal trials
        trials += 1
        ok = bool(fits(batch_size))
        log.info("trial %d: batch size %d %s", trials, batch_size, "fits" if ok else "does not fit")
        return ok

    good, bad = None, None
    batch_size = start
    while True:
        if not trial(batch_size):
            bad = batch_size
            break
        good = batch_size
        if batch_size == max_batch_size:
            break
        batch_size = min(2 * batch_size, max_batch_size)
    if good is None:
        raise ValueError(failure + ".")
    while bad is not None and bad - good > 1:  # good fits, bad does not: the answer lies in [good, bad)
        middle = (good + bad) // 2
        if trial(middle):
            good = middle
        else:
            bad = middle
    log.info("largest batch size: %d (%d trials)", good, trials)
    return good


def _fits_on_gpu(model: nn.Module, batch_size: int, seq_len: int, precision: str, memory_budget) -> bool:
    device = _model_device(model)
    torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        _trial_trainer(model, batch_size, seq_len, precision).train_step()
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        ok = False
    # Out of the except block: the traceback, whose frames hold the step's tensors, is gone.
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    if ok and memory_budget is not None:
        ok = torch.cuda.max_memory_allocated(device) <= memory_budget
    return ok


# ---- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _unchanged(model: nn.Module):
    """Run trial steps on `model`, then put back its weights, buffers, gradients, train/eval mode and
    the random generators. Trials start without gradients (backward would add to existing ones)."""
    was_training = model.training
    device = _model_device(model)
    tensors = lambda: itertools.chain(model.named_parameters(), model.named_buffers())  # noqa: E731
    saved = {name: t.detach().to("cpu", copy=True) for name, t in tensors()}  # off the GPU: room for trials
    grads = [(p, p.grad) for p in model.parameters()]
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=rng_devices):
        try:
            for p in model.parameters():
                p.grad = None
            yield
        finally:
            with torch.no_grad():
                for name, t in tensors():
                    t.copy_(saved[name])
            for p, grad in grads:
                p.grad = grad
            model.train(was_training)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_model(model, seq_len) -> None:
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "block_size") or not hasattr(config, "vocab_size"):
        raise TypeError(f"model must be an lm.GPT (a module with config.block_size and config.vocab_size), "
                        f"got {type(model).__name__}.")
    _check_count("seq_len", seq_len)
    if seq_len > config.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds the model's block_size={config.block_size}; pass "
                         f"seq_len <= {config.block_size}, or build the model with a larger block_size.")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
