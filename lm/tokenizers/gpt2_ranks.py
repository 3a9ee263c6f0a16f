"""GPT-2's byte-pair ranks, available offline.

tiktoken normally downloads GPT-2's merge ranks from OpenAI's servers. The same file
(`gpt2.tiktoken`, 50,256 ranks, identical to tiktoken's `r50k_base`) ships inside the source
archive of the `openai-whisper` package on PyPI, so it can be fetched through pip, which is all a
machine with only the package index can reach. Nothing is installed: the archive is opened and
this one file is copied into the cache.
"""

from __future__ import annotations

import base64
import os
import tarfile
import tempfile
from pathlib import Path

from ..corpora import data_home, pip_download
from ..data import DataError

WHISPER_PACKAGE = "openai-whisper==20250625"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}


def gpt2_ranks_path(cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Path of `gpt2.tiktoken`: $LM_GPT2_RANKS if set, else the cache, filled on first use
    (with `download=False`, a `DataError` instead: loading a saved tokenizer never downloads)."""
    if os.environ.get("LM_GPT2_RANKS"):
        path = Path(os.environ["LM_GPT2_RANKS"])
        if not path.is_file():
            raise DataError(f"LM_GPT2_RANKS={str(path)!r} is not a file; unset it or point it at gpt2.tiktoken.")
        return path
    cache_dir = Path(cache_dir) if cache_dir is not None else data_home() / "cache"
    cached = cache_dir / "gpt2.tiktoken"
    if cached.is_file():
        return cached
    if not download:
        raise DataError(f"GPT-2's ranks are not cached at {str(cached)!r}. Fetch them once with "
                        f"`python -c 'import lm; lm.tokenizers.gpt2_ranks_path()'` (through pip) or `make data`, "
                        f"or set LM_GPT2_RANKS to a local gpt2.tiktoken file.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(WHISPER_PACKAGE, tmp, hint=" Or set LM_GPT2_RANKS to a local gpt2.tiktoken file.")
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(RANKS_MEMBER)), None)
            if member is None:
                raise DataError(f"{archive.name} has no {RANKS_MEMBER}.")
            data = tar.extractfile(member).read()
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_bytes(data)
    tmp_file.replace(cached)
    return cached


def load_gpt2_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """The ranks as {token bytes: rank}; each line of the file is `base64(token) rank`."""
    path = Path(path) if path is not None else gpt2_ranks_path()
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks
