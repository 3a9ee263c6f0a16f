"""The optimizer's parameter groups and the learning-rate schedule (lm/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lm import GPT, ModelConfig, lr_at
from lm.optim import configure_optimizer


# ---- learning-rate schedule ------------------------------------------------------------------------
def reference_lr(step, lr, min_lr, warmup, max_steps):
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) / 2


def test_lr_schedule_landmarks():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    schedule = [lr_at(s, lr, min_lr, warmup, max_steps) for s in range(max_steps + 5)]
    assert schedule[0] == pytest.approx(lr / warmup)
    assert all(b > a for a, b in zip(schedule[:warmup], schedule[1:warmup]))  # linear warmup rises
    assert all(schedule[s] == pytest.approx(lr * (s + 1) / warmup) for s in range(warmup))
    assert schedule[warmup - 1] == pytest.approx(lr) and schedule[warmup] == pytest.approx(lr)  # the peak
    assert schedule[warmup + 50] == pytest.approx((lr + min_lr) / 2)  # cosine midpoint
    assert all(b <= a for a, b in zip(schedule[warmup:], schedule[warmup + 1:]))  # then it only falls
    assert schedule[max_steps] == pytest.approx(min_lr)
    assert schedule[max_steps + 4] == min_lr
    assert min(schedule) >= min_lr


@pytest.mark.parametrize("warmup, max_steps", [(1, 20), (5, 40), (13, 100)])
def test_lr_schedule_matches_reference_formula(warmup, max_steps):
    for step in range(max_steps + 3):
        assert lr_at(step, 6e-4, 6e-5, warmup, max_steps) == pytest.approx(
            reference_lr(step, 6e-4, 6e-5, warmup, max_steps), rel=1e-12)


@pytest.mark.parametrize("warmup, max_steps", [(2, 20), (5, 40), (13, 100)])
def test_lr_schedule_matches_torch_schedulers(warmup, max_steps):
    """Linear warmup then cosine annealing, as torch.optim.lr_scheduler composes them."""
    lr, min_lr = 1e-3, 1e-4
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps - warmup, eta_min=min_lr),
    ], milestones=[warmup])
    for step in range(max_steps + 1):
        assert lr_at(step, lr, min_lr, warmup, max_steps) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 1e-3, 1e-4, 0, 100) == pytest.approx(1e-3)


# ---- optimizer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie_weights", [True, False])
def test_no_weight_decay_on_biases_norms_and_embeddings(tiny_config, tie_weights):
    config = ModelConfig(**{**tiny_config.to_dict(), "tie_weights": tie_weights})
    model = GPT(config)
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    by_id = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    all_params = {id(p): name for name, p in model.named_parameters()}  # a tied tensor appears once
    assert sorted(by_id) == sorted(all_params)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(all_params)  # nothing twice
    for name, p in model.named_parameters():
        no_decay = (name.endswith("bias") or "norm" in name or name in ("tok_emb.weight", "pos_emb.weight"))
        assert by_id[id(p)] == (0.0 if no_decay else 0.1), name
    decayed = {all_params[i] for i, wd in by_id.items() if wd > 0}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == linear_weights - ({"lm_head.weight"} if tie_weights else set())
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
