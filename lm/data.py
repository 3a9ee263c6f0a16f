"""Token data: packing documents, token files, train/val splits and batches.

`lm.corpora` turns a corpus into text and documents; this module takes over once they are token
ids: `pack_documents` joins encoded documents, `write_tokens` / `read_tokens` store them as flat
binary files (`lm prep` writes them, `lm train` memory-maps them), `write_prepared` /
`check_prepared` keep a prepared folder's files (token files, tokenizer, meta.json) from one run,
and `Batches` draws the training windows, resumably and split across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A corpus or data directory is missing or malformed; the message says what to do."""


def pack_documents(encoded, separator_id: int | None = None) -> np.ndarray:
    """The token ids of documents, one after the other, with `separator_id` between each two:
    doc 1, sep, doc 2, sep, ..., doc n (nothing between them when it is None). Returns int64 ids."""
    parts = []
    separator = None if separator_id is None else np.array([separator_id], dtype=np.int64)
    for n, ids in enumerate(encoded):
        if n and separator is not None:
            parts.append(separator)
        parts.append(np.asarray(ids, dtype=np.int64).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def train_val_split(ids, val_fraction: float = 0.1):
    """Split a 1-D sequence of ids: the first part trains, the tail validates."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must be between 0 and 1 (exclusive).")
    n_val = max(1, int(len(ids) * val_fraction))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def get_batch(
    data: torch.Tensor | np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size` tokens: inputs x (B, T) and targets y = x shifted by one."""
    n = len(data)
    if n <= block_size:
        raise DataError(f"the data holds {n} tokens, too few for windows of block_size={block_size} "
                        f"plus one target; use more text or a smaller block_size.")
    starts = torch.randint(n - block_size, (batch_size,), generator=generator).tolist()
    if isinstance(data, np.ndarray):
        x = torch.from_numpy(np.stack([data[s : s + block_size] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[s + 1 : s + 1 + block_size] for s in starts]).astype(np.int64))
    else:
        x = torch.stack([data[s : s + block_size] for s in starts]).long()
        y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts]).long()
    return x.to(device), y.to(device)


# ---- token files (lm prep) -----------------------------------------------------------------------
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_tokens(path: str | Path, ids, vocab_size: int) -> Path:
    """Write ids as a flat binary array (uint16 when the vocabulary allows, else uint32)."""
    path = Path(path)
    arr = np.asarray(ids, dtype=token_dtype(vocab_size))
    tmp = path.with_suffix(path.suffix + ".tmp")
    arr.tofile(tmp)
    tmp.replace(path)
    return path


