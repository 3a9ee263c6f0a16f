"""Training: AdamW, warmup then cosine decay, accumulation, mixed precision, EMA, checkpoints, resume.

    for each optimizer step:
        lr = lr_at(step)                          # linear warmup, then cosine down to min_lr
        for each of grad_accum_steps micro-batches:
            with autocast(precision):             # fp32, bf16, or fp16 (with a gradient scaler)
                loss = model(x, y) / grad_accum_steps   # the loss alone: no logits (return_logits=False)
            loss.backward()                       # gradients add up over the micro-batches
        clip the gradient norm; optimizer.step(); update the EMA of the weights
        every eval_interval steps: estimate train/val loss, write last.pt (and best.pt when val
        improved), log metrics, and stop early when val has not improved for `patience` evaluations

The same code runs in one process or in several under `torchrun` (see `lm.distributed`): each
process takes its share of every batch and the gradients are averaged, so the losses match a
single process with the same global batch.

Nothing is lost when a run stops early: Ctrl-C (SIGINT) and SIGTERM only set a flag, and the loop
stops at the next step boundary after saving a last.pt that describes exactly the finished steps;
saves are atomic, a resumed run drops the metrics rows logged after its checkpoint and mends a best.pt
that a crash left behind, and a lock on out_dir keeps a second run out (`fit`, `run_lock`).

The Trainer resolves precision="auto" (bf16 where the GPU has it), sampling="auto" (epoch when
training by epochs, else random), `epochs` (into max_steps: it knows the data and the batch) and
resume="auto" (continue the run in out_dir/last.pt when there is one, after checking that it is a
run of the same model).
batch_size="auto" needs trial steps of this very trainer, so it is resolved one level up, by
`lm.training` (`lm.train` and `lm train`). The optimizer and schedule are in `lm.optim`, the EMA in
`lm.ema`.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import functools
import inspect
import math
import os
import platform
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, canonical_settings
from .data import SAMPLING, batch_stream
from .ema import EMA
from .files import write_atomically
from .model import GPT
from .optim import configure_optimizer, lr_at

PRECISIONS = ("fp32", "bf16", "fp16")  # what a run trains in; TrainConfig also takes "auto"
RESUMABLE_MODEL_CHANGES = ("dropout", "gradient_checkpointing")  # what may differ from the checkpoint's model
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss, a bad setting); the message says why."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped `Trainer.fit` between two steps, after it saved last.pt.

    A KeyboardInterrupt, so code that already stops on Ctrl-C stops on this too. `signum` is the
    signal, `step` the steps done, `checkpoint` the last.pt that holds them (None without out_dir),
    and `exit_code` what a command line program conventionally exits with: 128 + signum (130 for
    SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"saved {checkpoint} at step {step}" if checkpoint else f"stopped after step {step}, nothing saved"
        super().__init__(f"{signal.Signals(signum).name}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainConfig:
    """How to train. How long: `max_steps` optimizer steps, or `epochs` passes over the training
    data, which the Trainer turns into steps (its config then holds max_steps, and epochs None);
    giving both is an error, giving neither means DEFAULT_MAX_STEPS.

    Names from the seed projects (learning_rate, num_epochs, max_length, ...) are accepted by
    `from_dict`; `lm.config.ALIASES` lists them."""

    DEFAULT_MAX_STEPS: ClassVar[int] = 1000

    max_steps: int | None = None  # optimizer steps; None: from epochs, else DEFAULT_MAX_STEPS
    epochs: float | None = None  # passes over the training data (seed 004's num_epochs); may be fractional
    batch_size: int | str = 32  # sequences per micro-batch, per process; "auto": the largest that fits
    memory_budget: int | float | None = None  # with batch_size="auto": bytes one step may use (needed off CUDA)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # window length; None means the model's block_size
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float | None = None  # floor of the cosine; None means lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_interval: int = 100
    eval_iters: int = 20  # batches averaged per loss estimate
    patience: int | None = None  # stop after this many evaluations without improvement; None: never
    min_delta: float = 0.0  # the least drop in val loss that counts as an improvement for `patience`
    precision: str = "auto"  # "fp32", "bf16" (autocast), "fp16" (and a gradient scaler); "auto": bf16 on a
    # CUDA GPU that supports it, else fp32
    ema_decay: float | None = None  # keep an exponential moving average of the weights, e.g. 0.999
    compile: bool = False  # torch.compile the model
    sampling: str = "auto"  # "random" windows, or "epoch": every window once per epoch; "auto": epoch when
    # training by epochs, else random
    parallel: str = "ddp"  # under torchrun: "ddp" (a copy per process) or "fsdp" (sharded)
    fsdp_units: str = "auto"  # under FSDP, what is gathered at a time: "model" (fastest), "block" (least
    # memory), "auto": the whole model up to 1e9 parameters (lm.distributed.wrap)
    seed: int = 1337
    out_dir: str | None = None  # where last.pt, best.pt and metrics.csv go; None writes nothing
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        # NaN passes every `<` and `>` check below (grad_clip=nan would turn clipping off), so first
        # refuse any number that is not finite, whatever its setting.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            optional = "None" in str(f.type)
            if "float" in str(f.type) and not (value is None and optional) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TrainingError(f"{f.name}={value!r} must be a number, such as the default, {f.default!r}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingError(f"{f.name}={value!r} is not a finite number; give a number such as the "
                                    f"default, {f.default!r}.")
            if str(f.type) in ("int", "int | None") and not (value is None and optional) and not _int_at_least(
                    value, -(2**63)):
                raise TrainingError(f"{f.name}={value!r} must be an integer{' or None' if optional else ''}.")
            if str(f.type) == "bool" and not isinstance(value, bool):
                raise TrainingError(f"{f.name}={value!r} must be true or false.")
            if str(f.type) in ("str", "str | None") and not (value is None and optional) and not isinstance(value, str):
                raise TrainingError(f"{f.name}={value!r} must be a string{' or None' if optional else ''}.")
        if self.max_steps is not None and self.epochs is not None:
            raise TrainingError(f"max_steps={self.max_steps!r} and epochs={self.epochs!r} both say how long to "
                                f"train; give one of them (max_steps=None to train by epochs).")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainingError(f"epochs={self.epochs!r} must be a number > 0 (passes over the training data).")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = self.DEFAULT_MAX_STEPS
        for name in ("max_steps", "grad_accum_steps", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if value is None and name == "max_steps":
                continue  # until the Trainer counts the steps of `epochs`
            if not _positive_int(value):
                raise TrainingError(f"{name}={value!r} must be a positive integer.")
        if self.batch_size != "auto" and not _positive_int(self.batch_size):
            raise TrainingError(f"batch_size={self.batch_size!r} must be a positive integer, or 'auto' for the "
                                f"largest that fits.")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise TrainingError(f"memory_budget={budget!r} must be a positive number of bytes (e.g. 4 * 2**30 for "
                                f"4 GiB) or None.")
        if not _int_at_least(self.warmup_steps, 0):
            raise TrainingError(f"warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TrainingError(f"seed={self.seed!r} must be an integer.")
        if not self.lr > 0:
            raise TrainingError(f"lr={self.lr!r} must be > 0.")
        if self.seq_len is not None and self.seq_len < 1:
            raise TrainingError(f"seq_len={self.seq_len!r} must be a positive integer or None.")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise TrainingError(f"min_lr={self.min_lr!r} must be between 0 and lr={self.lr!r}.")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainingError(f"weight_decay={self.weight_decay!r} and grad_clip={self.grad_clip!r} "
                                f"must be >= 0 (grad_clip=0 turns clipping off).")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainingError(f"beta1={self.beta1!r} and beta2={self.beta2!r} must be in [0, 1).")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise TrainingError(f"patience={self.patience!r} must be a positive integer (evaluations) or None.")
        if self.min_delta < 0:
            raise TrainingError(f"min_delta={self.min_delta!r} must be >= 0.")
        if self.precision not in ("auto",) + PRECISIONS:
            raise TrainingError(f"precision={self.precision!r} is not one of {('auto',) + PRECISIONS}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise TrainingError(f"ema_decay={self.ema_decay!r} must be between 0 and 1 (e.g. 0.999), or None.")
        if self.sampling not in ("auto",) + SAMPLING:
            raise TrainingError(f"sampling={self.sampling!r} is not one of {('auto',) + SAMPLING}.")
        if self.parallel not in distributed.PARALLEL:
            raise TrainingError(f"parallel={self.parallel!r} is not one of {distributed.PARALLEL}.")
        if self.fsdp_units not in distributed.FSDP_UNITS:
            raise TrainingError(f"fsdp_units={self.fsdp_units!r} is not one of {distributed.FSDP_UNITS}.")

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from lm's setting names, or the seeds' (`lm.config.ALIASES`: learning_rate, ...)."""
        if not isinstance(values, dict):
            raise TrainingError(f"training settings must be a mapping, got {type(values).__name__}.")
        try:
            values = canonical_settings(values, "train")
        except ConfigError as err:
            raise TrainingError(str(err)) from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise TrainingError(f"unknown training settings {unknown}; known ones are {sorted(known)}, and the "
                                f"other names in lm.config.ALIASES (lm.config.alias_table() lists them).")
        return cls(**values)


