"""An exponential moving average of a model's weights, kept beside the training run."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """An exponential moving average of the weights: ema = decay * ema + (1 - decay) * weights.

    The average is smoother than the weights themselves and often evaluates a little better. Early on,
    the decay is capped at (1 + n) / (10 + n) after n updates, so the average is not stuck near the
    random initial weights during short runs.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the averaged weights into `model` (to evaluate or save them)."""
        params = dict(model.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def weights(self, model: nn.Module) -> dict:
        """A full state dict of `model` with the averaged weights in place of the trained ones."""
        with self.applied(model):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
