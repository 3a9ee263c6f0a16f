"""`SentencePieceTokenizer`: a trained subword vocabulary (BPE or unigram) from Google's
sentencepiece library, with the ids of the RSCaLM seed: <unk>=0, <s>=1, </s>=2, <pad>=3.

Settings chosen so that `decode(encode(text)) == text` for every string:
- `normalization_rule_name="identity"`: sentencepiece's default NFKC would rewrite text
  ("ﬁ" -> "fi", full-width digits -> ASCII), so it could not come back unchanged.
- `remove_extra_whitespaces=False`: the default squeezes runs of spaces and strips the ends.
- `add_dummy_prefix=False`: the default puts a space before the text and the decoder drops one
  again, so ids encoded apart do not join: decode(encode("a") + encode("b")) would be "a b".
  Without it they join exactly (prompt + answer, document + document). The cost: a word at the
  start of a text or line has no "▁" in front, so it is cut differently from the same word after
  a space ("Hello" -> "H", "e", "l", "lo" where " Hello" might be one piece).
- `byte_fallback=True`: a character outside the vocabulary becomes its UTF-8 bytes (pieces
  <0x00>..<0xFF>) instead of <unk>, so emoji, rare scripts, tabs and newlines all survive.
- sentencepiece writes a space as the piece character "▁" (U+2581), so a literal "▁" in the text
  would come back as a space. `encode` therefore cuts the text at each "▁" and writes that
  character as its three byte pieces. Ids equal sentencepiece's own for any text without "▁".

The trainer reads sentences (one per line of the corpus, as in the seed) and writes the model to
memory: no files are created. Trained on a str or a file, no piece spans a line break: a newline
is always the byte piece <0x0A>.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .base import (MAX_FILE_BYTES, MAX_VOCAB_SIZE, TOKENIZERS, Tokenizer, TokenizerError, check_kind,
                   check_size)

SPECIAL_PIECES = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
MODEL_TYPES = ("bpe", "unigram")
SPACE_MARK = "\u2581"  # "▁": how sentencepiece writes a space inside a piece


@TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model behind the `lm` tokenizer interface.

    Train one with `SentencePieceTokenizer.train(text, vocab_size)`, or load an existing `.model`
    file with `from_file`. Any sentencepiece model loads; the round-trip guarantee above holds for
    models trained here (a model trained with NFKC, for instance, changes some text).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, TypeError, OSError, ValueError) as err:  # ValueError: a piece that is not UTF-8
            raise TokenizerError(f"not a sentencepiece model ({err}); pass the bytes of a .model file.") from None
        self._proto = bytes(model_proto)
        self._sp = processor
        # Cutting at "▁" only gives back the text when no space is added in front of each part.
        first = processor.encode("a", out_type=str)[:1]
        adds_space = bool(first) and first[0].startswith(SPACE_MARK)
        mark_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
        if adds_space or not all(processor.is_byte(i) for i in mark_ids):
            mark_ids = None
        self._mark_ids = mark_ids

    @classmethod
    def train(
        cls,
        text: str | os.PathLike | Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        character_coverage: float = 1.0,
        max_sentence_length: int = 16384,
    ) -> "SentencePieceTokenizer":
        """Train on a str (split into lines), a path (`pathlib.Path`: a UTF-8 file, one sentence a
        line) or an iterable of sentences.

        `vocab_size` counts everything: the 4 special pieces, the 256 byte pieces (with
        `byte_fallback`), every distinct character (with `character_coverage=1.0`) and the merges.
        Lines longer than `max_sentence_length` bytes are left out of training (not of encoding).
        Training reads every sentence in order (no sampling) on one thread, so it has nothing to seed:
        the same input always gives the same model.
        """
        if model_type not in MODEL_TYPES:
            raise TokenizerError(f"model_type={model_type!r} is not supported; choose one of {MODEL_TYPES}.")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_PIECES):
            raise TokenizerError(f"vocab_size={vocab_size!r} must be an int larger than {len(SPECIAL_PIECES)}.")
        sentences = [line for line in _sentences(text) if line]
        if not sentences:
            raise TokenizerError("cannot train a sentencepiece tokenizer on an empty corpus; pass the training text.")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                max_sentence_length=max_sentence_length,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
                num_threads=1,
                minloglevel=2,  # errors still raise; the trainer's progress log is silenced
            )
        except RuntimeError as err:
            raise TokenizerError(_explain(str(err), vocab_size, max_sentence_length)) from None
        return cls(model.getvalue())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a sentencepiece `.model` file (ours from `save_model`, or any other)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model file {str(path)!r} does not exist.")
        check_size(f"the size in bytes of {str(path)!r}", path.stat().st_size, MAX_FILE_BYTES)
        return cls(path.read_bytes())

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the `.model` file that the sentencepiece library (and `from_file`) reads."""
        Path(path).write_bytes(self._proto)

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        ids = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        return {self._sp.id_to_piece(i): i for i in ids if i >= 0}

    # sentencepiece reports a missing special as -1; the `lm` interface says None
    unk_id = property(lambda self: _or_none(self._sp.unk_id()))
    bos_id = property(lambda self: _or_none(self._sp.bos_id()))
    eos_id = property(lambda self: _or_none(self._sp.eos_id()))
    pad_id = property(lambda self: _or_none(self._sp.pad_id()))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(self._check_ids([i])[0])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text to ids; `add_bos` / `add_eos` put <s> / </s> around them. Literal "<s>" in the text
        is ordinary text, never the special id."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}.")
        ids = self._encode_plain(text)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self._mark_ids is None or SPACE_MARK not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for n, part in enumerate(text.split(SPACE_MARK)):
            if n:
                ids.extend(self._mark_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text. <s>, </s> and <pad> decode to nothing, <unk> to " ⁇ "."""
        return self._sp.decode(self._check_ids(ids))

    def pieces(self, text: str) -> list[str]:
        """The pieces `encode` cuts `text` into, e.g. ["he", "llo", "▁world"]."""
        return [self._sp.id_to_piece(i) for i in self.encode(text)]

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": base64.b64encode(self._proto).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict, trust_pattern: bool = False) -> "SentencePieceTokenizer":
        check_kind(data, cls.kind)
        model = data.get("model")
        if not isinstance(model, str):
            raise TokenizerError("a 'sentencepiece' tokenizer dict needs 'model': the base64 of a .model file.")
        check_size("the length of the saved sentencepiece model", len(model), MAX_FILE_BYTES)
        try:
            proto = base64.b64decode(model, validate=True)
        except ValueError:
            raise TokenizerError("a 'sentencepiece' tokenizer dict needs 'model': the base64 of a .model file.") from None
        tokenizer = cls(proto)
        check_size("the vocabulary of the saved sentencepiece model", tokenizer.vocab_size, MAX_VOCAB_SIZE)
        return tokenizer


def _sentences(text) -> Iterable[str]:
    if isinstance(text, str):
        return text.split("\n")
    if isinstance(text, os.PathLike):
        path = Path(text)
        if not path.is_file():
            raise TokenizerError(f"training file {str(path)!r} does not exist.")
        return path.read_text(encoding="utf-8").split("\n")
    try:
        sentences = list(text)
    except TypeError:
        raise TokenizerError(f"train expects a str, a pathlib.Path or an iterable of str, got {type(text).__name__}.") from None
    bad = [s for s in sentences if not isinstance(s, str)]
    if bad:
        raise TokenizerError(f"every training sentence must be a str, got {type(bad[0]).__name__}.")
    return sentences


def _explain(message: str, vocab_size: int, max_sentence_length: int) -> str:
    """sentencepiece's C++ check failures, reworded with the fix."""
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return (f"vocab_size={vocab_size} is too small for this corpus: it needs at least {too_small.group(1)} "
                f"(4 special pieces, 256 byte pieces and one piece per distinct character). Increase vocab_size, "
                f"or lower character_coverage to drop rare characters.")
    too_big = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_big:
        return (f"vocab_size={vocab_size} is more than this corpus can fill: it yields at most "
                f"{too_big.group(1)} pieces. Lower vocab_size to {too_big.group(1)} or less, or train on more text.")
    if "sentences_.empty()" in message:
        return (f"no training sentence is left: every line is longer than max_sentence_length={max_sentence_length} "
                f"bytes. Split the corpus into lines, or raise max_sentence_length.")
    return f"sentencepiece could not train: {message}"


def _or_none(i: int) -> int | None:
    return i if i >= 0 else None
