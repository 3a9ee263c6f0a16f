"""Checkpoints: written atomically, loaded without running code from the file, checked on load.

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
    checksums             sha256 of every tensor (name, dtype, shape, bytes) and of the entries that
                          describe the model (config, lora, tokenizer); absent in older checkpoints

What can go wrong, and what happens (the book's appendix has the table with the tests):
- a flipped bit on disk: the checksums no longer match; loading names the file and the tensor.
- NaN or inf weights (a run that diverged): `load_model` names the tensors (`allow_nonfinite=True` loads them).
- a hostile or damaged file: torch's safe loader runs no code, but it would still allocate what the
  file declares. Compressed records (a zip bomb) are refused before reading, and a config is checked
  against the stored tensors' shapes before a model is built from it.
- a crash mid-save: the old file stays whole; the next save into that folder removes the temporary
  file the crashed writer left.
- a full disk, a read-only folder, a path that is a folder or lies under a file: CheckpointSaveError,
  one line naming the path and the fix; the old file stays whole.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from . import files
from .config import ModelConfig
from .device import resolve_device
from .model import GPT
from .tokenizers import tokenizer_from_dict

FORMAT = "lm-checkpoint"
VERSION = 1
DESCRIPTION_KEYS = ("config", "lora", "tokenizer")  # the plain data a model is built from; covered by the checksums
TEMP_SUFFIX = ".lm-partial"  # a checkpoint being written; it becomes the checkpoint with os.replace
STALE_AFTER_S = 60.0  # a temporary file untouched this long, and unlocked, was left by a crashed save
CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # weights searched for NaN/inf
EDITED = "(Edited on purpose? Delete its 'checksums' entry.)"
DERIVED_ELEMENTS = 2**28  # tables a config implies but a checkpoint does not store (RoPE, sinusoids): 1 GiB in fp32


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or not an `lm` checkpoint."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written: the message names the path and the fix. Whatever file was
    at that path before is untouched, and no temporary file is left behind."""


def git_sha() -> str | None:
    """The commit of the code that writes the checkpoint, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---- checksums -----------------------------------------------------------------------------------
def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, named by its path: 'model/tok_emb.weight',
    'optimizer/state/0/exp_avg'."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}/{i}" if prefix else str(i))


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes. (sha256 rather than blake2b: CPUs with
    SHA extensions hash it about 2.5x faster, ~1.5 GB/s.)"""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def description_digest(ckpt: dict) -> str:
    """sha256 of the entries a model is built from (config, lora, tokenizer), by their repr: plain
    data round-trips through the safe loader unchanged, and so does its repr."""
    return hashlib.sha256(repr([ckpt.get(key) for key in DESCRIPTION_KEYS]).encode()).hexdigest()


def checksums(payload: dict) -> dict:
    """The `checksums` entry of a checkpoint: one digest per tensor, one for the model's description."""
    return {
        "algorithm": "sha256",
        "tensors": {name: tensor_digest(name, t) for name, t in named_tensors(payload)},
        "description": description_digest(payload),
    }


def verify_checksums(ckpt: dict, where: str, parts: tuple[str, ...] | None = None) -> None:
    """Raise CheckpointError when a tensor under `parts` (top-level keys; None: all of them) or the
    model's description differs from what was saved. Checkpoints written before checksums pass."""
    saved = ckpt.get("checksums")
    if saved is None:
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
        raise CheckpointError(f"{where} is corrupt: its 'checksums' entry is damaged.")
    if saved.get("description") != description_digest(ckpt):
        raise CheckpointError(f"{where} is corrupt: its config, lora or tokenizer entry differs from what was saved. "
                              f"{EDITED}")
    present = {name: t for name, t in named_tensors({k: v for k, v in ckpt.items() if k != "checksums"})
               if parts is None or name.split("/")[0] in parts}
    expected = {name: digest for name, digest in saved["tensors"].items()
                if parts is None or name.split("/")[0] in parts}
    if present.keys() != expected.keys():
        odd = sorted(present.keys() ^ expected.keys())
        raise CheckpointError(f"{where} is corrupt: tensors {odd[:5]} are missing or were not saved. {EDITED}")
    damaged = [name for name, t in present.items() if tensor_digest(name, t) != expected[name]]
    if damaged:
        raise CheckpointError(f"{where} is corrupt: tensor(s) {damaged[:5]} do not match the checksums saved "
                              f"with them (a damaged disk or an interrupted copy); use another checkpoint. {EDITED}")


