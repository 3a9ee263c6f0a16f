"""Token data: packing documents, token files, train/val splits and batches.

`lm.corpora` turns a corpus into text and documents; this module takes over once they are token
ids: `pack_documents` joins encoded documents, `write_tokens` / `read_tokens` store them as flat
binary files (`lm prep` writes them, `lm train` memory-maps them), and `Batches` draws the
training windows, resumably and split across processes.
"""

from __future__ import annotations

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
    """Memory-map a token file written by `write_tokens`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist; run `lm prep` first.")
    if path.stat().st_size == 0:
        raise DataError(f"token file {str(path)!r} is empty; run `lm prep` again on a non-empty corpus.")
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


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
