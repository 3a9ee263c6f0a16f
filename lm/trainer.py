"""Training: AdamW, warmup then cosine decay, accumulation, mixed precision, EMA, checkpoints, resume.

    for each optimizer step:
        lr = lr_at(step)                          # linear warmup, then cosine down to min_lr
        for each of grad_accum_steps micro-batches:
            with autocast(precision):             # fp32, bf16, or fp16 (with a gradient scaler)
                loss = model(x, y) / grad_accum_steps
            loss.backward()                       # gradients add up over the micro-batches
        clip the gradient norm; optimizer.step(); update the EMA of the weights
        every eval_interval steps: estimate train/val loss, write last.pt (and best.pt when val
        improved), log metrics, and stop early when val has not improved for `patience` evaluations

The same code runs in one process or in several under `torchrun` (see `lm.distributed`): each
process takes its share of every batch and the gradients are averaged, so the losses match a
single process with the same global batch.

The Trainer resolves precision="auto" (bf16 where the GPU has it) and resume="auto" (continue the
run in out_dir/last.pt when there is one, after checking that it is a run of the same model).
batch_size="auto" needs trial steps of this very trainer, so it is resolved one level up, by
`lm.training` (`lm.train` and `lm train`). The optimizer and schedule are in `lm.optim`, the EMA in
`lm.ema`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .data import SAMPLING, batch_stream
from .ema import EMA
from .model import GPT
from .optim import configure_optimizer, lr_at

PRECISIONS = ("fp32", "bf16", "fp16")  # what a run trains in; TrainConfig also takes "auto"
RESUMABLE_MODEL_CHANGES = ("dropout", "gradient_checkpointing")  # what may differ from the checkpoint's model
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss, a bad setting); the message says why."""


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int | str = 32  # sequences per micro-batch, per process; "auto": the largest that fits
    memory_budget: int | None = None  # with batch_size="auto": bytes one step may use (needed off CUDA)
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
    sampling: str = "random"  # "random" windows, or "epoch": every window once per epoch
    parallel: str = "ddp"  # under torchrun: "ddp" (a copy per process) or "fsdp" (sharded)
    seed: int = 1337
    out_dir: str | None = None  # where last.pt, best.pt and metrics.csv go; None writes nothing
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum_steps", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise TrainingError(f"{name}={value!r} must be a positive integer.")
        if self.batch_size != "auto" and not _positive_int(self.batch_size):
            raise TrainingError(f"batch_size={self.batch_size!r} must be a positive integer, or 'auto' for the "
                                f"largest that fits.")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise TrainingError(f"memory_budget={budget!r} must be a positive number of bytes (e.g. 4 * 2**30 for "
                                f"4 GiB) or None.")
        if self.warmup_steps < 0:
            raise TrainingError(f"warmup_steps={self.warmup_steps!r} must be >= 0.")
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
        if self.sampling not in SAMPLING:
            raise TrainingError(f"sampling={self.sampling!r} is not one of {SAMPLING}.")
        if self.parallel not in distributed.PARALLEL:
            raise TrainingError(f"parallel={self.parallel!r} is not one of {distributed.PARALLEL}.")

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"unknown training settings {unknown}; known ones are {sorted(known)}.")
        return cls(**values)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
    total = torch.zeros((), device=device)
    for _ in range(iters):
        for x, y, *mask in batches.next_step(device):
            with autocast(device, precision):
                total += model(x, y, attention_mask=mask[0] if mask else None)[1].float()
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
            self.wrapped = distributed.wrap(model, config.parallel, self.device)
        self.fsdp = self.dist.enabled and config.parallel == "fsdp"
        if self.fsdp and self.ema is not None:
            raise TrainingError("ema_decay with parallel='fsdp' is not supported; use parallel='ddp' or no EMA.")
        self.optimizer = configure_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        if config.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.batches = batch_stream(train_data, config.batch_size, self.seq_len, seed=config.seed,
                                    mode=config.sampling, grad_accum_steps=config.grad_accum_steps,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.step = 0
        self.history = TrainHistory()
        self.evals_without_improvement = 0
        self._timed = None  # tokens and seconds of the steps this Trainer ran, for tokens/s
        self._finished_at = 0.0  # when the last step's results were read
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
        """`config` with precision="auto" replaced by what this run uses."""
        if config.batch_size == "auto":
            raise TrainingError("Trainer needs a number for batch_size; 'auto' is found by trial steps of a "
                                "Trainer, so lm.train resolves it first (lm.training.resolve_batch_size).")
        precision = resolve_precision(config.precision, self.device)
        check_precision(self.device, precision)
        return dataclasses.replace(config, precision=precision)

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
                    _, loss = model(x, y, attention_mask=mask[0] if mask else None)
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
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)  # a skipped step left the weights alone, so the average is safe
        self.step = step + 1
        return {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm, "start": t0, "tokens": tokens}

    def _finish_step(self, queued: dict) -> dict:
        """Wait for a step that `_start_step` queued, check it, and record it in the history."""
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
            h.best_val_loss = val
        if val < previous_best - config.min_delta:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
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
        """Train until max_steps (or early stopping). Ctrl-C saves last.pt and stops cleanly."""
        config, h = self.config, self.history
        if self.step >= config.max_steps:
            if self.dist.is_main and self.resumed_from is not None:
                print(f"nothing to do: {self.resumed_from} is already at step {self.step} of "
                      f"max_steps={config.max_steps}; raise max_steps to train on.")
            self.model.eval()
            return h
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
        except KeyboardInterrupt:
            while pending:  # the steps that were queued whole still count, and are logged like the others
                finish_oldest()
            if config.out_dir and not self.dist.enabled and h.step and h.step[-1] == self.step - 1:
                self.save(Path(config.out_dir) / "last.pt")  # resume with the same command
                print(f"\ninterrupted: saved {config.out_dir}/last.pt at step {self.step}; run again to resume.")
            raise
        finally:
            bar.close()
            if logger:
                logger.close()
        self.model.eval()  # training is over: dropout off for whatever the caller does next
        return h

    def save_checkpoints(self, improved: bool) -> None:
        out_dir = Path(self.config.out_dir)
        self.save(out_dir / "last.pt")
        if improved:
            self.save(out_dir / "best.pt")


class _Snapshot:
    """Stands in for an optimizer whose state dict was already gathered (FSDP)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class MetricsLogger:
    """Per-step and per-evaluation metrics to out_dir/metrics.csv (and TensorBoard when asked)."""

    COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time", "tokens", "train_loss", "val_loss", "ema_val_loss")

    def __init__(self, out_dir: Path, tensorboard: bool = False, resume_step: int = 0):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.csv"
        rows = []
        if resume_step and self.path.is_file():  # keep what the interrupted run logged up to the resume point
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.pending: dict | None = None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise TrainingError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                                    "(or leave tensorboard off; metrics.csv is always written).") from err
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)

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
        self._flush_pending()
        self.file.flush()
        if self.tb:
            self.tb.add_scalar("eval/train_loss", h.train_loss[-1], step)
            self.tb.add_scalar("eval/val_loss", h.val_loss[-1], step)
            self.tb.flush()

    def _flush_pending(self) -> None:
        if self.pending is not None:
            self.writer.writerow(self.pending)
            self.pending = None

    def close(self) -> None:
        self._flush_pending()
        self.file.close()
        if self.tb:
            self.tb.close()


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)
