"""Choosing the next token from a model's logits.

Each step is a small function of a (B, V) logits tensor, so the pieces can be tested, plotted and
combined: temperature scaling, top-k filtering, then a draw from the softmax.
"""

from __future__ import annotations

import torch


class SamplingError(ValueError):
    """A generation argument is invalid; the message names it and the valid range."""


def check_sampling_args(temperature: float, top_k: int | None, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer.")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise SamplingError(f"temperature={temperature!r} must be >= 0 (0 means greedy: always the most likely token).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SamplingError(f"top_k={top_k!r} must be a positive integer or None (no filtering).")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature`: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row and set the rest to -inf (ties at the k-th value are kept)."""
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of (B, V) logits; returns (B, 1). temperature=0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
