"""Normalisation layers, chosen by name with `ModelConfig(norm=...)`.

Each rescales a vector of C channels so that the next layer sees inputs of a steady size:

    layernorm   (x - mean(x)) / sqrt(var(x) + eps) * weight + bias       Ba et al. 2016, GPT-2
    rmsnorm     x / sqrt(mean(x^2) + eps) * weight                        Zhang & Sennrich 2019, LLaMA
    scalenorm   g * x / max(||x||, eps), one scalar g initialised to sqrt(C)   Nguyen & Salazar 2019

The math is in functions (`rms_norm`, `scale_norm`); the modules only hold the parameters. Every
module is built as `cls(config)` and says how many parameters it has with `cls.param_count(config)`,
which `lm.count_params` uses to size a model without building it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import cpu_kernels
from .config import ModelConfig
from .registry import NORMS


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (..., C) divided by its root mean square over C, then scaled per channel by `weight` (C,).

    Unlike LayerNorm it does not subtract the mean: one reduction instead of two, and in practice
    the re-centring is not what makes normalisation help. Half inputs are computed in float32.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32: squares of half overflow
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)
    return y if weight is None else y * weight


def scale_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C) projected onto the sphere of radius g: g * x / ||x||, with ||x|| floored at eps."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp(min=eps)
    return (xf / norm).type_as(x) * g


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm over C channels; the bias follows `config.bias`, as in GPT-2."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.d_model, eps=config.norm_eps, bias=config.bias)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return config.d_model * (2 if config.bias else 1)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """`rms_norm` with a learned per-channel gain `weight` (C,), initialised to ones. No bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.empty(config.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return config.d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._in_c(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)  # float32 training on a CPU: in C (chapter 6)
        return rms_norm(x, self.weight, self.eps)

    def _in_c(self, x: torch.Tensor) -> bool:
        """Whether `forward` runs in lm's C kernel (`lm.cpu_kernels.rms_norm`): float32 training on a CPU, no autocast
        and no torch.compile (`float32_training`), a float32 weight, and rows the kernel takes."""
        return (self.weight.dtype == torch.float32 and x.numel() > 0 and cpu_kernels.float32_training(x, (self.weight,))
                and cpu_kernels.rows_unavailable(x.size(-1)) is None)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


@NORMS.register("scalenorm")
class ScaleNorm(nn.Module):
    """`scale_norm` with one learned scalar `g`, initialised to sqrt(C): a unit-variance vector of
    C channels has length about sqrt(C), so at initialisation the output has the size of that."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.norm_eps
        self.d_model = config.d_model
        self.g = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.g, math.sqrt(self.d_model))

    @staticmethod
    def param_count(config: ModelConfig) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_norm(x, self.g, self.eps)

    def extra_repr(self) -> str:
        return f"g0=sqrt({self.d_model}), eps={self.eps}"


NORM_TYPES = (LayerNorm, RMSNorm, ScaleNorm)  # what GPT.reset_parameters resets to their initial values
