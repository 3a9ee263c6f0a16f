"""The moving average of the weights (lm/ema.py); the trainer's use of it is in test_trainer.py."""

from __future__ import annotations

import torch

from lm.ema import EMA


def test_ema_matches_a_manual_average():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9, (1 + k) / (10 + k))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n, value in ema.shadow.items():
        torch.testing.assert_close(value, expected[n])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        torch.testing.assert_close(model.weight, expected["weight"])
    assert torch.equal(model.weight, weights["weight"])  # restored afterwards


def test_ema_weights_are_a_full_state_dict_and_leave_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(model, decay=0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    weights = ema.weights(model)
    assert set(weights) == set(model.state_dict())
    torch.testing.assert_close(weights["0.weight"], ema.shadow["0.weight"])
    assert torch.equal(weights["1.weight"], before["1.weight"])
    assert torch.equal(model[0].weight, before["0.weight"] + 1.0)  # the trained weights stay in the model