def _positive_int(value) -> bool:
    return _int_at_least(value, 1)


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run on `device` trains in: "auto" is bf16 on a CUDA GPU that supports it, else
    fp32 (few CPUs have fast bf16 kernels, and fp16 needs loss scaling, so neither is a safe default)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


# glibc's malloc: blocks at least this big are mapped from the operating system and given back when freed
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (half its 64 MiB heaps)
TRIM_THRESHOLD = 2**30  # free memory at the top of the heap kept before any is given back


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc on Linux (what `mallopt` and `mallinfo2` belong to), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


@functools.cache
def reuse_freed_memory() -> str | None:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of returning each to the operating
    system; None when done (once a process), else why not.

    A CPU training step allocates and frees the same activations every step. glibc maps blocks over its
    threshold (128 KiB, rising with what was freed) from the kernel and unmaps them when freed, so each
    step page-faults them in again, zeroed: 8,000 to 60,000 faults a step at the book's 6-layer, d_model
    384 shape (B8 T256), about 5% of a float32 step and 10% of a bfloat16 one on a 2-core Xeon
    (`bench/cpu_train_throughput.py`). `mallopt` raises the threshold to 32 MiB and keeps up to
    1 GiB free at the top of the heap, and the faults stop. The cost: the process keeps its peak memory
    instead of shrinking between steps. The Trainer calls this when it trains on the CPU; it changes
    the whole process (every library's allocations), so LM_REUSE_FREED_MEMORY=0 leaves malloc as it is.
    The same setting for any program: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824.
    """
    if os.environ.get("LM_REUSE_FREED_MEMORY", "1") == "0":
        return "LM_REUSE_FREED_MEMORY=0 is set"
    libc = _glibc()
    if libc is None:
        return f"it tunes glibc's malloc; this is {platform.system()} with {platform.libc_ver()[0] or 'another C library'}"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc's mallopt refused the setting"
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mapped_bytes() -> int | None:
    """The bytes glibc's malloc holds in blocks mapped one by one from the operating system (mallinfo2's
    `hblkhd`): with glibc's defaults a large tensor counts here, after `reuse_freed_memory` it comes from
    the heap instead. None where glibc (2.33 or later) is not the C library."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def check_precision(device: torch.device, precision: str) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU has no bfloat16 support; use precision='fp16' (with loss scaling) or 'fp32'.")


