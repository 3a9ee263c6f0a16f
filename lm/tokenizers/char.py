"""`CharTokenizer`: the simplest useful tokenizer, one id per Unicode character plus a few special
tokens."""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from .base import MAX_VOCAB_SIZE, TOKENIZERS, Tokenizer, TokenizerError, check_kind, check_size, short_repr

SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>", "<SEP>", "<UNK>")
UNKNOWN_POLICIES = ("error", "replace", "skip")


@TOKENIZERS.register("char")
class CharTokenizer(Tokenizer):
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
        ids = self._check_ids(ids)
        first_char = len(SPECIAL_TOKENS)
        itos = self.itos
        if skip_special:
            return "".join(itos[i] for i in ids if i >= first_char)
        return "".join(itos[i] for i in ids)

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.itos[len(SPECIAL_TOKENS) :], "unknown": self.unknown}

    @classmethod
    def from_dict(cls, data: dict, trust_pattern: bool = False) -> "CharTokenizer":
        check_kind(data, cls.kind)
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise TokenizerError("a saved 'char' tokenizer needs 'chars': a list of single characters.")
        check_size("the number of characters of the saved char tokenizer", len(chars), MAX_VOCAB_SIZE)
        unknown = data.get("unknown", "error")
        if not isinstance(unknown, str):
            raise TokenizerError(f"unknown={short_repr(unknown)} is not a policy; choose one of {UNKNOWN_POLICIES}.")
        return cls(chars, unknown=unknown)
