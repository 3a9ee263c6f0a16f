"""Small helpers shared by several test files."""

from __future__ import annotations

import torch

from lm import GPT, ModelConfig


def sharp_model(config: ModelConfig) -> GPT:
    """Large random weights: unlike a freshly initialised model, its predictions depend on distant tokens."""
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.5)
    return model