def check_same_run(checkpoint: dict, model: GPT, source: str = "the checkpoint") -> None:
    """Refuse to continue `checkpoint` with `model` unless it is the same model (dropout and gradient
    checkpointing may change) with the same tokenizer; the error names what differs."""
    saved = checkpoint.get("config") or {}
    changed = {name: (saved[name], value) for name, value in model.config.to_dict().items()
               if name in saved and name not in RESUMABLE_MODEL_CHANGES and saved[name] != value}
    if changed:
        detail = ", ".join(f"{name}: checkpoint {old!r}, now {new!r}" for name, (old, new) in sorted(changed.items()))
        raise TrainingError(f"{source} holds a run of another model ({detail}); to continue it, build the model "
                            f"with the checkpoint's settings (lm train: leave those flags out); to start again, "
                            f"pass --overwrite (resume=None in Python) or choose another out_dir.")
    tokenizer = model.tokenizer.to_dict() if model.tokenizer is not None else None
    if checkpoint.get("tokenizer") != tokenizer:
        raise TrainingError(f"{source} was trained with another tokenizer than this model's; resume with the run's "
                            f"own tokenizer (lm train: the run's own --data_dir), or start again: --overwrite "
                            f"(resume=None in Python) or another out_dir.")


def loss_only(model: nn.Module) -> dict:
    """The keywords that ask `model(x, y)` for its loss alone: {"return_logits": False} when its forward
    takes that keyword by name (lm.GPT's does: the head and the loss then run fused, a chunk of positions
    at a time, and the (B, T, V) logits are never held), else {} (a GPT subclass with a forward of its
    own, say: it is called as before). DistributedDataParallel and torch.compile pass keywords on, so
    the model inside them is the one asked."""
    from torch.nn.parallel import DistributedDataParallel

    inner = model
    while True:
        if isinstance(inner, DistributedDataParallel):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            inner = inner._orig_mod
        else:
            break
    try:
        parameter = inspect.signature(inner.forward).parameters.get("return_logits")
    except (TypeError, ValueError):  # a forward whose signature cannot be read
        return {}
    keyword = parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    return {"return_logits": False} if keyword else {}


@torch.no_grad()
def estimate_loss(model: nn.Module, data, batch_size: int, seq_len: int, iters: int, seed: int = 0, *,
                  grad_accum_steps: int = 1, precision: str = "fp32",
                  dist_info: distributed.DistInfo | None = None) -> float:
    """Mean loss over `iters` global batches drawn with a fixed seed, so estimates compare over time.

    Under torchrun each process evaluates its share and the results are averaged, so the estimate is
    the same as one process would compute with the same global batch.
    """
    dist_info = dist_info or distributed.DistInfo()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = batch_stream(data, batch_size, seq_len, seed=seed, grad_accum_steps=grad_accum_steps,
                           rank=dist_info.rank, world_size=dist_info.world_size)
    options = loss_only(model)
    total = torch.zeros((), device=device)
    for _ in range(iters):
        for x, y, *mask in batches.next_step(device):
            with autocast(device, precision):
                total += model(x, y, attention_mask=mask[0] if mask else None, **options)[1].float()
    model.train(was_training)
    return distributed.all_mean(total / (iters * grad_accum_steps)).item()


