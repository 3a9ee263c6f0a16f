"""Checkpoints: written atomically, loaded without running code from the file.

A checkpoint is a dict of tensors and plain data (never pickled classes), so it loads with
`torch.load(..., weights_only=True)`:

    format, version       "lm-checkpoint", 1
    model                 the model's state_dict
    config                ModelConfig.to_dict()
    tokenizer             the tokenizer's to_dict(), or None
    optimizer             the optimizer's state_dict, or None
    scaler                a GradScaler's state_dict, or None (mixed precision)
    step, best_val_loss   where training stood
    train_config          the training settings, as a dict
    git_sha, timestamp    where the code and the time it was written, when known
    trainer               written by lm.train, for resuming: the batch stream's position, RNG states,
                          the learning-rate schedule, the history so far, early-stopping counters
    ema                   the exponential moving average of the weights (a state_dict), or None
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .device import resolve_device
from .model import GPT
from .tokenizers import tokenizer_from_dict

FORMAT = "lm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an `lm` checkpoint."""


def git_sha() -> str | None:
    """The commit of the code that writes the checkpoint, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_checkpoint(
    path: str | Path,
    model: GPT,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    step: int = 0,
    best_val_loss: float | None = None,
    train_config: dict | None = None,
    extra: dict | None = None,
    model_state: dict | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically: a crash mid-save leaves any earlier file whole.

    `model_state` replaces `model.state_dict()` (weights gathered from FSDP shards, say); `extra`
    adds entries (the trainer's state for resuming, EMA weights)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict() if model_state is None else model_state,
        "config": model.config.to_dict(),
        "lora": lora_config.to_dict() if (lora_config := getattr(model, "lora_config", None)) is not None else None,
        "tokenizer": model.tokenizer.to_dict() if model.tokenizer is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "best_val_loss": None if best_val_loss is None else float(best_val_loss),
        "train_config": dict(train_config or {}),
        "git_sha": git_sha(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        payload.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint dict. Only tensors and plain data are accepted (`weights_only=True`).
    `mmap=True` maps the tensors instead of reading them (for a look at the settings alone)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train a model first (lm train) "
                              f"or check the path.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"cannot read {str(path)!r} as an lm checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an lm checkpoint (no 'format': '{FORMAT}' entry).")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {version!r}; this lm reads versions up "
                              f"to {VERSION}: upgrade lm.")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device | None = None, strict: bool = True,
                          ema: bool = True) -> GPT:
    """Build the model a checkpoint dict describes, load its weights and attach its tokenizer.

    When training kept an EMA of the weights, the averaged weights are loaded (`ema=False`: the
    trained weights themselves)."""
    missing = [key for key in ("config", "model") if key not in ckpt]
    if missing:
        raise CheckpointError(f"the checkpoint has no {missing} entry; it was not written by lm.save_checkpoint.")
    config = ModelConfig.from_dict(ckpt["config"])
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    model = GPT(config, tokenizer=tokenizer)
    if ckpt.get("lora"):  # a LoRA fine-tune: the same adapters go on before its weights
        from .lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig.from_dict(ckpt["lora"]))
    try:
        weights = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes differ: the weights belong to another configuration
        raise CheckpointError(f"checkpoint weights do not fit the model its config describes: {err}") from err
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint weights do not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; pass strict=False to load what matches."
        )
    return model.to(resolve_device(device))


def load_model(path: str | Path, device: str | torch.device | None = None, strict: bool = True,
               ema: bool = True) -> GPT:
    """Load a trained model for inference: `lm.load_model("runs/x/best.pt", device="cpu")`.

    Returns the model in eval mode with its tokenizer attached, so
    `model.generate("prompt", max_new_tokens=100, temperature=0.8)` returns text.
    `device=None` picks cuda, then mps, then cpu. A run trained with an EMA of its weights loads the
    averaged weights unless `ema=False`.
    """
    model = model_from_checkpoint(load_checkpoint(path), device=device, strict=strict, ema=ema)
    return model.eval()
