"""The interface every `lm` tokenizer shares, and the registry that rebuilds one from saved data.

A tokenizer turns text into a list of integer ids and back. Every kind has:
    encode(text) -> ids, decode(ids) -> text, encode_batch / decode_batch,
    vocab_size, special_tokens (name -> id), bos_id / eos_id / pad_id (None when absent),
    to_dict() / from_dict() (plain data, stored inside checkpoints), save(path) / load(path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from ..registry import Registry


class TokenizerError(ValueError):
    """Bad tokenizer input; the message names the value and what to do."""


# Limits for saved tokenizers, checked before anything is allocated: a tokenizer file may come from
# anywhere, and a few bytes that declare a huge size must not take the machine's memory. The
# largest real vocabularies have a few hundred thousand tokens, GPT-2's file is about 1 MB.
MAX_FILE_BYTES = 64 * 2**20  # a tokenizer JSON file (a sentencepiece model is stored inside it)
MAX_VOCAB_SIZE = 2**20  # ids, ordinary and special
MAX_SPECIAL_TOKENS = 10_000
MAX_SPECIAL_LENGTH = 1_000  # characters in a special token's name


# kind -> class, so that `tokenizer_from_dict` / `load_tokenizer` can rebuild any saved tokenizer.
# Each kind registers itself with `@TOKENIZERS.register(kind)`, the name its `to_dict()` stores.
TOKENIZERS = Registry("tokenizer")
ENDOFTEXT = "<|endoftext|>"  # GPT-2's document separator


class Tokenizer:
    """Base class: subclasses set `kind` and implement encode, decode, vocab_size, special_tokens,
    to_dict and from_dict."""

    kind = "base"

    # Special ids, None where a kind has no such token; subclasses override them. `eos_id` ends a
    # document, and `lm prep` writes it between documents: <EOS> (char), </s> (sentencepiece),
    # <|endoftext|> (bpe, tiktoken).
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    # ---- to implement --------------------------------------------------------------------------
    def encode(self, text: str, **kwargs) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], **kwargs) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict, trust_pattern: bool = False) -> "Tokenizer":
        """Rebuild from `to_dict()` data. `trust_pattern`: accept a pre-tokenizer regex that is not
        one of lm's known patterns (only byte-level BPE has one; see `bpe.check_saved_pattern`)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode_batch(self, batch: Iterable[Iterable[int]], **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]

    def __len__(self) -> int:
        return self.vocab_size

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """ids as ints, with a clear error for any outside the vocabulary."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TokenizerError(f"id {bad[0]} is out of range for a vocabulary of {n} tokens (valid: 0..{n - 1}).")
        return ids

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, trust_pattern: bool = False) -> "Tokenizer":
        return cls.from_dict(read_tokenizer_file(path), trust_pattern=trust_pattern)


class EndOfTextSpecials:
    """Special tokens as GPT-2 has them: `<|endoftext|>` ends (and separates) documents, and there
    is no separate BOS or PAD token. Expects `self._specials`, a dict name -> id."""

    bos_id = None
    pad_id = None

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def eos_id(self) -> int | None:
        return self._specials.get(ENDOFTEXT)


def check_kind(data, kind: str) -> None:
    """Raise unless `data` is the `to_dict()` form of a tokenizer of `kind`."""
    if not isinstance(data, dict) or data.get("kind") != kind:
        got = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise TokenizerError(f"expected a {kind!r} tokenizer, got kind={short_repr(got)}.")


def short_repr(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a damaged file's values can be long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_size(what: str, size: int, limit: int) -> None:
    """Raise before allocating when saved data declares more than `limit` of something."""
    if size > limit:
        raise TokenizerError(f"{what} is {size:,}, over lm's limit of {limit:,}; the tokenizer data is damaged "
                             f"or was not written by a tokenizer's .save().")


def read_tokenizer_file(path: str | Path) -> dict:
    """The JSON of a saved tokenizer; a clear `TokenizerError` if it is missing, too big or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {str(path)!r} does not exist.")
    check_size(f"the size in bytes of tokenizer file {str(path)!r}", path.stat().st_size, MAX_FILE_BYTES)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"tokenizer file {str(path)!r} is not UTF-8 JSON ({err}); save the tokenizer "
                             f"again with .save().") from None
    except RecursionError:  # brackets nested thousands deep
        raise TokenizerError(f"tokenizer file {str(path)!r} nests its JSON too deeply to be a tokenizer.") from None


def tokenizer_from_dict(data: dict, trust_pattern: bool = False) -> Tokenizer:
    """Rebuild any `lm` tokenizer from its `to_dict()` form (as stored in checkpoints).

    Never touches the network: a GPT-2 tokenizer needs its ranks cached already. A byte-level BPE
    whose regex pattern is not GPT-2's or GPT-4's is refused unless `trust_pattern=True`.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer kind {short_repr(kind)}; known kinds are {TOKENIZERS.names()}.")
    return TOKENIZERS.get(kind).from_dict(data, trust_pattern=trust_pattern)


def load_tokenizer(path: str | Path, trust_pattern: bool = False) -> Tokenizer:
    """Load a tokenizer saved with `.save(path)`, whatever its kind (see `tokenizer_from_dict`)."""
    return tokenizer_from_dict(read_tokenizer_file(path), trust_pattern=trust_pattern)