@dataclass
class TrainHistory:
    """What happened during training, for plots and assertions."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)  # seconds per optimizer step
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    ema_val_loss: list[float] = field(default_factory=list)  # with ema_decay: val loss of the averaged weights
    best_val_loss: float = float("inf")
    best_step: int | None = None  # steps done when best_val_loss was measured: the step of best.pt
    tokens: int = 0  # tokens trained on, all processes together
    tokens_per_second: float = 0.0
    stopped_early: bool = False  # early stopping ended the run before max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainHistory":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Trainer:
    """The training loop with its state: model, optimizer, scaler, EMA, batches, history, step.

    `Trainer(model, train_data, val_data, config).fit()` trains. The data are 1-D token ids (windows
    are cut from them), or anything with a `batches(...)` stream of its own, such as fine-tuning's
    `lm.finetuning.SupervisedData` (`lm.data.batch_stream`). `resume=` a checkpoint (path or
    dict) continues a run where it stopped, with the same batches, learning rates and random numbers,
    so on CPU a resumed run reproduces the losses of an uninterrupted one; `resume="auto"` continues
    from `config.out_dir/last.pt` when it exists and starts afresh when it does not. A checkpoint of
    another model (other settings than dropout and gradient checkpointing) or another tokenizer is
    refused.

    `self.config` is the run's config with "auto" resolved: the precision and batch size it trains
    with, which checkpoints record.
    """

    # With the fused AdamW, clipping is folded into its step (the kernel divides each gradient by the clipping
    # factor as it reads it) instead of scaling every gradient in a pass of its own; False clips first, as
    # `clip_grad_norm_` does (bench/cpu_train_throughput.py --lever clip-in-adamw measures the difference).
    _fold_clipping = True

    def __init__(self, model: GPT, train_data, val_data, config: TrainConfig,
                 callback: Callable[[TrainHistory], None] | None = None, resume=None):
        self.model, self.train_data, self.val_data, self.callback = model, train_data, val_data, callback
        block_size = model.config.block_size
        self.seq_len = config.seq_len or block_size
        if self.seq_len > block_size:
            raise TrainingError(f"seq_len={self.seq_len} exceeds the model's block_size={block_size}; give "
                                f"seq_len <= {block_size} (None trains on whole blocks), or build the model "
                                f"with a larger block_size.")
        self.device = model.device
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.dist = distributed.init(self.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index != self.dist.local_rank:
            raise TrainingError(f"under torchrun, process {self.dist.rank} must train on cuda:{self.dist.local_rank}, "
                                f"not {self.device}; move the model with lm.distributed.local_device('cuda').")
        self.resumed_from, checkpoint = self._checkpoint_to_resume(resume, config)
        self.config = config = self._resolve(config)
        self.out_dir = Path(config.out_dir) if config.out_dir and self.dist.is_main else None

        self.ema = EMA(model, config.ema_decay) if config.ema_decay else None
        self.wrapped = model
        if self.dist.enabled:
            self.wrapped = distributed.wrap(model, config.parallel, self.device, config.precision,
                                            units=config.fsdp_units)
        self.fsdp = self.dist.enabled and config.parallel == "fsdp"
        if self.fsdp and self.ema is not None:
            raise TrainingError("ema_decay with parallel='fsdp' is not supported; use parallel='ddp' or no EMA.")
        self.optimizer = configure_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if config.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.loss_options = loss_only(model)  # the loss without the logits, where the model's forward allows
        self.batches = batch_stream(train_data, config.batch_size, self.seq_len, seed=config.seed,
                                    mode=config.sampling, grad_accum_steps=config.grad_accum_steps,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        if config.epochs is not None:
            self.config = config = self._steps_for_epochs(config)
        self.step = 0
        self.history = TrainHistory()
        self.evals_without_improvement = 0
        self._timed = None  # tokens and seconds of the steps this Trainer ran, for tokens/s
        self._finished_at = 0.0  # when the last step's results were read
        self._busy = None  # "a step" or "an evaluation" while one changes the state: no checkpoint then
        self._saved_step = None  # the step last.pt was last written at by this Trainer
        self._stop_vote = None  # under torchrun: the all-reduce that says whether any process got a signal
        if checkpoint is not None:
            self.load_state(checkpoint)

    # ---- what the config leaves open ---------------------------------------------------------
    def _checkpoint_to_resume(self, resume, config: TrainConfig) -> tuple[str | None, dict | None]:
        """Where the run continues from (a name for messages) and that checkpoint, checked against
        the model; (None, None) to start afresh."""
        if resume is None:
            return None, None
        if isinstance(resume, str) and resume == "auto":
            last = Path(config.out_dir) / "last.pt" if config.out_dir else None
            if last is None or not last.is_file():
                return None, None
            resume = last
        if isinstance(resume, (str, Path)):
            source, checkpoint = str(resume), load_checkpoint(resume)
        else:
            source, checkpoint = "the checkpoint", resume
        check_same_run(checkpoint, self.model, source)
        return source, checkpoint

    def _resolve(self, config: TrainConfig) -> TrainConfig:
        """`config` with precision="auto" and sampling="auto" replaced by what this run uses."""
        if config.batch_size == "auto":
            raise TrainingError("Trainer needs a number for batch_size; 'auto' is found by trial steps of a "
                                "Trainer, so lm.train resolves it first (lm.training.resolve_batch_size).")
        precision = resolve_precision(config.precision, self.device)
        check_precision(self.device, precision)
        sampling = config.sampling
        if sampling == "auto":  # training by epochs means every window once per epoch
            sampling = "epoch" if config.epochs is not None else "random"
        return dataclasses.replace(config, precision=precision, sampling=sampling)

    def _steps_for_epochs(self, config: TrainConfig) -> TrainConfig:
        """`config` with `epochs` turned into max_steps: an epoch is every window of the training data
        (every example, for fine-tuning) once, and a step takes `global_batch` of them, so

            max_steps = ceil(epochs * windows / (batch_size * grad_accum_steps * processes))

        With sampling="epoch" that is exactly `epochs` passes (the last step may start the next
        pass); with "random" windows, as many tokens as `epochs` passes."""
        windows = getattr(self.batches, "n_windows", None)
        if windows is None:
            raise TrainingError(f"epochs={config.epochs} needs to know how many windows an epoch holds, and this "
                                f"training data's batches ({type(self.batches).__name__}) do not say; give "
                                f"max_steps instead.")
        steps = max(1, math.ceil(config.epochs * windows / self.batches.global_batch))
        return dataclasses.replace(config, max_steps=steps, epochs=None)

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict:
        """Run one optimizer step (all its micro-batches); returns its loss, lr, grad norm and time."""
        return self._finish_step(self._start_step())

    def _start_step(self) -> dict:
        """Queue one whole optimizer step on the device and return without waiting for it (with the
        fused AdamW; other optimizers wait once, before their step). `_finish_step` reads the result.

        `fit` starts step k+1 before it finishes step k, so the GPU already has the next step's
        work when the host waits for the last one, instead of idling while Python prepares it."""
        config, model, step = self.config, self.wrapped, self.step
        self._busy = "a step"
        t0 = time.perf_counter()
        lr = lr_at(step, config.lr, config.final_lr, config.warmup_steps, config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.batches.next_step(self.device)  # (x, y), or (x, y, attention_mask)
        tokens = self.batches.tokens_per_step
        total = torch.zeros((), device=self.device)
        for i, (x, y, *mask) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:  # DDP averages gradients across processes only after the last micro-batch
                with autocast(self.device, config.precision):
                    _, loss = model(x, y, attention_mask=mask[0] if mask else None, **self.loss_options)
                loss = loss / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach().float()
        loss = distributed.all_mean(total)
        # The fused AdamW can skip a bad update on the device, as GradScaler has it do, so the host need
        # not wait before the step; other optimizers (and the fp16 scaler's path) must check first.
        skip_on_device = self.scaler is None and bool(self.optimizer.defaults.get("fused"))
        if not skip_on_device:
            self._check_loss(loss.item(), step, lr)  # stop before a bad step can spoil the weights
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_scale = None
        if skip_on_device and not self.fsdp and self._fold_clipping:
            # The fused kernel divides each gradient by `grad_scale` as it reads it (as it does for GradScaler),
            # so clipping needs only the norm here, not a pass of its own that scales every gradient.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            grad_scale = torch.clamp((grad_norm + 1e-6) / clip, min=1.0)  # clip_grad_norm_'s factor, inverted
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded DTensor
            grad_norm = grad_norm.full_tensor()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
            self.scaler.update()
        elif skip_on_device:
            # 1.0 when the loss or the gradients are not finite: the kernel then leaves the weights,
            # moments and step count as they were
            self.optimizer.found_inf = (~torch.isfinite(loss + grad_norm)).float()
            self.optimizer.grad_scale = grad_scale
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)  # a skipped step left the weights alone, so the average is safe
        self.step = step + 1
        self._busy = None
        return {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm, "start": t0, "tokens": tokens}

    def _finish_step(self, queued: dict) -> dict:
        """Wait for a step that `_start_step` queued, check it, and record it in the history."""
        self._busy = "a step"
        step, lr = queued["step"], queued["lr"]
        # the one wait for the GPU per step; it also makes the time below true
        loss_value, grad_norm = torch.stack([queued["loss"], queued["grad_norm"].float()]).tolist()
        self._check_loss(loss_value, step, lr)
        if not math.isfinite(grad_norm) and self.scaler is None:  # fp16 overflows are the scaler's to skip
            raise TrainingError(f"the gradient norm became {grad_norm} at step {step} while the loss was "
                                f"{loss_value:.4f}; lower lr (now {lr:.2e}), keep gradient clipping on, "
                                f"or check the data.")
        # a step that started before the last one finished took from then till now
        now = time.perf_counter()
        seconds = now - max(queued["start"], self._finished_at)
        self._finished_at = now

        h = self.history
        h.step.append(step)
        h.loss.append(loss_value)
        h.lr.append(lr)
        h.grad_norm.append(grad_norm)
        h.step_time.append(seconds)
        tokens = queued["tokens"]
        h.tokens += tokens
        # tokens/s leaves out this run's first step (it compiles, and warms the allocator up) once there are others
        first = self._timed is None
        self._timed = (0, 0.0) if first else (self._timed[0] + tokens, self._timed[1] + seconds)
        h.tokens_per_second = self._timed[0] / self._timed[1] if self._timed[1] > 0 else tokens / seconds
        self._busy = None
        return {"loss": loss_value, "lr": lr, "grad_norm": h.grad_norm[-1], "seconds": seconds}

    @staticmethod
    def _check_loss(loss_value: float, step: int, lr: float) -> None:
        if not math.isfinite(loss_value):
            raise TrainingError(f"the loss became {loss_value} at step {step}; lower lr (now {lr:.2e}), "
                                f"keep gradient clipping on, try precision='bf16' instead of 'fp16', "
                                f"or check the data.")

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> bool:
        """Estimate train and val loss now; returns whether the run's best val loss improved."""
        config, h = self.config, self.history
        self._busy = "an evaluation"
        args = dict(grad_accum_steps=config.grad_accum_steps, precision=config.precision, dist_info=self.dist)
        B, T, n = config.batch_size, self.seq_len, config.eval_iters
        h.eval_step.append(self.step - 1)
        h.train_loss.append(estimate_loss(self.wrapped, self.train_data, B, T, n, **args))
        val = estimate_loss(self.wrapped, self.val_data, B, T, n, **args)
        h.val_loss.append(val)
        if self.ema is not None:
            with self.ema.applied(self.model):
                val = estimate_loss(self.wrapped, self.val_data, B, T, n, **args)
            h.ema_val_loss.append(val)
        previous_best = h.best_val_loss
        improved = val < previous_best
        if improved:
            h.best_val_loss, h.best_step = val, self.step
        if val < previous_best - config.min_delta:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self._busy = None
        return improved

    @property
    def should_stop_early(self) -> bool:
        return self.config.patience is not None and self.evals_without_improvement >= self.config.patience

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything beyond the weights that a resumed run needs to continue exactly."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "batches": self.batches.state_dict(),
            "rng": rng,
            "history": self.history.to_dict(),
            "evals_without_improvement": self.evals_without_improvement,
            "scheduler": {"name": "warmup_cosine", "lr": self.config.lr, "min_lr": self.config.final_lr,
                          "warmup_steps": self.config.warmup_steps, "max_steps": self.config.max_steps},
            "world_size": self.dist.world_size,
        }

    def save(self, path: str | Path, improved: bool = False) -> None:
        """Write a checkpoint (every process must call this under FSDP; only rank 0 writes)."""
        weights, optimizer_state = self._full_state()
        if not self.dist.is_main:
            return
        save_checkpoint(path, self.model, optimizer=optimizer_state, scaler=self.scaler, step=self.step,
                        best_val_loss=self.history.best_val_loss, train_config=self.config.to_dict(),
                        model_state=weights, extra={"trainer": self.state(),
                                                    "ema": self.ema.weights(self.model) if self.ema else None})

    def _full_state(self):
        if not self.fsdp:
            return self.model.state_dict(), self.optimizer
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                _Snapshot(get_optimizer_state_dict(self.model, self.optimizer, options=options)))

    def load_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by `save` (weights, optimizer, scaler, EMA, batches, RNG)."""
        state = ckpt.get("trainer")
        if state is None:
            raise TrainingError("this checkpoint has no trainer state (it was not written by lm.train), so the "
                                "run cannot be resumed; load it with lm.load_model and train anew.")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ckpt["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=options)
        else:
            self.model.load_state_dict(ckpt["model"])
            if ckpt.get("optimizer") is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict({"decay": self.config.ema_decay, "updates": ckpt["step"],
                                      "shadow": {k: v for k, v in ckpt["ema"].items() if k in self.ema.shadow}})
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.history = TrainHistory.from_dict(state["history"])
        self.evals_without_improvement = state["evals_without_improvement"]
        self.step = int(ckpt["step"])

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainHistory:
        """Train until max_steps (or early stopping) and return the history.

        With out_dir, the folder is locked for this run (a second run there is refused, naming this
        one), and a best.pt that a crash left behind last.pt is brought up to date first.

        Ctrl-C (SIGINT) or SIGTERM does not stop the loop where it lands: the step in progress (or
        the evaluation) finishes, last.pt is saved with exactly the steps done, and then
        `TrainingInterrupted`, a KeyboardInterrupt, is raised. Running again with resume="auto"
        continues as if nothing had happened (on CPU, bit for bit). More signals while it saves change
        nothing. Signals are caught this way only when fit runs in the main thread, the one Python
        delivers them to."""
        lock = run_lock(self.out_dir) if self.out_dir else contextlib.nullcontext()
        stopped_by = None
        with lock, _StopSignals() as signals:
            self._heal_best_checkpoint()
            if self.step < self.config.max_steps:
                stopped_by = self._train(signals)
            elif self.dist.is_main and self.resumed_from is not None:
                print(f"nothing to do: {self.resumed_from} is already at step {self.step} of "
                      f"max_steps={self.config.max_steps}; raise max_steps to train on.")
        self.model.eval()  # training is over: dropout off for whatever the caller does next
        signum = stopped_by or signals.signum  # (a signal after the last step: the run is whole, and saved)
        if signum:
            last = Path(self.config.out_dir) / "last.pt" if self.config.out_dir else None
            raise TrainingInterrupted(signum, self.step, last if last and last.is_file() else None)
        return self.history

    def _train(self, signals: "_StopSignals") -> int | None:
        """The loop; returns the signal that stopped it, if one did."""
        config, h = self.config, self.history
        first_step, stopped_by, self._stop_vote = self.step, None, None
        bar = _progress_bar(config.max_steps, config.progress and self.dist.is_main, initial=self.step)
        logger = MetricsLogger(self.out_dir, config.tensorboard, resume_step=self.step) if self.out_dir else None
        self.wrapped.train()
        pending = []  # steps queued on the device whose results are not read yet, oldest first

        def finish_oldest():
            out = self._finish_step(pending[0])
            if logger:
                logger.log_step(pending[0]["step"], out, h.tokens)
            pending.pop(0)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.1e}", tok_s=f"{h.tokens_per_second:,.0f}")

        try:
            while self.step < config.max_steps and not h.stopped_early:
                stopped_by = self._signalled(signals)
                if stopped_by:
                    break  # between two steps: the one safe place to stop
                pending.append(self._start_step())
                if len(pending) > 1:  # read the previous step while the device runs this one
                    finish_oldest()
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    finish_oldest()  # evaluation and checkpoints see this step's weights, nothing later
                    improved = self.evaluate()
                    h.stopped_early = self.should_stop_early
                    if logger:
                        logger.log_eval(self.step - 1, h)
                    if config.out_dir:
                        self.save_checkpoints(improved)
                    if self.callback is not None and self.dist.is_main:
                        self.callback(h)
            # stopped by a signal: the queued step is whole (its update is on the device), so it counts
            while pending:
                finish_oldest()
            if stopped_by:
                self._save_on_stop(stopped_by, first_step, logger)
        except KeyboardInterrupt:  # raised by a callback, say: not a signal, which only sets a flag
            self._save_after_keyboard_interrupt(pending, finish_oldest, logger)
            raise
        finally:
            bar.close()
            if logger:
                logger.close()
        return stopped_by

    def _signalled(self, signals: "_StopSignals") -> int:
        """The signal that asks the loop to stop before the next step (0 for none).

        Under torchrun all processes must stop after the same step, or the others would wait forever
        in the next step's all-reduce. So each process votes with its signal number through an
        all-reduce (the largest wins) that is queued now and read one step later: by then finishing a
        step has waited for the device, so the read costs no wait, and every process reads the same."""
        if not self.dist.enabled:
            return signals.signum or 0
        previous = self._stop_vote
        self._stop_vote = torch.tensor(signals.signum or 0, device=self.device)
        torch.distributed.all_reduce(self._stop_vote, op=torch.distributed.ReduceOp.MAX)
        return int(previous.item()) if previous is not None else 0

    def _save_on_stop(self, signum: int, first_step: int, logger: "MetricsLogger | None") -> None:
        """last.pt after a signal: every step done is finished and logged, so the state is whole.
        (Every process calls this: under FSDP saving gathers the shards.)"""
        trained = self.step > first_step  # else last.pt, if any, already holds this state
        if self.config.out_dir and trained:
            self._save_last_unless_current(logger)
        if self.dist.is_main:
            if not self.config.out_dir:
                where = "nothing saved (no out_dir)"
            elif trained:
                where = f"saved {self.config.out_dir}/last.pt"
            else:
                where = "no step trained since the start, nothing new to save"
            print(f"\ninterrupted by {signal.Signals(signum).name}: {where} at step {self.step}; run again "
                  f"to resume.")

    def _save_after_keyboard_interrupt(self, pending: list, finish_oldest, logger) -> None:
        """A KeyboardInterrupt raised as an exception (from a callback, or where no signal handler could
        be installed) may land anywhere: save last.pt only when it landed between steps."""
        if self._busy is not None:
            if self.dist.is_main and self.config.out_dir:
                saved = f" (step {self._saved_step})" if self._saved_step is not None else ""
                print(f"\ninterrupted in the middle of {self._busy}: {self.config.out_dir}/last.pt is left as "
                      f"it was{saved}.")
            return
        while pending:  # the steps that were queued whole still count, and are logged like the others
            finish_oldest()
        if self.config.out_dir and not self.dist.enabled:
            self._save_last_unless_current(logger)  # (after an evaluation's callback it is saved already)
            print(f"\ninterrupted: saved {self.config.out_dir}/last.pt at step {self.step}; run again to resume.")

    def save_checkpoints(self, improved: bool) -> None:
        """last.pt, then best.pt when val improved (a crash between the two is healed on resume)."""
        self._save_last()
        if improved:
            self.save(Path(self.config.out_dir) / "best.pt")

    def _save_last(self) -> None:
        self.save(Path(self.config.out_dir) / "last.pt")
        self._saved_step = self.step

    def _save_last_unless_current(self, logger: "MetricsLogger | None") -> None:
        """last.pt on stopping, unless it holds this step already; the metrics rows before its step
        reach the disk before it does."""
        if self._saved_step != self.step:
            if logger:
                logger.flush()
            self._save_last()

    def _heal_best_checkpoint(self) -> None:
        """Bring best.pt up to date when a crash came between writing last.pt and best.pt.

        last.pt records the step of the best val loss so far; when that is its own step, its weights
        are the best ones, and best.pt must hold them too. Rank 0 copies the file (no collective needed)."""
        h = self.history
        if self.out_dir is None or self.resumed_from is None or h.best_step != self.step:
            return
        if not Path(self.resumed_from).is_file():  # resumed from a dict: no file to copy
            return
        best = self.out_dir / "best.pt"
        try:
            up_to_date = load_checkpoint(best, mmap=True)["step"] == self.step
        except CheckpointError:  # missing or unreadable
            up_to_date = False
        if not up_to_date:
            _copy_atomically(Path(self.resumed_from), best)
            print(f"best.pt was behind last.pt (a crash between the two saves): copied {self.resumed_from} "
                  f"(step {self.step}, val loss {h.best_val_loss:.4f}) to {best}.")


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy a file so that a crash leaves the old target or the new one, never half of one."""
    with open(source, "rb") as src:
        write_atomically(target, lambda out: shutil.copyfileobj(src, out))


