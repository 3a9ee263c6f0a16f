"""Checkpoints: written atomically, loaded without running code from the file, checked on load.

A checkpoint is a dict of tensors and plain data (never pickled classes), so it loads with
`torch.load(..., weights_only=True)`:

    format, version       "lm-checkpoint", 2 (the layout of this dict; see "Versions" below)
    lm_version            the version of lm that wrote the file ("0.1.0"; "unknown" for version-1 files)
    model                 the model's state_dict
    config                ModelConfig.to_dict()
    lora                  the LoRA adapters' config (LoRAConfig.to_dict()), or None
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
                          describe the model (config, lora, tokenizer); always there since version 2

Two file formats hold the same dict, and loading tells them apart by their first bytes, not their name:
- `.pt` (the default): torch.save's zip archive. It holds everything, the optimizer state included.
- `.safetensors` (a path ending in it, or `format="safetensors"`): every tensor as a safetensors
  tensor named by its place in the dict ("model/tok_emb.weight", "ema/norm_f.weight"), and the rest
  as one JSON text in the file's metadata, under the key "lm" (bytes as base64, tuples marked). A
  tensor that appears twice (the tied token embedding and output head) is stored once and tied
  again on load. The format cannot run code by design and any safetensors reader can open the
  weights (`safetensors.torch.load_file(path)["model/tok_emb.weight"]`). It holds a model, not a
  training run: saving an optimizer or a GradScaler to it raises ValueError; keep those in a `.pt`.

Versions. lm follows semantic versioning (CHANGELOG.md), and every checkpoint records the lm that
wrote it. Checkpoints keep loading across minor versions of lm:
- a minor version only adds: config fields whose defaults reproduce the old behaviour (a stored
  config that lacks a field gets its default from ModelConfig.from_dict), and optional entries;
- a change of layout bumps `VERSION` and registers a converter in `UPGRADES`, from the old version
  to the next; `load_checkpoint` applies them in order, so files of every earlier version keep
  loading and callers always see the current layout (the dict's `upgraded_from` says which version
  the file holds). Only a major version of lm may stop reading an old layout; `convert_checkpoint`
  rewrites a file in the current one;
- a file newer than this lm (a version or a config field it does not know) is refused with the
  version of lm that wrote it: upgrade lm.

What can go wrong, and what happens (the book's appendix has the table with the tests):
- a flipped bit on disk: the checksums no longer match; loading names the file and the tensor. A
  version-2 file without checksums is corrupt (a flipped bit in the key's name would otherwise make
  it look like an old file that never had them).
- NaN or inf weights (a run that diverged): `load_model` names the tensors (`allow_nonfinite=True` loads them).
- a hostile or damaged file: neither torch's safe loader nor safetensors runs code, but they would
  still allocate what the file declares. Compressed records (a zip bomb) are refused before reading,
  so are safetensors headers larger than the file (or than 100 MB) and tensors whose bytes lie
  beyond it; a config is checked against the stored tensors' shapes before a model is built from it.
- a crash mid-save: the old file stays whole; the next save into that folder removes the temporary
  file the crashed writer left.
- a full disk, a read-only folder, a path that is a folder or lies under a file: CheckpointSaveError,
  one line naming the path and the fix; the old file stays whole.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import math
import re
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import files
from .version import __version__
from .config import ModelConfig
from .device import resolve_device
from .model import GPT
from .tokenizers import tokenizer_from_dict
from .tokenizers.base import short_repr

FORMAT = "lm-checkpoint"
VERSION = 2  # 1: the first release; 2: lm_version recorded, checksums mandatory
DESCRIPTION_KEYS = ("config", "lora", "tokenizer")  # the plain data a model is built from; covered by the checksums
TEMP_SUFFIX = ".lm-partial"  # a checkpoint being written; it becomes the checkpoint with os.replace
STALE_AFTER_S = 60.0  # a temporary file untouched this long, and unlocked, was left by a crashed save
CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # weights searched for NaN/inf
EDITED = "(Edited on purpose? Store new checksums: ckpt['checksums'] = lm.checkpoint.checksums(ckpt).)"
DERIVED_ELEMENTS = 2**28  # tables a config implies but a checkpoint does not store (RoPE, sinusoids): 1 GiB in fp32
FILE_FORMATS = ("pt", "safetensors")
METADATA_KEY = "lm"  # the safetensors metadata entry that holds everything but the tensors, as JSON
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header (names, shapes, the JSON) longer than this is refused
TAGS = ("$tensor", "$bytes", "$tuple")  # in that JSON, {"$tensor": name} stands for a tensor, and so on
ITEM_BYTES = {  # safetensors' dtype names, and the bytes of one element
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"), 1),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 2),
    **dict.fromkeys(("U32", "I32", "F32"), 4),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 8),
}


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


def version_numbers(version: Any) -> tuple[int, ...] | None:
    """(0, 2, 1) for "0.2.1" (or "0.2.1.dev0"); None when `version` is not of that form ("unknown")."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return tuple(int(n) for n in found.groups()) if found else None


