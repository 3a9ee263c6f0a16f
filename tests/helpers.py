"""Small helpers shared by several test files."""

from __future__ import annotations

import threading

import torch

from lm import GPT, ModelConfig
from lm.trainer import run_lock


def sharp_model(config: ModelConfig) -> GPT:
    """Large random weights: unlike a freshly initialised model, its predictions depend on distant tokens."""
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.5)
    return model


def model_step(config: ModelConfig, ids: torch.Tensor):
    """(loss, {name: gradient}) of one forward and backward of a model built from `config` with seed 0."""
    torch.manual_seed(0)
    model = GPT(config)
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_step(step: tuple, other: tuple) -> None:
    """Two `model_step` results, (loss, {name: gradient}), equal to the bit"""
    assert torch.equal(step[0], other[0])
    for name, grad in step[1].items():
        assert torch.equal(grad, other[1][name]), name


def assert_steps_close(step: tuple, other: tuple) -> None:
    """Two `model_step` results, (loss, {name: gradient}), the same to float32 rounding: the loss within 1e-6,
    each gradient within a relative 1e-4 (products summed in another order)"""
    torch.testing.assert_close(step[0], other[0], rtol=1e-6, atol=1e-6)
    for name, grad in step[1].items():
        torch.testing.assert_close(grad, other[1][name], rtol=1e-4, atol=1e-6, msg=name)


def hold_lock_in_a_thread(out_dir):
    """Hold out_dir's lock from another thread (as another process would) until the returned
    function is called."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        with run_lock(out_dir):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(30)

    def let_go():
        release.set()
        thread.join()
    return let_go