class _StopSignals:
    """While in use, SIGINT (Ctrl-C) and SIGTERM only note that training should stop; the loop stops
    at its next safe point. Python's default for SIGINT raises KeyboardInterrupt wherever the program
    is, which can be half-way through a step or a save; the default for SIGTERM ends the process.

    Handlers are installed only in the main thread (Python runs handlers there alone) and the
    previous ones are put back afterwards. A signal set to be ignored (nohup) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the first signal that came
        self._previous = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = signal.SIG_DFL if previous is None else previous
                    signal.signal(signum, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.signum is None:  # later signals change nothing: the run is already stopping
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


# ---- one run per out_dir ---------------------------------------------------------------------------
LOCK_FILE = "train.lock"
_held_locks: set[tuple[str, int]] = set()  # (out_dir, thread) pairs this process holds


@contextlib.contextmanager
def run_lock(out_dir: str | Path):
    """Hold out_dir for one training run: a second one, in this process or another, is refused with
    an error that names the holder (pid, host, start time).

    The lock is an flock on out_dir/train.lock. The kernel releases it when the holding process ends,
    however it ends (kill -9 included), so a lock left by a dead process is free by construction; the
    file's text only names the holder. The same thread may take it again (lm train holds it around
    the Trainer's own). Where fcntl does not exist (Windows), runs are not locked."""
    out_dir = Path(out_dir)
    key = (str(out_dir.resolve()), threading.get_ident())
    if fcntl is None or key in _held_locks:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    fd = _lock_file(path)
    _held_locks.add(key)
    try:
        yield
    finally:
        _held_locks.discard(key)
        path.unlink(missing_ok=True)  # before the lock goes: see _lock_file
        os.close(fd)  # closing the file releases the lock