# ---- versions: converters from each older layout to the next ----------------------------------------
UPGRADES: dict[int, Callable[[dict], dict]] = {}  # version N -> a function from a version-N dict to version N+1


def upgrade_from(version: int) -> Callable[[Callable[[dict], dict]], Callable[[dict], dict]]:
    """Register the decorated function as the converter from checkpoint `version` to `version + 1`.

    A converter takes the dict as the file holds it (already checked against its checksums, when
    asked) and returns it in the next layout; `upgrade` sets the new version number. A converter
    that rewrites what the checksums cover (a tensor, the config, lora or tokenizer) first verifies
    it (`verify_checksums(ckpt, where, parts=...)`) and then stores new digests (`checksums`)."""
    def register(convert: Callable[[dict], dict]) -> Callable[[dict], dict]:
        if version in UPGRADES:
            raise ValueError(f"a converter from checkpoint version {version} is registered already: "
                             f"{UPGRADES[version].__name__}.")
        UPGRADES[version] = convert
        return convert
    return register


@upgrade_from(1)
def upgrade_1_to_2(ckpt: dict) -> dict:
    """Version 2 records the lm that wrote the file, unknown for version 1, and requires checksums:
    `load_checkpoint` checks that before upgrading, so version-1 files without them still load."""
    ckpt.setdefault("lm_version", "unknown")
    return ckpt


def upgrade(ckpt: dict, where: str = "the checkpoint") -> dict:
    """`ckpt` in the current layout, through the converters in `UPGRADES`; `upgraded_from` records
    the version the file holds when it was older."""
    written = ckpt["version"]
    for version in range(written, VERSION):
        convert = UPGRADES.get(version)
        if convert is None:
            raise CheckpointError(f"{where} has checkpoint version {version}, which this lm cannot convert "
                                  f"to version {VERSION}; load it with an older lm and save it again.")
        ckpt = convert(ckpt)
        ckpt["version"] = version + 1
    if written < VERSION:
        ckpt["upgraded_from"] = written
    return ckpt


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
    model's description differs from what was saved. A dict without checksums passes: a version-1
    file may lack them (load_checkpoint refuses a version-2 file without them)."""
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
    format: str | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically: a crash mid-save leaves any earlier file whole.

    `model_state` replaces `model.state_dict()` (weights gathered from FSDP shards, say); `extra`
    adds entries (the trainer's state for resuming, EMA weights). `format` is "pt" or "safetensors";
    by default a path ending in ".safetensors" gets safetensors, any other torch.save's archive. A
    safetensors file holds no optimizer or scaler state (ValueError). Raises CheckpointSaveError (an
    OSError) when the file cannot be written: a full disk, a read-only folder, a bad path."""
    format = file_format_for(path, format)
    if format == "safetensors" and (optimizer is not None or scaler is not None):
        raise ValueError(f"cannot save an optimizer or a GradScaler to the safetensors file {str(path)!r}: "
                         f"safetensors checkpoints hold a model, not a training run; save to a .pt file to "
                         f"resume training, or leave out optimizer= and scaler=.")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "lm_version": __version__,
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
    return write_checkpoint(Path(path), payload, format)


