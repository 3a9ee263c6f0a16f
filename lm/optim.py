"""The optimizer and its learning-rate schedule: AdamW without decay on norms, biases and embeddings,
and linear warmup followed by a half cosine.

    optimizer = configure_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, 3e-4, 3e-5, warmup_steps=100, max_steps=max_steps)
        ...
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
    """AdamW that decays only the matrices of Linear layers: never norms, biases or embeddings.

    It uses the fused kernel (one launch for all parameters) where this build of torch has it."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu", "mps"))
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