def _lock_file(path: Path) -> int:
    """Open and flock `path`, write who holds it, and return the file descriptor.

    The holder deletes the file when it is done. Another run may have opened the file just before,
    and then locks a file that no longer has a name; so after locking, check that the name still
    leads to the file locked, and start again when it does not."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_text(path) or "a process that has not written its name yet"
            raise TrainingError(f"{path.parent} is in use by another training run: {holder} (lock file {path}). "
                                f"Wait for it to finish, stop it, or choose another out_dir.") from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    os.ftruncate(fd, 0)  # a dead holder's name may still be there
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode())
    return fd


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


class _Snapshot:
    """Stands in for an optimizer whose state dict was already gathered (FSDP)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class MetricsLogger:
    """Per-step and per-evaluation metrics to out_dir/metrics.csv (and TensorBoard when asked).

    A resumed run keeps the rows before its step and drops the later ones (logged after the last
    checkpoint, they are trained again). The kept rows are written to a new file that replaces the
    old one at once, and new rows are appended, so a crash at any point never loses an earlier row."""

    COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time", "tokens", "train_loss", "val_loss", "ema_val_loss")

    def __init__(self, out_dir: Path, tensorboard: bool = False, resume_step: int = 0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.csv"
        self._rewrite(self._rows_before(resume_step) if resume_step else [])
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.COLUMNS)
        self.pending: dict | None = None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise TrainingError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                                    "(or leave tensorboard off; metrics.csv is always written).") from err
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)

    def _rows_before(self, step: int) -> list[dict]:
        """The rows of the steps before `step`; a row cut short by a crash (a field missing) is dropped."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [r for r in rows if None not in r.values() and r["step"].isdigit() and int(r["step"]) < step]

    def _rewrite(self, rows: list[dict]) -> None:
        def write(f):
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

        write_atomically(self.path, write, text=True)  # readers see all the old rows, or all the kept ones

    def log_step(self, step: int, out: dict, tokens: int) -> None:
        self._flush_pending()
        self.pending = {"step": step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                        "step_time": out["seconds"], "tokens": tokens}
        if self.tb:
            for key in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(f"train/{key}", out[key], step)

    def log_eval(self, step: int, h: TrainHistory) -> None:
        if self.pending is not None and self.pending["step"] == step:
            self.pending.update(train_loss=h.train_loss[-1], val_loss=h.val_loss[-1],
                                ema_val_loss=h.ema_val_loss[-1] if h.ema_val_loss else "")
        self.flush()
        if self.tb:
            self.tb.add_scalar("eval/train_loss", h.train_loss[-1], step)
            self.tb.add_scalar("eval/val_loss", h.val_loss[-1], step)
            self.tb.flush()

    def _flush_pending(self) -> None:
        if self.pending is not None:
            self.writer.writerow(self.pending)
            self.pending = None

    def flush(self) -> None:
        """Everything logged so far to the disk: done before each checkpoint, which must not be ahead
        of the metrics."""
        self._flush_pending()
        self.file.flush()

    def close(self) -> None:
        self._flush_pending()
        self.file.close()
        if self.tb:
            self.tb.close()


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)