def read_tokens(path: str | Path, vocab_size: int) -> np.ndarray:
    """Memory-map a token file written by `write_tokens`, checking that every id is below
    `vocab_size` (one vectorised pass over the file), so that a token file from another tokenizer is
    a clear error here rather than an IndexError inside the model's embedding."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist; run `lm prep` first.")
    size, dtype = path.stat().st_size, np.dtype(token_dtype(vocab_size))
    if size == 0:
        raise DataError(f"token file {str(path)!r} is empty; run `lm prep` again on a non-empty corpus.")
    if size % dtype.itemsize:
        raise DataError(f"token file {str(path)!r} holds {size:,} bytes, not a whole number of {dtype} ids: it is "
                        f"cut short or was written for another vocabulary size; run `lm prep` again.")
    ids = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size <= np.iinfo(dtype).max:  # else no stored value can be out of range
        largest = int(ids.max())
        if largest >= vocab_size:
            raise DataError(f"token file {str(path)!r} holds id {largest:,}, but the tokenizer has {vocab_size:,} "
                            f"tokens (ids 0..{vocab_size - 1:,}): the ids and the tokenizer come from different "
                            f"runs of `lm prep`; run it again.")
    return ids


# ---- prepared data folders: lm prep writes them, lm train checks them -----------------------------
# A folder holds train.bin, val.bin, tokenizer.json (and tokenizer.model for sentencepiece), and
# meta.json, written last, which records each file's size and sha256: the manifest.
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prepared(out_dir: str | Path, train_ids, val_ids, tokenizer, meta: dict) -> dict:
    """Write a prepared-data folder whose files always belong together; returns the meta written.

    An interrupted or repeated prep must never leave token files of one run beside the tokenizer of
    another. So every file is written to a temporary name first; meta.json is deleted before the
    first file takes its place (os.replace, atomic), and written again, with each file's size and
    sha256, only after the last one. A folder without meta.json is an unfinished prep, and a file
    whose hash differs from meta.json's comes from another run: `check_prepared` refuses both.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.vocab_size
    writers = {
        "train.bin": lambda path: np.asarray(train_ids, dtype=token_dtype(vocab_size)).tofile(path),
        "val.bin": lambda path: np.asarray(val_ids, dtype=token_dtype(vocab_size)).tofile(path),
        "tokenizer.json": tokenizer.save,
    }
    if tokenizer.kind == "sentencepiece":  # for the sentencepiece library and RSCaLM's scripts
        writers["tokenizer.model"] = tokenizer.save_model
    temporaries = {name: _temporary(out / name) for name in writers}
    try:
        for name, write in writers.items():
            write(temporaries[name])
        files = {name: {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)} for name, tmp in temporaries.items()}
        (out / "meta.json").unlink(missing_ok=True)
        if "tokenizer.model" not in writers:
            (out / "tokenizer.model").unlink(missing_ok=True)  # left by an earlier sentencepiece prep
        for name, tmp in temporaries.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
    meta = {**meta, "files": files}
    meta_tmp = _temporary(out / "meta.json")
    try:
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, out / "meta.json")
    finally:
        meta_tmp.unlink(missing_ok=True)
    return meta


