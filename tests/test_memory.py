from __future__ import annotations

import logging
import math

import pytest
import torch

import lm
import lm.trainer
from lm.memory import find_batch_size, training_memory

T = 16  # tiny_config's block_size


def trials_logged(caplog) -> list[int]:
    """The batch sizes find_batch_size tried, in order, read back from its log."""
    return [int(r.getMessage().split("batch size ")[1].split()[0]) for r in caplog.records
            if r.name == "lm.memory" and r.getMessage().startswith("trial ")]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


# ---- the search ------------------------------------------------------------------------------------
def test_search_doubles_then_bisects(caplog):
    caplog.set_level(logging.INFO, logger="lm.memory")
    assert find_batch_size(None, T, fits=lambda b: b <= 37) == 37
    assert trials_logged(caplog) == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert "largest batch size: 37 (12 trials)" in caplog.text


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 37, 64, 65, 100, 777, 1023])
def test_search_finds_any_limit_in_log_trials(caplog, limit):
    caplog.set_level(logging.INFO, logger="lm.memory")
    assert find_batch_size(None, T, fits=lambda b: b <= limit) == limit
    trials = trials_logged(caplog)
    assert len(trials) <= 2 * math.ceil(math.log2(limit + 1)) + 1  # O(log n), not a linear scan
    assert len(set(trials)) == len(trials)  # no batch is tried twice


def test_search_stops_at_max_batch_size(caplog):
    caplog.set_level(logging.INFO, logger="lm.memory")
    assert find_batch_size(None, T, max_batch_size=100, fits=lambda b: True) == 100
    assert trials_logged(caplog) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert find_batch_size(None, T, start=5, max_batch_size=5, fits=lambda b: True) == 5


def test_search_from_another_start(caplog):
    caplog.set_level(logging.INFO, logger="lm.memory")
    assert find_batch_size(None, T, start=3, fits=lambda b: b <= 20) == 20
    assert trials_logged(caplog)[:4] == [3, 6, 12, 24]


def test_search_start_beyond_the_limit():
    with pytest.raises(ValueError, match=r"not even batch size start=4 fits; lower start"):
        find_batch_size(None, T, start=4, fits=lambda b: b <= 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"start": 0}, "start=0 must be a positive int"),
    ({"start": 1.5}, "start=1.5 must be a positive int"),
    ({"max_batch_size": -1}, "max_batch_size=-1 must be a positive int"),
    ({"start": 8, "max_batch_size": 4}, "start=8 is larger than max_batch_size=4"),
])
def test_search_bad_bounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_batch_size(None, T, fits=lambda b: True, **kwargs)


def test_fits_must_be_callable():
    with pytest.raises(TypeError, match="fits must be a function"):
        find_batch_size(None, T, fits=37)


# ---- measuring a step ------------------------------------------------------------------------------
def test_training_memory_parts(tiny_model):
    parts = training_memory(tiny_model, 2, T)
    assert set(parts) == {"params", "buffers", "grads", "optimizer", "activations", "total"}
    params = sum(p.numel() * p.element_size() for p in tiny_model.parameters())  # a tied tensor once
    assert parts["params"] == params
    assert parts["grads"] == params  # fp32 gradients, one per parameter
    n_tensors = len(list(tiny_model.parameters()))
    # AdamW: exp_avg and exp_avg_sq (fp32) per parameter, plus a 1-element step counter each
    assert 2 * params <= parts["optimizer"] <= 2 * params + 8 * n_tensors
    assert parts["activations"] > 0
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_tied_weights_are_counted_once(tiny_config):
    tied = lm.GPT(tiny_config)
    untied = lm.GPT(lm.ModelConfig(**{**tiny_config.to_dict(), "tie_weights": False}))
    head = untied.lm_head.weight
    extra = head.numel() * head.element_size()
    assert training_memory(untied, 1, T)["params"] - training_memory(tied, 1, T)["params"] == extra


