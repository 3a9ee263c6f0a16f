"""Tokenizers: turn text into integer ids and back.

`CharTokenizer` is the simplest useful tokenizer: one id per Unicode character, plus a few special
tokens. Later chapters add byte-level BPE, SentencePiece and GPT-2's tokenizer behind the same
interface (encode, decode, batch versions, `vocab_size`, special tokens, save/load).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence


class TokenizerError(ValueError):
    """Bad tokenizer input; the message names the value and what to do."""


SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>", "<SEP>", "<UNK>")
UNKNOWN_POLICIES = ("error", "replace", "skip")


class CharTokenizer:
    """One token per character (after NFC normalisation), special tokens first.

    Ids 0-4 are `<PAD>`, `<BOS>`, `<EOS>`, `<SEP>`, `<UNK>`; characters follow in sorted order, so
    the same training text always gives the same vocabulary.

    Characters the tokenizer has not seen are handled by `unknown`:
    - "error" (default): raise, naming the characters, so nothing is silently lost;
    - "replace": map each to `<UNK>`;
    - "skip": drop them.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], unknown: str = "error"):
        if unknown not in UNKNOWN_POLICIES:
            raise TokenizerError(f"unknown={unknown!r} is not a policy; choose one of {UNKNOWN_POLICIES}.")
        chars = sorted(set(chars))
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise TokenizerError(f"vocabulary entries must be single characters, got {bad[:5]!r}.")
        self.unknown = unknown
        self.itos: list[str] = list(SPECIAL_TOKENS) + chars
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))

    @classmethod
    def train(cls, text: str, unknown: str = "error") -> "CharTokenizer":
        """Build the vocabulary from every distinct character of `text`."""
        if not isinstance(text, str) or not text:
            raise TokenizerError("cannot train a character tokenizer on empty text; pass the training corpus.")
        return cls(set(unicodedata.normalize("NFC", text)), unknown=unknown)

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {s: self.stoi[s] for s in SPECIAL_TOKENS}

    pad_id = property(lambda self: self.stoi["<PAD>"])
    bos_id = property(lambda self: self.stoi["<BOS>"])
    eos_id = property(lambda self: self.stoi["<EOS>"])
    sep_id = property(lambda self: self.stoi["<SEP>"])
    unk_id = property(lambda self: self.stoi["<UNK>"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = True
    ) -> list[int]:
        """Text to ids.

        With `parse_special`, the literal strings `<BOS>`, `<SEP>`, ... in `text` become their
        special ids (so prompt templates can be written as text). `add_bos` / `add_eos` add the
        markers only where the text does not already start / end with them.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}.")
        text = unicodedata.normalize("NFC", text)
        ids: list[int] = []
        if parse_special:
            pos = 0
            for match in self._special_re.finditer(text):
                ids.extend(self._encode_plain(text[pos : match.start()]))
                ids.append(self.stoi[match.group()])
                pos = match.end()
            ids.extend(self._encode_plain(text[pos:]))
        else:
            ids = self._encode_plain(text)
        if add_bos and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        if add_eos and not (ids and ids[-1] == self.eos_id):
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        unseen = sorted({c for c in text if c not in stoi})
        if self.unknown == "error":
            shown = ", ".join(repr(c) for c in unseen[:10])
            raise TokenizerError(
                f"{len(unseen)} character(s) not in the vocabulary: {shown}. Train the tokenizer on text "
                f"that contains them, or create it with unknown='replace' (maps to <UNK>) or 'skip'."
            ) from None
        if self.unknown == "replace":
            unk = self.unk_id
            return [stoi.get(c, unk) for c in text]
        return [stoi[c] for c in text if c in stoi]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids to text. With `skip_special`, special tokens are left out."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TokenizerError(f"id {bad[0]} is out of range for a vocabulary of {n} tokens (valid: 0..{n - 1}).")
        first_char = len(SPECIAL_TOKENS)
        itos = self.itos
        if skip_special:
            return "".join(itos[i] for i in ids if i >= first_char)
        return "".join(itos[i] for i in ids)

    def encode_batch(self, texts: Sequence[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode_batch(self, batch: Iterable[Iterable[int]], **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.itos[len(SPECIAL_TOKENS) :], "unknown": self.unknown}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        if data.get("kind") != cls.kind:
            raise TokenizerError(f"expected a {cls.kind!r} tokenizer, got kind={data.get('kind')!r}.")
        return cls(data["chars"], unknown=data.get("unknown", "error"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist.")
        return cls.from_dict(json.loads(path.read_text()))


TOKENIZERS = {CharTokenizer.kind: CharTokenizer}


def tokenizer_from_dict(data: dict):
    """Rebuild any `lm` tokenizer from its `to_dict()` form (as stored in checkpoints)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; known kinds are {sorted(TOKENIZERS)}.")
    return TOKENIZERS[kind].from_dict(data)


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with `.save(path)`, whatever its kind."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {str(path)!r} does not exist.")
    return tokenizer_from_dict(json.loads(path.read_text()))
