"""Device choice: explicit when the caller names one, automatic otherwise (cuda, then mps, then cpu)."""

from __future__ import annotations

import torch


def auto_device() -> torch.device:
    """The best device this machine has: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks `auto_device()`; anything else must name a device torch can use."""
    if device is None or device == "auto":
        return auto_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device name; use 'cpu', 'cuda', 'cuda:0', 'mps' or 'auto'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'.")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} was asked for but MPS is not available here; use 'cpu' or 'auto'.")
    return resolved