def file_format_for(path: str | Path, format: str | None) -> str:
    """The file format to write: `format` when given, else by the path's suffix."""
    if format is None:
        return "safetensors" if str(path).endswith(".safetensors") else "pt"
    if format not in FILE_FORMATS:
        raise ValueError(f"format={format!r} is not a checkpoint format; choose one of {FILE_FORMATS}.")
    return format


def write_checkpoint(path: Path, payload: dict, format: str = "pt") -> Path:
    """Write the checkpoint dict `payload` to `path` in `format` ("pt" or "safetensors") through
    `lm.files.write_atomically` (a locked temporary file, renamed when whole), first removing what
    crashed saves left in the folder; a failure to write becomes one CheckpointSaveError line."""
    if format == "safetensors":
        data = safetensors_bytes(payload)  # before any file is touched: an entry it cannot hold raises here
        write = lambda f: f.write(data)  # noqa: E731
    else:
        write = lambda f: torch.save(payload, f)  # noqa: E731
    if path.is_dir():
        raise CheckpointSaveError(errno.EISDIR, f"cannot save checkpoint to {str(path)!r}: it is a folder; "
                                                f"give a file name such as {str(path / 'last.pt')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temp_files(path.parent)
        return files.write_atomically(path, write, suffix=TEMP_SUFFIX)
    except Exception as err:
        if (cause := os_error_in(err)) is not None:
            raise save_error(path, cause) from err
        raise


def convert_checkpoint(src: str | Path, dst: str | Path, format: str | None = None) -> Path:
    """Rewrite the checkpoint `src` as `dst` in the current layout (the conversion after a change of
    checkpoint version), or in the other file format: `dst` ending in ".safetensors" (or `format`)
    gives safetensors, which leaves out the optimizer and scaler state. Every tensor of `src` is
    checked against its checksums first; the copy records this lm's version and new checksums."""
    format = file_format_for(dst, format)
    ckpt = load_checkpoint(src)
    ckpt.pop("upgraded_from", None)
    if format == "safetensors":
        ckpt["optimizer"] = ckpt["scaler"] = None
    ckpt["lm_version"] = __version__
    ckpt["checksums"] = checksums({key: value for key, value in ckpt.items() if key != "checksums"})
    return write_checkpoint(Path(dst), ckpt, format)


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


# ---- safetensors: the tensors in the safetensors layout, everything else as JSON -------------------
def safetensors_bytes(payload: dict) -> bytes:
    """`payload` as the bytes of a safetensors file: each tensor under its place in the dict, the
    rest as JSON in the metadata. A tensor met twice (tied weights) is stored once, and both places
    point to it; one that shares memory with another in any other way is stored as a copy."""
    save = safetensors_library().torch.save
    tensors: dict[str, torch.Tensor] = {}
    stored_as: dict[tuple, str] = {}  # a tensor's identity -> the name it is stored under
    memory_used: set[int] = set()  # the addresses of the stored tensors' memory

    def encode(obj: Any, name: str) -> Any:
        if isinstance(obj, torch.Tensor):
            identity = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.dtype,
                        tuple(obj.shape), obj.stride())
            if identity not in stored_as:
                if name in tensors:
                    raise ValueError(f"cannot save two tensors named {name!r} to a safetensors file (a key with "
                                     f"'/' in it?); save to a .pt file instead.")
                stored_as[identity] = name
                tensors[name] = own_copy(obj, memory_used)
            return {"$tensor": stored_as[identity]}
        if isinstance(obj, bytes):
            return {"$bytes": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, tuple):
            return {"$tuple": [encode(value, f"{name}/{i}") for i, value in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(value, f"{name}/{i}") for i, value in enumerate(obj)]
        if isinstance(obj, dict):
            odd = [key for key in obj if not isinstance(key, str) or key.startswith("$")]
            if odd:
                raise ValueError(f"cannot save {name or 'the checkpoint'!r} to a safetensors file: its key "
                                 f"{odd[0]!r} is not a string, or starts with '$'; save to a .pt file instead.")
            return {key: encode(value, f"{name}/{key}" if name else key) for key, value in obj.items()}
        if obj is None or isinstance(obj, (str, int, float)):  # bool is an int
            return obj
        raise ValueError(f"cannot save {name!r} to a safetensors file: a {type(obj).__name__} is neither a tensor "
                         f"nor plain data (str, int, float, bool, None, bytes, lists, tuples, dicts); save to a "
                         f".pt file instead.")

    metadata = {METADATA_KEY: json.dumps(encode(payload, ""), separators=(",", ":"))}
    try:
        return save(tensors, metadata=metadata)
    except Exception as err:  # a dtype safetensors cannot store, say
        raise ValueError(f"safetensors cannot store these tensors ({err}); save to a .pt file instead.") from err


def safetensors_library():
    """The safetensors package, imported when a safetensors checkpoint is written or read."""
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("safetensors checkpoints need the safetensors package: pip install safetensors") from err
    return safetensors


def own_copy(tensor: torch.Tensor, memory_used: set[int]) -> torch.Tensor:
    """`tensor` on the CPU, contiguous, and alone in its memory (safetensors refuses tensors that
    share it): a view of a larger tensor, or memory another stored tensor uses, is copied."""
    tensor = tensor.detach().cpu().contiguous()
    memory = tensor.untyped_storage()
    alone = memory.nbytes() == tensor.numel() * tensor.element_size() and memory.data_ptr() not in memory_used
    if tensor.numel() and not alone:
        tensor = tensor.clone()
    memory_used.add(tensor.untyped_storage().data_ptr())
    return tensor


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: 8 bytes of header length, then '{'.
    (torch.save's zip archive starts with b'PK\\x03\\x04', followed by a zero at byte 8.)"""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:] == b"{" and not start.startswith(b"PK\x03\x04")


def read_safetensors_header(path: Path, where: str) -> dict:
    """The JSON header of a safetensors file, checked before any tensor is read: its length fits the
    file (and MAX_HEADER_BYTES), every tensor has a known dtype and a shape, and the tensors' byte
    ranges tile the rest of the file exactly, so nothing is allocated beyond what the file holds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{where} is corrupt or crafted: its safetensors header claims {length:,} bytes, "
                                  f"but the file has {size - 8:,} after the length (and the limit is "
                                  f"{MAX_HEADER_BYTES:,}); it was not loaded.")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"{where} is corrupt: its safetensors header is not JSON ({err}).") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is corrupt: its safetensors header is not a JSON object.")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in ITEM_BYTES and is_int_list(shape) and min(shape, default=0) >= 0
                and is_int_list(offsets) and len(offsets) == 2):
            raise CheckpointError(f"{where} is corrupt: tensor {short_repr(name)} in its safetensors header has no "
                                  f"valid dtype, shape and data_offsets: {str(entry)[:200]}.")
        begin, end = offsets
        if end - begin != ITEM_BYTES[dtype] * math.prod(shape):  # Python ints: a crafted shape cannot overflow
            raise CheckpointError(f"{where} is corrupt or crafted: tensor {short_repr(name)} of shape "
                                  f"{short_repr(tuple(shape))} ({dtype}) is given {end - begin:,} bytes; it needs "
                                  f"{ITEM_BYTES[dtype] * math.prod(shape):,}.")
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise CheckpointError(f"{where} is corrupt or crafted: the bytes of tensor {short_repr(name)} start at "
                                  f"{begin:,}, not at {position:,} where the previous tensor ends.")
        position = end
    if position != size - 8 - length:
        raise CheckpointError(f"{where} is corrupt or truncated: its tensors take {position:,} bytes, but the "
                              f"file has {size - 8 - length:,} after the header.")
    return header


def is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def read_safetensors(path: Path, where: str, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of a safetensors file written by `save_checkpoint`: the JSON of its
    metadata with each {"$tensor": name} replaced by that tensor (the same object wherever the name
    appears: tied weights are tied again)."""
    header = read_safetensors_header(path, where)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise CheckpointError(f"{where} is a safetensors file but not an lm checkpoint (no {METADATA_KEY!r} "
                              f"entry in its metadata); a Hugging Face model loads with lm.from_hf.")
    safe_open = safetensors_library().safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if str(map_location) != "cpu":
            tensors = {name: t.to(map_location) for name, t in tensors.items()}
        used: set[str] = set()
        ckpt = decode(json.loads(metadata[METADATA_KEY]), tensors, used)
    except Exception as err:  # the library's SafetensorError, bad JSON, bad base64, a tag holding the wrong thing
        raise CheckpointError(f"cannot read {where} as an lm checkpoint (damaged, or another kind of safetensors "
                              f"file): {type(err).__name__}: {err}") from err
    unused = sorted(tensors.keys() - used)
    if unused:
        raise CheckpointError(f"{where} is corrupt or was edited: it stores tensors {short_repr(unused[:5])} that "
                              f"its checkpoint entry does not mention.")
    return ckpt


def decode(obj: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Inverse of `safetensors_bytes`'s encoding, for the JSON `obj`."""
    if isinstance(obj, list):
        return [decode(value, tensors, used) for value in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and (tag := next(iter(obj))) in TAGS:
        value = obj[tag]
        if tag == "$tensor":
            if not isinstance(value, str) or value not in tensors:
                raise ValueError(f"its JSON names tensor {short_repr(value)}, which the file does not store")
            used.add(value)
            return tensors[value]
        if tag == "$bytes":
            return base64.b64decode(value, validate=True)
        if not isinstance(value, list):
            raise ValueError(f"a tuple is stored as a list, not a {type(value).__name__}")
        return tuple(decode(item, tensors, used) for item in value)
    return {key: decode(value, tensors, used) for key, value in obj.items()}


# ---- loading -------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    verify: bool | None = None) -> dict:
    """Read a checkpoint dict, in the current layout whatever version the file holds (see "Versions").
    Only tensors and plain data are accepted: torch.load with `weights_only=True`, or safetensors
    and JSON, told apart by the file's first bytes.

    `mmap=True` maps the tensors instead of reading them (for a look at the settings alone; a
    safetensors file is read through a map either way). `verify` checks every tensor against the
    checksums saved with it (CheckpointError if one differs); by default it does so unless
    `mmap=True`, since hashing reads every byte (~1 s per 1.5 GB)."""
    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where} does not exist; train a model first (lm train) or check the path.")
    if is_safetensors(path):
        ckpt = read_safetensors(path, where, map_location)
    else:
        check_archive(path)
        try:
            if path.suffix == ".safetensors":  # torch.load would take it for safetensors by its name alone
                with open(path, "rb") as f:
                    ckpt = torch.load(f, map_location=map_location, weights_only=True)
            else:
                ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:
            raise CheckpointError(f"cannot read {where} as an lm checkpoint (truncated, damaged, or another kind of "
                                  f"file): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an lm checkpoint (no 'format': '{FORMAT}' entry).")
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where} is corrupt: its checkpoint version is {short_repr(version)}, not a "
                              f"number from 1 to {VERSION}.")
    if version > VERSION:
        raise CheckpointError(f"{where} has checkpoint version {version}, written by lm "
                              f"{short_repr(ckpt.get('lm_version', '?'))}; this lm ({__version__}) reads "
                              f"versions up to {VERSION}: upgrade lm.")
    if version >= 2 and ckpt.get("checksums") is None:
        raise CheckpointError(f"{where} is corrupt: it has no 'checksums' entry, which every checkpoint of version "
                              f"{version} carries (a damaged key, or an edit); use another checkpoint. {EDITED}")
    check_storage_sizes(ckpt, where)
    if verify is None:
        verify = not mmap  # hashing reads every byte, which is what mmap=True is there to avoid
    if verify:
        verify_checksums(ckpt, where)  # on the file as written, before any converter changes the dict
    return upgrade(ckpt, where)


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


def newer_lm_hint(ckpt: dict) -> str:
    """When the file was written by a newer lm than this one: a sentence saying so (its config may
    hold fields this lm does not know yet). Else nothing."""
    written, ours = version_numbers(ckpt.get("lm_version")), version_numbers(__version__)
    if written and ours and written > ours:
        return f" (written by lm {ckpt['lm_version']}, newer than this lm {__version__}: upgrade lm)"
    return ""


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
        raise CheckpointError(f"the checkpoint's config is invalid: {err}{newer_lm_hint(ckpt)}") from err
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
    """Load a trained model for inference: `lm.load_model("runs/x/best.pt", device="cpu")` (or a
    `.safetensors` checkpoint; the file's content tells).

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