# ---- saving --------------------------------------------------------------------------------------
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
    adds entries (the trainer's state for resuming, EMA weights). Raises CheckpointSaveError (an
    OSError) when the file cannot be written: a full disk, a read-only folder, a bad path."""
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
    payload["checksums"] = checksums(payload)
    return write_atomically(Path(path), payload)


def write_atomically(path: Path, payload: dict) -> Path:
    """torch.save `payload` to `path` through `lm.files.write_atomically` (a locked temporary file,
    renamed when whole), first removing what crashed saves left in the folder; a failure to write
    becomes one CheckpointSaveError line."""
    if path.is_dir():
        raise CheckpointSaveError(errno.EISDIR, f"cannot save checkpoint to {str(path)!r}: it is a folder; "
                                                f"give a file name such as {str(path / 'last.pt')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temp_files(path.parent)
        return files.write_atomically(path, lambda f: torch.save(payload, f), suffix=TEMP_SUFFIX)
    except Exception as err:
        if (cause := os_error_in(err)) is not None:
            raise save_error(path, cause) from err
        raise


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a failed write as RuntimeError('unexpected pos
    ...'), with the OSError the file raised as its context."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def save_error(path: Path, err: OSError) -> CheckpointSaveError:
    """One line that says why `path` could not be written and what to do about it."""
    if isinstance(err, CheckpointSaveError):
        return err
    where = f"cannot save checkpoint {str(path)!r}"
    unchanged = "the previous checkpoint there, if any, is unchanged"
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message = f"{where}: the disk is full ({err.strerror}); free space or save elsewhere; {unchanged}."
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = (f"{where}: the folder {str(path.parent)!r} is not writable ({err.strerror}); fix its "
                   f"permissions or save elsewhere; {unchanged}.")
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        message = f"{where}: a part of the folder path {str(path.parent)!r} is a file, not a folder; choose another path."
    else:
        message = f"{where}: {err.strerror or err}; {unchanged}."
    return CheckpointSaveError(err.errno, message) if err.errno else CheckpointSaveError(message)


def remove_abandoned_temp_files(folder: Path) -> None:
    """Delete the temporary files that crashed saves left in `folder`: old enough, and nobody holds
    their lock (a lock dies with its process, so a live writer's file is never touched)."""
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        try:
            # a file touched a moment ago may be a live writer's that has not taken its lock yet
            if time.time() - tmp.stat().st_mtime > STALE_AFTER_S and not files.is_locked(tmp):
                tmp.unlink()
        except OSError:  # deleted by another process meanwhile, or (Windows) open in a live writer
            continue


# ---- loading -------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    verify: bool | None = None) -> dict:
    """Read a checkpoint dict. Only tensors and plain data are accepted (`weights_only=True`).

    `mmap=True` maps the tensors instead of reading them (for a look at the settings alone).
    `verify` checks every tensor against the checksums saved with it (CheckpointError if one
    differs); by default it does so unless `mmap=True`, since hashing reads every byte (~1 s per 1.5 GB)."""
    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where} does not exist; train a model first (lm train) or check the path.")
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"cannot read {where} as an lm checkpoint (truncated, damaged, or another kind of "
                              f"file): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an lm checkpoint (no 'format': '{FORMAT}' entry).")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{where} has checkpoint version {version!r}; this lm reads versions up "
                              f"to {VERSION}: upgrade lm.")
    check_storage_sizes(ckpt, where)
    if verify is None:
        verify = not mmap  # hashing reads every byte, which is what mmap=True is there to avoid
    if verify:
        verify_checksums(ckpt, where)
    return ckpt


def check_archive(path: Path) -> None:
    """Refuse, before torch reads a byte of it, a file whose records would unpack to more than the
    file holds: torch.save stores records uncompressed, but torch.load also inflates compressed ones,
    so a 1 MB crafted file could make it allocate 1 GB. Files that are not zip archives pass; torch
    reports on them."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception:  # not a zip archive, or a damaged one: torch.load says what is wrong with it
        return
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed or sum(r.file_size for r in records) > path.stat().st_size:
        raise CheckpointError(f"{str(path)!r} is corrupt or crafted: its records {compressed[:3]} are compressed "
                              f"or larger than the file, which torch.save never writes; it was not loaded.")


def check_storage_sizes(ckpt: dict, where: str) -> None:
    """A tensor must not have more elements than the file stores for it. The safe loader accepts a
    view that repeats one stored number a trillion times (stride 0); copying it would allocate them all."""
    for name, tensor in named_tensors(ckpt):
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise CheckpointError(f"{where} is corrupt or crafted: tensor {name!r} of shape {tuple(tensor.shape)} "
                                  f"is backed by only {tensor.untyped_storage().nbytes()} stored bytes.")


def check_config_fits_weights(config: ModelConfig, weights: dict, lora: dict | None) -> None:
    """Refuse a config that describes a bigger model than the stored weights, before the model is
    built: building allocates every tensor the config describes, whatever the file holds.

    The counts of modules come first (building even an empty skeleton of a million layers takes
    minutes); then a skeleton on the meta device, which allocates nothing, gives every shape."""
    layers = {key.split(".")[1] for key in weights if key.startswith("blocks.")}
    if len(layers) != config.n_layer:
        raise CheckpointError(f"the checkpoint's config says n_layer={config.n_layer} but its weights hold "
                              f"{len(layers)} blocks; the file is corrupt or was edited.")
    experts = {key.split(".")[4] for key in weights if key.startswith("blocks.0.mlp.experts.")}
    if config.ffn == "moe" and len(experts) != config.n_experts:
        raise CheckpointError(f"the checkpoint's config says n_experts={config.n_experts} but its weights hold "
                              f"{len(experts)} experts per block; the file is corrupt or was edited.")
    with torch.device("meta"):
        skeleton = GPT(config)
        if lora:
            from .lora import LoRAConfig, apply_lora

            apply_lora(skeleton, LoRAConfig.from_dict(lora))
    expected = skeleton.state_dict()
    wrong = [f"{name}: config {tuple(expected[name].shape)}, stored {tuple(t.shape)}"
             for name, t in weights.items() if name in expected and expected[name].shape != t.shape]
    if wrong:
        raise CheckpointError(f"the checkpoint's config does not match its weights' shapes ({'; '.join(wrong[:3])}); "
                              f"the file is corrupt or was edited.")
    needed = sum(t.numel() for t in skeleton.parameters()) + sum(t.numel() for t in skeleton.buffers())
    stored = sum(t.numel() for t in weights.values())
    if needed > stored + DERIVED_ELEMENTS:
        raise CheckpointError(f"the checkpoint's config describes a model of {needed:,} numbers but the file "
                              f"stores {stored:,} (block_size={config.block_size}?); the file is corrupt or was edited.")


def nonfinite_tensors(weights: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf. (min and max are NaN when any
    value is, and a reduction allocates nothing. float8 weights are not checked: no CPU kernel.)"""
    bad = []
    for name, tensor in weights.items():
        if tensor.dtype in CHECKED_FLOATS and tensor.numel():
            low, high = torch.aminmax(tensor.detach())
            if not (torch.isfinite(low) and torch.isfinite(high)):
                bad.append(name)
    return bad


