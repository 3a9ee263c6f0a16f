"""Causal self-attention.

Two paths compute the same thing:
- `manual_causal_attention`: scores, mask, softmax, weighted sum, written out so it can be read
  and so the attention weights can be returned;
- PyTorch's `scaled_dot_product_attention`, a fused kernel that never materialises the T x T
  score matrix on devices that support that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) boolean mask, True where a query may look at a key (key position <= query position)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def manual_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out step by step.

    q, k, v: (B, H, T, D). Returns the output (B, H, T, D) and the weights (B, H, T, T).
    """
    T, D = q.size(-2), q.size(-1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~causal_mask(T, q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused Q/K/V projection, H heads, an output projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.d_model
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.use_sdpa = config.attention == "sdpa"
        self.qkv = nn.Linear(C, 3 * C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        """x: (B, T, C) -> (B, T, C); with `return_weights`, also the (B, H, T, T) weights."""
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if self.use_sdpa and not return_weights:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y, weights = manual_causal_attention(q, k, v, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_drop(self.proj(y))
        return (y, weights) if return_weights else y