def _temporary(path: Path) -> Path:
    """A hidden name beside `path`, different for every call, so that two preps of one folder
    never write to the same temporary."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def check_prepared(data_dir: str | Path) -> dict:
    """Check that a prepared-data folder is one finished `lm prep`; returns its meta.json.

    Every file listed in meta.json must have the recorded size and sha256 (hashing reads each file
    once, a small cost beside training on it). A folder written by an lm prep older than the
    manifest (meta.json without "files") is accepted with a warning.
    """
    data_dir = Path(data_dir)
    again = f"run `lm prep --out_dir {data_dir}` again"
    if not (data_dir / "tokenizer.json").is_file():
        raise DataError(f"{data_dir} has no tokenizer.json; run `lm prep --out_dir {data_dir}` first.")
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no meta.json: the lm prep that wrote it did not finish, so its files may "
                        f"not belong together; {again}.") from None
    except (ValueError, OSError) as err:
        raise DataError(f"{data_dir}/meta.json cannot be read ({err}); {again}.") from None
    if not isinstance(meta, dict) or "files" not in meta:
        warnings.warn(f"{data_dir} was prepared by an older lm prep that records no file hashes, so its files "
                      f"cannot be checked; {again} to record them.", stacklevel=2)
        return meta if isinstance(meta, dict) else {}
    files = meta["files"]
    if not (isinstance(files, dict)
            and all(isinstance(r, dict) and {"bytes", "sha256"} <= set(r) for r in files.values())):
        raise DataError(f"{data_dir}/meta.json lists its files in an unknown form; {again}.")
    for name, recorded in files.items():
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path} is missing, but meta.json lists it; {again}.")
        size = path.stat().st_size
        if size != recorded["bytes"] or file_sha256(path) != recorded["sha256"]:
            raise DataError(f"{path} does not match meta.json (its size or sha256 differ): it was written by "
                            f"another lm prep than the rest of {data_dir}; {again}.")
    return meta


# ---- batches for training: random windows or epochs, resumable, shardable ------------------------
SAMPLING = ("random", "epoch")


class Batches:
    """The stream of training batches, with a state that checkpoints can save and restore.

    Each optimizer step takes `batch_size * grad_accum_steps * world_size` windows of `seq_len + 1`
    tokens: a "global batch". Process `rank` gets micro-batches `rank, rank + world_size, ...` of it, so
    one process with batch 8, one with batch 4 and 2 accumulation steps, and two processes with batch 4
    all see the same windows in a step.

    - mode "random": window starts drawn uniformly with a seeded generator (nanoGPT's way; the same
      draws as `get_batch` for one process without accumulation).
    - mode "epoch": the data is cut into non-overlapping windows, shuffled once per epoch; every window
      is seen once before any is seen twice.

    `state_dict()` / `load_state_dict()` capture where the stream stands, so a resumed run continues
    with exactly the batches an uninterrupted one would have drawn.
    """

    def __init__(self, data, batch_size: int, seq_len: int, *, seed: int = 0, mode: str = "random",
                 grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1):
        if mode not in SAMPLING:
            raise DataError(f"sampling mode {mode!r} is not one of {SAMPLING}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size}).")
        n = len(data)
        if n <= seq_len:
            raise DataError(f"the data holds {n} tokens, too few for windows of seq_len={seq_len} plus one "
                            f"target; use more text or a smaller seq_len.")
        self.data, self.batch_size, self.seq_len, self.seed, self.mode = data, batch_size, seq_len, seed, mode
        self.grad_accum_steps, self.rank, self.world_size = grad_accum_steps, rank, world_size
        # random mode draws window starts from [0, n - seq_len); epoch mode orders the non-overlapping
        # windows, each with its shifted target
        self._start_drawing(random_range=n - seq_len, n_windows=(n - 1) // seq_len)

    def _start_drawing(self, random_range: int, n_windows: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch, self.position = 0, 0  # "epoch" mode: which epoch, and how many windows of it were used
        self.random_range, self.n_windows = random_range, n_windows
        self._order = None

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, all processes together."""
        return self.global_batch * self.seq_len

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.world_size

    @property
    def epochs_done(self) -> float:
        """How many passes over the data so far (in "epoch" mode; random mode counts tokens drawn)."""
        return self.epoch + self.position / self.n_windows

    def _draw(self) -> list[int]:
        """The next global batch: numbers drawn from [0, random_range), or window numbers in the
        epoch's order."""
        if self.mode == "random":
            return torch.randint(self.random_range, (self.global_batch,), generator=self.generator).tolist()
        drawn = []
        while len(drawn) < self.global_batch:
            if self._order is None:  # the epoch's permutation depends only on (seed, epoch): resumable
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.n_windows, generator=g)
            take = min(self.global_batch - len(drawn), self.n_windows - self.position)
            drawn += self._order[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return drawn

    def _starts(self) -> list[int]:
        drawn = self._draw()
        return drawn if self.mode == "random" else [w * self.seq_len for w in drawn]

    def _mine(self, drawn: list, m: int) -> list:
        """This process's share of micro-batch m of a global batch."""
        chunk = (m * self.world_size + self.rank) * self.batch_size
        return drawn[chunk : chunk + self.batch_size]

    def next_step(self, device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches (x, y) for the next optimizer step, `grad_accum_steps` of them."""
        starts = self._starts()
        T, data = self.seq_len, self.data
        micro = []
        for m in range(self.grad_accum_steps):
            mine = self._mine(starts, m)
            if isinstance(data, np.ndarray):
                xy = torch.from_numpy(np.stack([data[s : s + T + 1] for s in mine]).astype(np.int64))
            else:
                xy = torch.stack([data[s : s + T + 1] for s in mine]).long()
            xy = to_device(xy, device)
            micro.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
        return micro

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "generator": self.generator.get_state(),
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise DataError(f"the saved batches used sampling {state.get('mode')!r}, this run {self.mode!r}; "
                            f"resume with the same sampling mode.")
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def to_device(batch: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Move a batch to `device`; to a GPU through pinned memory, so the copy overlaps its work."""
    if torch.device(device).type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def batch_stream(data, batch_size: int, seq_len: int, **options) -> Batches:
    """The batches of `data`: token ids (a tensor or array) give `Batches` of windows; an object
    with its own `batches(batch_size, seq_len, **options)` (fine-tuning examples,
    `lm.finetuning.SupervisedData`) gives its own stream."""
    if hasattr(data, "batches"):
        return data.batches(batch_size, seq_len, **options)
    return Batches(data, batch_size, seq_len, **options)