def test_activations_grow_linearly_with_the_batch(tiny_model):
    a1, a2, a4 = (training_memory(tiny_model, b, T)["activations"] for b in (1, 2, 4))
    # on top of one fixed tensor: the head's weight gradient, which the fused loss keeps from the forward pass
    head = tiny_model.lm_head.weight
    fixed = head.numel() * head.element_size()
    assert a2 - fixed == pytest.approx(2 * (a1 - fixed), rel=0.03)
    assert a4 - fixed == pytest.approx(4 * (a1 - fixed), rel=0.03)
    assert training_memory(tiny_model, 2, T // 2)["activations"] < a2  # and with the window


def saved_by_the_graph(model, batch_size: int, seq_len: int) -> int:
    """Bytes autograd keeps for the backward pass, found another way than training_memory does:
    walk the graph from the loss (of training's call: the fused head and loss) and read every node's
    `_saved_*` tensors, and a custom autograd Function's `saved_tensors`."""
    model_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    x = torch.randint(model.config.vocab_size, (batch_size, seq_len))
    y = torch.randint(model.config.vocab_size, (batch_size, seq_len))
    model.train()
    _, loss = model(x, y, return_logits=False)
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        custom = isinstance(node, torch.autograd.function.BackwardCFunction)
        for name in dir(node):
            if not (name.startswith("_saved_") or custom and name == "saved_tensors"):
                continue
            value = getattr(node, name)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in model_storages:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("components", [{}, {"pos": "rope", "norm": "rmsnorm", "ffn": "swiglu"}])
def test_activations_match_the_autograd_graph(tiny_config, components):
    model = lm.GPT(lm.ModelConfig(**{**tiny_config.to_dict(), **components}))
    measured = training_memory(model, 3, T)["activations"]
    assert measured == pytest.approx(saved_by_the_graph(model, 3, T), rel=0.02)


def test_the_trial_step_is_the_trainers_step(tiny_model, monkeypatch):
    """training_memory measures what training runs: lm.trainer.Trainer's own step, not a copy of it."""
    steps = []
    real = lm.trainer.Trainer.train_step
    monkeypatch.setattr(lm.trainer.Trainer, "train_step", lambda self: steps.append(self.config) or real(self))
    training_memory(tiny_model, 3, T, precision="bf16")
    find_batch_size(tiny_model, T, memory_budget=10**9, max_batch_size=2)
    assert [(c.batch_size, c.seq_len, c.precision) for c in steps] == [(3, T, "bf16"), (1, T, "fp32"), (2, T, "fp32")]


def test_bf16_activations_are_smaller(tiny_model):
    fp32 = training_memory(tiny_model, 4, T)
    bf16 = training_memory(tiny_model, 4, T, precision="bf16")
    assert bf16["activations"] < fp32["activations"]
    assert bf16["params"] == fp32["params"]  # autocast keeps fp32 weights


# ---- the model is left as it was -------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_the_model_is_unchanged(tiny_model, training):
    tiny_model.train(training)
    before, rng = snapshot(tiny_model), torch.get_rng_state()
    training_memory(tiny_model, 3, T)
    find_batch_size(tiny_model, T, memory_budget=10**9, max_batch_size=8)
    assert_same(tiny_model, before)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert tiny_model.training is training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws in the trials do not shift later ones


def test_existing_gradients_are_kept(tiny_model):
    x = torch.randint(tiny_model.config.vocab_size, (2, T))
    tiny_model(x, x)[1].backward()
    grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters()}
    training_memory(tiny_model, 2, T)
    assert all(torch.equal(p.grad, grads[name]) for name, p in tiny_model.named_parameters())


