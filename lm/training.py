"""Training: AdamW, linear warmup then cosine decay, gradient clipping, evaluation, checkpoints.

    for each step:
        lr = lr_at(step)                 # warmup, then cosine down to min_lr
        x, y = a random batch of windows
        loss = model(x, y); loss.backward()
        clip the gradient norm; optimizer.step()
        every eval_interval steps: estimate train/val loss, write last.pt (and best.pt if val improved)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .data import get_batch
from .model import GPT


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss, a bad setting); the message says why."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32
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
    seed: int = 1337
    out_dir: str | None = None  # where last.pt / best.pt go; None writes no checkpoints
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainingError(f"{name}={value!r} must be a positive integer.")
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

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup to `lr` over `warmup_steps`,
    then a half cosine from `lr` down to `min_lr` at `max_steps`, and `min_lr` after that."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW that decays only the matrices of Linear layers: never norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


@torch.no_grad()
def estimate_loss(model: GPT, data, batch_size: int, seq_len: int, iters: int, seed: int = 0) -> float:
    """Mean loss over `iters` batches drawn with a fixed seed, so estimates are comparable over time."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(iters):
        x, y = get_batch(data, batch_size, seq_len, generator, model.device)
        losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainHistory:
    """What happened during training, for plots and assertions."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_val_loss: float = float("inf")
    tokens_per_second: float = 0.0


def train(
    model: GPT,
    train_data,
    val_data,
    config: TrainConfig,
    callback: Callable[[TrainHistory], None] | None = None,
) -> TrainHistory:
    """Train `model` in place on 1-D token sequences (tensors or numpy arrays) and return its history.

    `callback(history)` runs after every evaluation (a live plot, say). With `config.out_dir`,
    `last.pt` is written at every evaluation and `best.pt` whenever the validation loss improves.
    The model is left in eval mode.
    """
    seq_len = config.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise TrainingError(f"seq_len={seq_len} exceeds the model's block_size={model.config.block_size}.")
    device = model.device
    optimizer = configure_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
    generator = torch.Generator().manual_seed(config.seed)
    out_dir = Path(config.out_dir) if config.out_dir else None
    history = TrainHistory()
    bar = _progress_bar(config.max_steps, config.progress)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step in range(config.max_steps):
        lr = lr_at(step, config.lr, config.final_lr, config.warmup_steps, config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, config.batch_size, seq_len, generator, device)
        _, loss = model(x, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # stop before a bad step can spoil the weights
            bar.close()
            raise TrainingError(f"the loss became {loss_value} at step {step}; lower lr (now {lr:.2e}), "
                                f"keep gradient clipping on, or check the data.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        optimizer.step()

        tokens += x.numel()
        history.step.append(step)
        history.loss.append(loss_value)
        history.lr.append(lr)
        history.grad_norm.append(grad_norm)
        history.tokens_per_second = tokens / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{history.tokens_per_second:,.0f}")

        if (step + 1) % config.eval_interval == 0 or step + 1 == config.max_steps:
            improved = _evaluate(model, train_data, val_data, config, seq_len, step, history)
            if out_dir is not None:
                _save(model, optimizer, step, history, config, out_dir, improved)
            if callback is not None:
                callback(history)
    bar.close()
    model.eval()  # training is over: dropout off for whatever the caller does next
    return history


def _evaluate(model, train_data, val_data, config, seq_len, step, history) -> bool:
    """Record train/val loss estimates; returns whether the validation loss improved."""
    history.eval_step.append(step)
    history.train_loss.append(estimate_loss(model, train_data, config.batch_size, seq_len, config.eval_iters))
    val = estimate_loss(model, val_data, config.batch_size, seq_len, config.eval_iters)
    history.val_loss.append(val)
    improved = val < history.best_val_loss
    if improved:  # tracked with or without out_dir
        history.best_val_loss = val
    return improved


def _save(model, optimizer, step, history, config, out_dir: Path, improved: bool) -> None:
    args = dict(optimizer=optimizer, step=step + 1, best_val_loss=history.best_val_loss,
                train_config=config.to_dict())
    save_checkpoint(out_dir / "last.pt", model, **args)
    if improved:
        save_checkpoint(out_dir / "best.pt", model, **args)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)