def model_from_checkpoint(ckpt: dict, device: str | torch.device | None = None, strict: bool = True,
                          ema: bool = True, verify: bool = True, allow_nonfinite: bool = False,
                          trust_pattern: bool = False) -> GPT:
    """Build the model a checkpoint dict describes, load its weights and attach its tokenizer.

    When training kept an EMA of the weights, the averaged weights are loaded (`ema=False`: the
    trained weights themselves). `verify` checks those weights and the config against the checksums
    saved with them; weights with NaN or inf raise CheckpointError unless `allow_nonfinite=True`.
    A byte-level BPE tokenizer with a regex of its own (not GPT-2's or GPT-4's) is rebuilt only with
    `trust_pattern=True`: a crafted regex can take hours on a short text."""
    missing = [key for key in ("config", "model") if key not in ckpt]
    if missing:
        raise CheckpointError(f"the checkpoint has no {missing} entry; it was not written by lm.save_checkpoint.")
    part = "ema" if ema and ckpt.get("ema") is not None else "model"
    weights = ckpt[part]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CheckpointError(f"the checkpoint's {part!r} entry is not a dict of tensors; the file is corrupt.")
    if verify:
        verify_checksums(ckpt, "the checkpoint", parts=(part,))
    try:
        config = ModelConfig.from_dict(ckpt["config"])
    except Exception as err:  # ConfigError, or a damaged entry that is not even a dict
        raise CheckpointError(f"the checkpoint's config is invalid: {err}") from err
    check_config_fits_weights(config, weights, ckpt.get("lora"))
    nonfinite = [] if allow_nonfinite else nonfinite_tensors(weights)
    if nonfinite:
        raise CheckpointError(f"the checkpoint's weights {nonfinite[:10]} hold NaN or inf (the run diverged); "
                              f"use an earlier checkpoint, or pass allow_nonfinite=True to load them anyway.")
    try:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"], trust_pattern) if ckpt.get("tokenizer") else None
    except Exception as err:  # TokenizerError, or a damaged entry
        raise CheckpointError(f"the checkpoint's tokenizer cannot be rebuilt: {err}") from err
    model = GPT(config, tokenizer=tokenizer)
    if ckpt.get("lora"):  # a LoRA fine-tune: the same adapters go on before its weights
        from .lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig.from_dict(ckpt["lora"]))
    try:
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
               ema: bool = True, allow_nonfinite: bool = False, trust_pattern: bool = False) -> GPT:
    """Load a trained model for inference: `lm.load_model("runs/x/best.pt", device="cpu")`.

    Returns the model in eval mode with its tokenizer attached, so
    `model.generate("prompt", max_new_tokens=100, temperature=0.8)` returns text.
    `device=None` picks cuda, then mps, then cpu. A run trained with an EMA of its weights loads the
    averaged weights unless `ema=False`. Raises CheckpointError, naming the file, when it is missing,
    corrupt, crafted, or holds NaN/inf weights (`allow_nonfinite=True` loads those). A tokenizer
    regex that is not one of lm's is refused unless `trust_pattern=True` (see model_from_checkpoint).
    """
    ckpt = load_checkpoint(path, verify=False)  # model_from_checkpoint verifies the weights it uses, not the optimizer's
    try:
        model = model_from_checkpoint(ckpt, device=device, strict=strict, ema=ema, allow_nonfinite=allow_nonfinite,
                                      trust_pattern=trust_pattern)
    except CheckpointError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from err
    return model.eval()