# ---- find_batch_size on a CPU ----------------------------------------------------------------------
def test_budget_between_batch_4_and_5_gives_4(tiny_model, caplog):
    need = {b: training_memory(tiny_model, b, T)["total"] for b in (1, 4, 5)}
    assert need[4] < need[5]
    caplog.set_level(logging.INFO, logger="lm.memory")
    assert find_batch_size(tiny_model, T, memory_budget=(need[4] + need[5]) // 2) == 4
    assert trials_logged(caplog) == [1, 2, 4, 8, 6, 5]
    assert find_batch_size(tiny_model, T, memory_budget=need[4]) == 4  # the budget itself fits
    with pytest.raises(ValueError, match="not even batch size start=1 fits within memory_budget"):
        find_batch_size(tiny_model, T, memory_budget=need[1] - 1)


def test_cpu_needs_a_memory_budget(tiny_model):
    with pytest.raises(ValueError, match=r"memory_budget.*4 \* 2\*\*30"):
        find_batch_size(tiny_model, T)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": T + 1}, f"seq_len={T + 1} exceeds the model's block_size={T}; pass seq_len <= {T}"),
    ({"seq_len": 0}, "seq_len=0 must be a positive int"),
    ({"memory_budget": -5}, "memory_budget=-5 must be a positive number of bytes"),
    ({"precision": "fp8"}, "precision='fp8' is not one of"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_find_batch_size_bad_inputs(tiny_model, kwargs, match):
    args = {"seq_len": T, "memory_budget": 10**9, **kwargs}
    with pytest.raises(ValueError, match=match):
        find_batch_size(tiny_model, **args)


@pytest.mark.parametrize("args, match", [
    ((0, T), "batch_size=0 must be a positive int"),
    ((2, 99), "seq_len=99 exceeds the model's block_size=16"),
])
def test_training_memory_bad_inputs(tiny_model, args, match):
    with pytest.raises(ValueError, match=match):
        training_memory(tiny_model, *args)


def test_not_a_model():
    with pytest.raises(TypeError, match="model must be an lm.GPT"):
        training_memory(torch.nn.Linear(2, 2), 1, 1)


# ---- find_batch_size on a GPU (skipped without one) ------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_find_batch_size_on_cuda(tiny_config, caplog):
    caplog.set_level(logging.INFO, logger="lm.memory")
    torch.cuda.empty_cache()
    # memory the cache cannot give back before this test: segments that tensors of earlier tests still pin
    pinned = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    # a vocabulary small enough that the activations, not the loss's chunk of scores, set the memory a
    # sequence needs (with 32,000 the chunk, 6 bytes a score under bf16 autocast against 4 in fp32,
    # outweighed the halved activations, and bf16 fitted fewer sequences: 2 against 3, on an H200)
    model = lm.GPT(lm.ModelConfig(**{**tiny_config.to_dict(), "d_model": 256, "n_head": 4, "n_layer": 4,
                                     "block_size": 512, "vocab_size": 2048})).cuda()
    before = snapshot(model)
    budget = 2 * 2**30  # bytes of peak allocation allowed, far below the card's memory
    best = find_batch_size(model, 512, memory_budget=budget, max_batch_size=4096)
    assert 1 <= best < 4096
    # the weights, and the workspaces cuBLAS took from torch's allocator at its first product
    allocated = torch.cuda.memory_allocated()
    assert_same(model, before)
    assert all(p.grad is None for p in model.parameters()) and model.device.type == "cuda"
    # the answer is right: a step at `best` stays within the budget, one at best + 1 does not
    assert find_batch_size(model, 512, memory_budget=budget, start=best, max_batch_size=best) == best
    with pytest.raises(ValueError, match=f"not even batch size start={best + 1} fits within memory_budget"):
        find_batch_size(model, 512, memory_budget=budget, start=best + 1, max_batch_size=best + 1)
    assert_same(model, before)
    # without a budget, the search runs until the card itself is out of memory, and recovers: every
    # tensor of the failed steps is freed
    unbounded = find_batch_size(model, 512, max_batch_size=1 << 20)
    assert unbounded > best and torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_reserved() - allocated < pinned + 2**28  # and the cache was emptied
    assert_same(model, before)
    bf16 = find_batch_size(model, 512, memory_budget=budget, precision="bf16", max_batch_size=4096)
    assert bf16 > best  # half-width activations: more sequences fit
