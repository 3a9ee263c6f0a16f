"""Hugging Face tokenizer files, both ways: `save_hf_tokenizer` writes an lm tokenizer as files that
`transformers.AutoTokenizer.from_pretrained(folder)` loads, `load_hf_tokenizer` reads such files (or a
transformers tokenizer object) back into an lm tokenizer with the same ids. Nothing is downloaded.

Two file formats are involved:

- `tokenizer.json`, the format of the `tokenizers` library (the "fast" tokenizers of transformers).
  It describes a pipeline, each stage a small JSON object with a "type":
      normalizer      rewrites the text (NFC, replace " " by "▁", ...)
      pre_tokenizer   cuts it into pre-tokens (a regex such as GPT-2's)
      model           turns each pre-token into ids: BPE (vocab + merges), Unigram, WordPiece ...
      decoder         turns tokens back into text
      added_tokens    special tokens, found in the text before anything else runs
  plus `tokenizer_config.json` beside it, which tells transformers the class to build and which
  tokens are BOS / EOS / UNK / PAD.
- `tokenizer.model`, a sentencepiece model: a protobuf message holding the pieces with their
  scores and types, and the trainer's and normalizer's settings.

Byte-level BPE (GPT-2, lm's `ByteBPETokenizer`) works on bytes, but a `tokenizer.json` vocabulary
maps *strings* to ids, and a merge is written as two strings. GPT-2 therefore gives each of the 256
bytes a printable character: the bytes that are already printable characters ("!".."~", "¡".."¬",
"®".."ÿ") stand for themselves, the 68 others (control codes, the space, ...) take the characters
from U+0100 on, in byte order. So the space (byte 32) is "Ġ" (U+0120) and a newline is "Ċ": the
token " the" is written "Ġthe", and a token that is only part of a UTF-8 character is still a string.

How lm's tokenizers map to the format:

- `ByteBPETokenizer` / `TiktokenTokenizer`: a BPE model over byte characters, the same ids. lm (like
  tiktoken) joins, again and again, the adjacent pair whose joined token has the lowest id; a BPE
  model joins the pair listed first among its merges. So the merges list the tokens from id 256 on
  in id order, each as the two tokens it is made of (`ByteBPETokenizer.merges`: the two that
  encoding the token's own bytes ends in, which are the two lm joins wherever it forms that token),
  and both choose alike; `ignore_merges` makes a pre-token that is a whole token one id at once, as lm checks
  first. GPT-2's regex is the ByteLevel pre-tokenizer's own; any other (GPT-4's) is a Split stage
  in front of a ByteLevel stage that only maps bytes.
- `CharTokenizer`: a BPE model without merges (each character is looked up alone), after an NFC
  normalizer as lm does; a Fuse decoder joins the characters without spaces.
- `SentencePieceTokenizer`: `tokenizer.model` is the model itself; `tokenizer.json` rebuilds it from
  the pieces (a BPE or Unigram model with byte fallback, "▁" for spaces) so that transformers needs
  neither sentencepiece nor protobuf to use it.

    files = save_hf_tokenizer(tok, "out/tokenizer")        # tokenizer.json, tokenizer_config.json, ...
    hf = transformers.AutoTokenizer.from_pretrained("out/tokenizer")
    hf("To be, or not")["input_ids"] == tok.encode("To be, or not")
    tok2 = load_hf_tokenizer("out/tokenizer")            # or load_hf_tokenizer(hf)
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import regex

from .base import (MAX_FILE_BYTES, MAX_VOCAB_SIZE, Tokenizer, TokenizerError, check_size, read_tokenizer_file,
                   short_repr)
from .bpe import GPT4_PATTERN, ByteBPETokenizer, check_saved_pattern
from .char import SPECIAL_TOKENS, UNKNOWN_POLICIES, CharTokenizer
from .gpt2_ranks import GPT2_PATTERN
from .sentencepiece import SPACE_MARK, SentencePieceTokenizer
from .tiktoken_gpt2 import TiktokenTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# transformers' class that loads tokenizer.json exactly as written. (Model-specific classes such as
# GPT2Tokenizer rebuild the pipeline from the vocabulary and merges alone, with their own settings.)
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
UNKNOWN_KEY = "lm_unknown"  # CharTokenizer's `unknown` policy, kept in tokenizer_config.json


# ---- GPT-2's bytes as characters ------------------------------------------------------------------
def byte_to_char_table() -> list[str]:
    """The character GPT-2 writes for each byte value (see the module docstring)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, moved = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:  # not printable: the next character from U+0100 on
            table.append(chr(256 + moved))
            moved += 1
    return table


BYTE_TO_CHAR = byte_to_char_table()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_hf(token: bytes) -> str:
    """A byte-level token as the string tokenizer.json stores: b" the" -> "Ġthe"."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def hf_to_bytes(token: str) -> bytes:
    """Inverse of `bytes_to_hf`; a TokenizerError for a character that stands for no byte."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError as err:
        raise TokenizerError(f"token {short_repr(token)} holds {err.args[0]!r}, which is not one of GPT-2's 256 byte "
                             f"characters: this is not a byte-level BPE vocabulary.") from None


# ---- writing --------------------------------------------------------------------------------------
def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike, *,
                      model_max_length: int | None = None) -> list[Path]:
    """Write `tokenizer` as Hugging Face files in `folder` (created if needed); return their paths.

    `tokenizer.json` and `tokenizer_config.json` for every kind, plus `tokenizer.model` for a
    sentencepiece tokenizer. `model_max_length` (the model's context length) goes into the config,
    where transformers uses it to warn about, and truncate, longer inputs.

    The ids equal lm's `encode(text)` (transformers adds no BOS / EOS: the config says so). Where
    lm and the format cannot agree, see the notes of `byte_level_json`, `char_json` and
    `sentencepiece_json`.
    """
    if isinstance(tokenizer, TiktokenTokenizer):
        tokenizer = byte_bpe_from_tiktoken(tokenizer)
    if isinstance(tokenizer, ByteBPETokenizer):
        data, config = byte_level_json(tokenizer), byte_level_config(tokenizer)
    elif isinstance(tokenizer, CharTokenizer):
        data, config = char_json(tokenizer), char_config(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        data, config = sentencepiece_json(tokenizer), sentencepiece_config(tokenizer)
    else:
        raise TokenizerError(f"cannot write a {type(tokenizer).__name__} as Hugging Face files; lm writes "
                             f"ByteBPETokenizer, TiktokenTokenizer, CharTokenizer and SentencePieceTokenizer.")
    if model_max_length is not None:
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
            raise TokenizerError(f"model_max_length={model_max_length!r} must be a positive int (the model's "
                                 f"context length), or None.")
        config["model_max_length"] = model_max_length

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / TOKENIZER_JSON, folder / TOKENIZER_CONFIG]
    paths[0].write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if isinstance(tokenizer, SentencePieceTokenizer):
        paths.append(folder / SENTENCEPIECE_MODEL)
        tokenizer.save_model(paths[-1])
    return paths


def tokenizer_json(model: dict, *, normalizer=None, pre_tokenizer=None, decoder=None,
                   added_tokens: Sequence[dict] = ()) -> dict:
    """A complete tokenizer.json document around its stages."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": list(added_tokens),
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": decoder, "model": model}


def added_token(i: int, content: str, special: bool = True, normalized: bool = False) -> dict:
    """An entry of "added_tokens": matched as a whole, wherever it occurs in the text. `normalized`:
    matched in the normalized text rather than the raw one."""
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def base_config(**special_tokens: str | None) -> dict:
    """tokenizer_config.json: the class that loads tokenizer.json as written, the named special
    tokens, and nothing added around the ids (lm's encode adds no BOS / EOS)."""
    config = {"tokenizer_class": TOKENIZER_CLASS, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}  # cleaning up would glue " ," into ","
    config.update({f"{name}_token": token for name, token in special_tokens.items() if token is not None})
    return config


def bpe_model(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, unk_token: str | None = None,
              byte_fallback: bool = False, fuse_unk: bool = False, ignore_merges: bool = False) -> dict:
    """A BPE model stage. Merges are written "left right", as GPT-2's files have them (and every
    version of the tokenizers library reads), unless a token holds a space: then as [left, right]."""
    if any(" " in token for merge in merges for token in merge):
        written = [list(merge) for merge in merges]
    else:
        written = [" ".join(merge) for merge in merges]
    return {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": fuse_unk, "byte_fallback": byte_fallback,
            "ignore_merges": ignore_merges, "vocab": dict(vocab), "merges": written}


# ---- byte-level BPE -------------------------------------------------------------------------------
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
GPT4_ONIGURUMA = GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")  # see `oniguruma_pattern`


def byte_bpe_from_tiktoken(tokenizer: TiktokenTokenizer) -> ByteBPETokenizer:
    """The same tokenizer as a `ByteBPETokenizer` (its ranks, regex and special tokens)."""
    encoding = tokenizer.encoding
    specials = tokenizer.special_tokens
    special_ids = set(specials.values())
    ranks = {}
    for i in range(encoding.n_vocab):
        if i not in special_ids:
            try:
                ranks[encoding.decode_single_token_bytes(i)] = i
            except KeyError:  # an unused id between the ordinary and the special tokens
                pass
    # tiktoken keeps the regex in `_pat_str`; it has no public name
    return ByteBPETokenizer.from_tiktoken_ranks(ranks, encoding._pat_str, specials)


def byte_level_pre_tokenizer(pattern: str | None) -> dict:
    """The pre-tokenizer stage for lm's regex `pattern`.

    The ByteLevel stage maps bytes to characters and, with use_regex, first splits with GPT-2's
    regex (written with the contractions in another order, which matches the same pieces). Any
    other regex is a Split stage that keeps each match as a pre-token ("Isolated"), in front of a
    ByteLevel stage that only maps; with no regex, the whole text is one pre-token.
    """
    if pattern == GPT2_PATTERN:
        return {**BYTE_LEVEL, "use_regex": True}
    if pattern is None:
        return {**BYTE_LEVEL, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": oniguruma_pattern(pattern)}, "behavior": "Isolated",
             "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, {**BYTE_LEVEL, "use_regex": False}]}


def oniguruma_pattern(pattern: str) -> str:
    """`pattern` as the tokenizers library's regex engine (Oniguruma, Ruby syntax) must read it.

    Python's `regex` reads X{1,3}+ as a possessive repeat (as many X as possible up to 3, never
    given back); Oniguruma reads it as (X{1,3})+, any number of X: GPT-4's \\p{N}{1,3}+ would then
    keep "1234567" whole instead of "123", "456", "7". Nothing follows that repeat inside its
    alternative, so giving back is never tried and the plain greedy \\p{N}{1,3} matches the same.
    The other possessive forms (?+, *+, ++) mean the same in both engines.
    """
    if pattern == GPT4_PATTERN:
        return GPT4_ONIGURUMA
    if regex.search(r"\{\d+(?:,\d*)?\}\+", pattern):
        raise TokenizerError(f"pattern {short_repr(pattern)} has a possessive repeat X{{n,m}}+, which the tokenizers "
                             f"library reads as (X{{n,m}})+; write it as an atomic group (?>X{{n,m}}) instead.")
    return pattern


def byte_level_json(tokenizer: ByteBPETokenizer) -> dict:
    """tokenizer.json for a byte-level BPE: a BPE model over GPT-2's byte characters.

    Special tokens are added tokens (found in the text first, as lm's encode does by default) and
    also entries of the model's vocabulary, which is how tokenizer.json fixes their ids.
    Not expressible: two ids for the same bytes (lm keeps the lower; a vocabulary maps each string
    to one id), and a special token whose name is also the text of an ordinary token.
    Regexes run in the Oniguruma engine in the tokenizers library and in Python's `regex` in lm.
    With GPT-2's and GPT-4's patterns they cut every character of Unicode alike (tested one by one);
    a character that only a later Unicode version assigns could still be classified differently.
    """
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokenizer.vocab):
        name = bytes_to_hf(token)
        if name in vocab:
            raise TokenizerError(f"ids {vocab[name]} and {i} are both the bytes {token!r}; a tokenizer.json "
                                 f"vocabulary gives each token one id. Drop the duplicate from the vocabulary.")
        vocab[name] = i
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    for name, i in specials:
        if name in vocab:
            raise TokenizerError(f"special token {name!r} is spelled like ordinary token {vocab[name]}, so "
                                 f"tokenizer.json could not tell them apart; rename the special token.")
        vocab[name] = i
    try:
        merges = [(bytes_to_hf(tokenizer.vocab[a]), bytes_to_hf(tokenizer.vocab[b])) for a, b in tokenizer.merges]
    except TokenizerError as err:
        raise TokenizerError(f"{err} Such a token is found only as a whole pre-token, and neither lm's .save() nor "
                             f"a tokenizer.json merge list can describe the vocabulary.") from None
    model = bpe_model(vocab, merges, ignore_merges=True)  # a whole-token pre-token is one id, as in lm
    return tokenizer_json(model, pre_tokenizer=byte_level_pre_tokenizer(tokenizer.pattern),
                          decoder={**BYTE_LEVEL, "use_regex": True},
                          added_tokens=[added_token(i, name) for name, i in specials])


def byte_level_config(tokenizer: ByteBPETokenizer) -> dict:
    eos = next((name for name, i in tokenizer.special_tokens.items() if i == tokenizer.eos_id), None)
    return base_config(eos=eos)


# ---- characters -----------------------------------------------------------------------------------
def char_json(tokenizer: CharTokenizer) -> dict:
    """tokenizer.json for a `CharTokenizer`: NFC, then a BPE model with no merges, so that each
    character is looked up on its own; the Fuse decoder joins the characters without spaces.

    The special tokens (<PAD>, <BOS>, ...) are added tokens matched in the normalized text, as lm
    matches them after NFC. Characters outside the vocabulary follow lm's `unknown` policy where
    the format can: "replace" and "error" give <UNK> (the format cannot raise; the policy is kept
    in tokenizer_config.json so that `load_hf_tokenizer` restores "error"), "skip" drops them.
    One difference remains: the tokenizers library's NFC uses older Unicode tables than Python's
    `unicodedata`, so about a hundred combining marks added to Unicode in recent years (U+07FD,
    U+0898, ...) are not reordered or composed as lm does, and text holding them can give other ids.
    """
    vocab = {token: i for i, token in enumerate(tokenizer.itos)}
    unk = "<UNK>" if tokenizer.unknown in ("replace", "error") else None
    model = bpe_model(vocab, [], unk_token=unk)
    specials = [added_token(tokenizer.stoi[name], name, normalized=True) for name in SPECIAL_TOKENS]
    return tokenizer_json(model, normalizer={"type": "NFC"}, decoder={"type": "Fuse"}, added_tokens=specials)


def char_config(tokenizer: CharTokenizer) -> dict:
    config = base_config(bos="<BOS>", eos="<EOS>", pad="<PAD>", sep="<SEP>", unk="<UNK>")
    config[UNKNOWN_KEY] = tokenizer.unknown
    return config


# ---- sentencepiece --------------------------------------------------------------------------------
# A piece's type in a sentencepiece model, and the model types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


@dataclass
class SentencePieceModel:
    """What tokenizer.json needs from a sentencepiece model, with the proto's defaults."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""  # the normalization table; empty for "identity"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message, in order: an int for varints,
    bytes for strings, nested messages and fixed-size numbers. (Enough of the wire format to read a
    sentencepiece model without the protobuf package.)"""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type in (1, 5):  # 8 or 4 bytes
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == 2:  # a length, then that many bytes
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise TokenizerError(f"the sentencepiece model has a field of wire type {wire_type}, which protobuf no "
                                 f"longer writes: the file is damaged or not a sentencepiece model.")
        if pos > len(data):
            raise TokenizerError("the sentencepiece model ends in the middle of a field: the file is damaged.")
        yield number, value


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at `pos`: 7 bits a byte, low bits first, the top bit set on all but the last."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise TokenizerError("the sentencepiece model holds a damaged number (varint).")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def read_sentencepiece_model(proto: bytes) -> SentencePieceModel:
    """The pieces and settings of a sentencepiece model (its serialized ModelProto)."""
    model = SentencePieceModel()
    for number, value in protobuf_fields(proto):
        if number == 1:  # a piece: 1 its text, 2 its score (a float), 3 its type
            piece, score, kind = "", 0.0, NORMAL
            for n, v in protobuf_fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2:  # the trainer's settings
            for n, v in protobuf_fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 24:
                    model.treat_whitespace_as_suffix = bool(v)
                elif n == 35:
                    model.byte_fallback = bool(v)
        elif number == 3:  # the normalizer's settings
            for n, v in protobuf_fields(value):
                if n == 2:
                    model.precompiled_charsmap = v
                elif n == 3:
                    model.add_dummy_prefix = bool(v)
                elif n == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    model.escape_whitespaces = bool(v)
    return model


def sentencepiece_proto(tokenizer: SentencePieceTokenizer) -> bytes:
    return base64.b64decode(tokenizer.to_dict()["model"])


def sentencepiece_json(tokenizer: SentencePieceTokenizer) -> dict:
    """tokenizer.json that encodes like the sentencepiece model itself.

    - normalizer: sentencepiece's whitespace handling: spaces become "▁", with a "▁" in front of the
      text when the model adds a dummy prefix (and runs of spaces squeezed, when it removes extra
      whitespace).
    - pre-tokenizer: none (the text is one sequence, as sentencepiece sees it), except that
      user-defined pieces are cut out, as sentencepiece keeps them whole.
    - model: BPE or Unigram, with byte fallback where the model has it: a character outside the
      vocabulary becomes the pieces <0x..> of its UTF-8 bytes (see `sentencepiece_model_json`).
    - decoder: "▁" back to a space, byte pieces back to characters, joined.
    <s>, </s>, <unk>, <pad> are not added tokens: lm (like sentencepiece) encodes "<s>" written in
    the text as ordinary text; tokenizer_config.json names them for transformers, with
    split_special_tokens so that it does the same.

    Differences that remain: lm writes a "▁" in the text as its three byte pieces (so that it
    decodes back to "▁"), sentencepiece and this file as a space. A Unigram model may cut a text
    two ways of exactly equal score (a run such as "*****" as "**" "**" "*" or "*" "**" "**"):
    sentencepiece adds scores in 32-bit floats, the tokenizers library in 64-bit, so such ties can
    go either way.
    """
    model = read_sentencepiece_model(sentencepiece_proto(tokenizer))
    check_sentencepiece_supported(model)
    user = [piece for piece, _, kind in model.pieces if kind == USER_DEFINED]
    pre_tokenizer = None
    if user:  # each user-defined piece becomes a pre-token of its own (longest first, where one begins another)
        alternatives = "|".join(escape_regex(piece) for piece in sorted(user, key=len, reverse=True))
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": alternatives}, "behavior": "Isolated", "invert": False}
    decoders = [replace(SPACE_MARK, " "), {"type": "ByteFallback"}, {"type": "Fuse"}]
    if model.add_dummy_prefix:  # the space that the prefix became
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return tokenizer_json(sentencepiece_model_json(model), normalizer=sentencepiece_normalizer(model),
                          pre_tokenizer=pre_tokenizer, decoder={"type": "Sequence", "decoders": decoders})


def sentencepiece_model_json(model: SentencePieceModel) -> dict:
    """The BPE or Unigram model stage of a sentencepiece model.

    BPE: sentencepiece stores scores, not merges. It joins the adjacent pair that makes the
    best-scoring normal piece, so the merges list every pair of normal pieces that joins into a
    piece, best piece first (`all_merges`). User-defined pieces arrive as whole pre-tokens, which
    `ignore_merges` turns into their id at once. (It does so for any pre-token that is a whole
    piece: text that spells exactly "<s>" or "<0x41>" between two user-defined pieces becomes that
    piece, where sentencepiece cuts it into characters.)
    Unigram: the pieces with their scores; the best-scoring cut of the text wins. A Unigram model
    does not know piece types and would match "<s>" or "<0x41>" written in the text as the control
    or byte piece (score 0, the best), which sentencepiece never does; so those pieces get a score
    far below the others, and lose to the characters they are written with.
    """
    pieces = model.pieces
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if model.model_type == BPE:
        normal = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
        best_first = sorted(normal, key=lambda piece: (-pieces[normal[piece]][1], normal[piece]))
        has_user = any(kind == USER_DEFINED for _, _, kind in pieces)
        # fuse_unk: sentencepiece gives one <unk> for a run of unknown characters
        return bpe_model({piece: i for i, (piece, _, _) in enumerate(pieces)}, all_merges(best_first, normal),
                         unk_token=pieces[unk_id][0] if unk_id is not None else None,
                         byte_fallback=model.byte_fallback, fuse_unk=True, ignore_merges=has_user)
    lowest = min((score for _, score, kind in pieces if kind == NORMAL), default=0.0)
    never = lowest - 1e6  # far below any cut into normal pieces
    scored = [[piece, score if kind in (NORMAL, USER_DEFINED) else never] for piece, score, kind in pieces]
    return {"type": "Unigram", "unk_id": unk_id, "vocab": scored, "byte_fallback": model.byte_fallback}


def all_merges(tokens: Sequence[str], known: Mapping[str, int]) -> list[tuple[str, str]]:
    """For each token of `tokens` (best first), every pair of `known` tokens that joins into it."""
    merges = []
    for token in tokens:
        for cut in range(1, len(token)):
            if token[:cut] in known and token[cut:] in known:
                merges.append((token[:cut], token[cut:]))
    return merges


def sentencepiece_normalizer(model: SentencePieceModel) -> dict:
    stages = []
    if model.remove_extra_whitespaces:  # spaces only: sentencepiece leaves tabs and newlines alone
        stages += [replace(r"\A +| +\z", "", is_regex=True), replace(" {2,}", " ", is_regex=True)]
    stages.append(replace(" ", SPACE_MARK))
    if model.add_dummy_prefix:
        stages.append({"type": "Prepend", "prepend": SPACE_MARK})  # (not to an empty text, as in sentencepiece)
    return {"type": "Sequence", "normalizers": stages}


def replace(pattern: str, content: str, is_regex: bool = False) -> dict:
    """A Replace stage (normalizer or decoder): every match of `pattern` becomes `content`."""
    return {"type": "Replace", "pattern": {"Regex" if is_regex else "String": pattern}, "content": content}


def escape_regex(text: str) -> str:
    """`text` as a regex that matches it literally, in Python's and in Oniguruma's syntax."""
    return "".join("\\" + c if c in ".^$|?*+()[]{}\\" else c for c in text)


def check_sentencepiece_supported(model: SentencePieceModel) -> None:
    """Raise for the sentencepiece settings that tokenizer.json cannot reproduce exactly."""
    names = {UNIGRAM: "unigram", BPE: "bpe", 3: "word", 4: "char"}
    if model.model_type not in (UNIGRAM, BPE):
        raise TokenizerError(f"the sentencepiece model is of type {names.get(model.model_type, model.model_type)!r}; "
                             f"lm writes tokenizer.json for 'bpe' and 'unigram' models only.")
    if model.precompiled_charsmap:
        raise TokenizerError("the sentencepiece model normalizes text with a table (e.g. nmt_nfkc). The tokenizers "
                             "library applies such a table to whole graphemes rather than to characters, so some ids "
                             "would differ (\"\\r\\n\" becomes one space, not two); lm writes tokenizer.json only for "
                             "models trained with normalization_rule_name='identity', as SentencePieceTokenizer.train "
                             "does.")
    if not model.escape_whitespaces or model.treat_whitespace_as_suffix:
        raise TokenizerError("the sentencepiece model keeps spaces unescaped or puts '▁' at the end of pieces "
                             "(escape_whitespaces=False / treat_whitespace_as_suffix=True); lm writes tokenizer.json "
                             "only for the usual '▁' in front.")
    unused = [piece for piece, _, kind in model.pieces if kind == UNUSED]
    if unused:
        raise TokenizerError(f"the sentencepiece model has {len(unused)} unused piece(s) ({unused[0]!r}, ...), which "
                             f"sentencepiece splits again after merging; tokenizer.json cannot do that.")


def sentencepiece_config(tokenizer: SentencePieceTokenizer) -> dict:
    def piece(i):
        return tokenizer.id_to_piece(i) if i is not None else None

    config = base_config(bos=piece(tokenizer.bos_id), eos=piece(tokenizer.eos_id), unk=piece(tokenizer.unk_id),
                         pad=piece(tokenizer.pad_id))
    config["split_special_tokens"] = True  # "<s>" written in the text is text, as in lm and sentencepiece
    return config


# ---- reading --------------------------------------------------------------------------------------
def load_hf_tokenizer(source, *, trust_pattern: bool = False) -> Tokenizer:
    """An lm tokenizer with the same ids as a Hugging Face tokenizer. Never downloads.

    `source`: a folder holding tokenizer.json and / or tokenizer.model (and optionally
    tokenizer_config.json), the path of one of those two files, or a transformers tokenizer object
    (its `backend_tokenizer`, or its sentencepiece file).

    - a byte-level BPE tokenizer.json -> `ByteBPETokenizer`, with GPT-2's regex (ByteLevel
      pre-tokenizer with use_regex), GPT-4's (a Split with exactly lm's GPT4_PATTERN), none, or,
      with `trust_pattern=True`, another Split regex; special tokens from the added tokens.
    - the character tokenizer.json that `save_hf_tokenizer` writes -> `CharTokenizer`.
    - tokenizer.model -> `SentencePieceTokenizer`.
    Anything else (WordPiece, Unigram without tokenizer.model, normalizers) raises a TokenizerError.
    Post-processors are ignored: lm's encode never adds BOS / EOS, so the ids are those of
    transformers' `encode(text, add_special_tokens=False)`.
    """
    if isinstance(source, (str, os.PathLike)):
        data, sp_model, config = read_hf_files(Path(source))
    elif hasattr(source, "backend_tokenizer") or hasattr(source, "vocab_file"):
        data, sp_model, config = read_transformers_tokenizer(source)
    else:
        raise TokenizerError(f"load_hf_tokenizer expects a folder, a tokenizer.json / tokenizer.model path or a "
                             f"transformers tokenizer, got {type(source).__name__}.")
    kind = hf_kind(data) if data is not None else None
    if kind == "byte_level":
        return byte_bpe_from_json(data, trust_pattern)
    if kind == "char":
        return char_from_json(data, config)
    if sp_model is not None:
        return SentencePieceTokenizer.from_file(sp_model)
    if kind is None:
        raise TokenizerError("the source has neither tokenizer.json nor tokenizer.model.")
    raise TokenizerError(f"the tokenizer is {kind}, which lm cannot reproduce. lm reads byte-level BPE "
                         f"(GPT-2 style) and its own character tokenizer from tokenizer.json, and sentencepiece "
                         f"models from tokenizer.model.")


def read_hf_files(path: Path) -> tuple[dict | None, Path | None, dict]:
    """(tokenizer.json data, tokenizer.model path, tokenizer_config.json data) of a folder or file."""
    if path.is_file():
        if path.suffix == ".model":
            return None, path, {}
        folder, json_path = path.parent, path
    elif path.is_dir():
        folder, json_path = path, path / TOKENIZER_JSON
    else:
        raise TokenizerError(f"{str(path)!r} is not a folder or file on this machine; lm never downloads. For a "
                             f"model on the Hub, load it with transformers.AutoTokenizer.from_pretrained and pass "
                             f"the tokenizer object.")
    data = read_tokenizer_file(json_path) if json_path.is_file() else None
    sp_model = folder / SENTENCEPIECE_MODEL
    config_path = folder / TOKENIZER_CONFIG
    config = read_tokenizer_file(config_path) if config_path.is_file() else {}
    if data is None and not sp_model.is_file():
        raise TokenizerError(f"{str(path)!r} holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}.")
    return data, (sp_model if sp_model.is_file() else None), (config if isinstance(config, dict) else {})


def read_transformers_tokenizer(tokenizer) -> tuple[dict | None, Path | None, dict]:
    """(tokenizer.json data, sentencepiece file, init settings) of a transformers tokenizer."""
    data = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        check_size("the size of the tokenizer's JSON", len(text), MAX_FILE_BYTES)
        data = json.loads(text)
    sp_model = None
    config = dict(getattr(tokenizer, "init_kwargs", None) or {})
    vocab_file = getattr(tokenizer, "vocab_file", None) or config.get("vocab_file")
    folder = getattr(tokenizer, "name_or_path", None)
    for candidate in (vocab_file, Path(folder) / SENTENCEPIECE_MODEL if folder else None):
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            sp_model = Path(candidate)
            break
    return data, sp_model, config


def hf_kind(data) -> str:
    """"byte_level", "char" (the layout `char_json` writes) or a description of another kind."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerError("tokenizer.json has no 'model' object: it is damaged or not a tokenizer.json.")
    model_type = data["model"].get("type") or ("BPE" if "merges" in data["model"] else None)
    if model_type == "BPE":
        if stage_types(data.get("decoder")) == ["ByteLevel"] or "ByteLevel" in stage_types(data.get("pre_tokenizer")):
            return "byte_level"
        if stage_types(data.get("decoder")) == ["Fuse"] and stage_types(data.get("normalizer")) == ["NFC"]:
            return "char"
        if data["model"].get("byte_fallback") or "Metaspace" in stage_types(data.get("pre_tokenizer")):
            return "a sentencepiece-style BPE without its tokenizer.model"
        return "a BPE model that is not byte-level"
    if model_type == "Unigram":
        return "a Unigram model without its tokenizer.model"
    return f"a {model_type or 'model of unknown type'} model" if model_type != "WordPiece" else "WordPiece (BERT style)"


def stage_types(stage) -> list[str]:
    """The types of a pipeline stage, a Sequence's members in order; [] for none."""
    if not isinstance(stage, dict):
        return []
    members = stage.get("normalizers") or stage.get("pretokenizers") or stage.get("decoders")
    if stage.get("type") == "Sequence" and isinstance(members, list):
        return [t for member in members for t in stage_types(member)]
    return [stage.get("type")] if stage.get("type") != "Sequence" else []


# ---- reading byte-level BPE -----------------------------------------------------------------------
def byte_bpe_from_json(data: dict, trust_pattern: bool = False) -> ByteBPETokenizer:
    """A `ByteBPETokenizer` from byte-level BPE tokenizer.json data (see `load_hf_tokenizer`)."""
    model = data["model"]
    if stage_types(data.get("normalizer")):
        raise TokenizerError(f"the tokenizer has a normalizer ({', '.join(stage_types(data['normalizer']))}), which "
                             f"changes the text before BPE; lm's byte-level BPE has none.")
    if stage_types(data.get("decoder")) != ["ByteLevel"]:
        raise TokenizerError(f"the byte-level tokenizer decodes with {stage_types(data.get('decoder'))}; lm decodes "
                             f"bytes as the ByteLevel decoder does, so it reads only that one.")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"the BPE model has {key}={model[key]!r}; lm's byte-level BPE has none.")
    if model.get("byte_fallback") or model.get("dropout"):
        raise TokenizerError("the BPE model uses byte_fallback or dropout, which lm's byte-level BPE does not.")
    pattern = pattern_of(data.get("pre_tokenizer"), trust_pattern)

    vocab, added = model.get("vocab"), data.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise TokenizerError("the BPE model's vocab must map token strings to ids, and added_tokens be a list.")
    check_size("the vocabulary of the tokenizer.json", len(vocab) + len(added), MAX_VOCAB_SIZE)
    specials = specials_of(added)
    tokens = ordinary_tokens(vocab, set(specials))
    merges = merges_of(model.get("merges"))
    check_merge_order(tokens, merges)
    try:
        return ByteBPETokenizer(tokens, specials, pattern)
    except TokenizerError as err:
        raise TokenizerError(f"the tokenizer.json does not fit lm's byte-level BPE: {err}") from None


def pattern_of(pre_tokenizer, trust_pattern: bool = False) -> str | None:
    """lm's regex for a byte-level pre-tokenizer stage (see `byte_level_pre_tokenizer`)."""
    stages = [pre_tokenizer]
    if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence":
        stages = pre_tokenizer.get("pretokenizers")
    if not isinstance(stages, list) or not stages or not all(isinstance(stage, dict) for stage in stages):
        raise TokenizerError(f"the pre-tokenizer {short_repr(pre_tokenizer)} is not one lm can reproduce.")
    described = ", ".join(short_repr(stage) for stage in stages)
    last = stages[-1]
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", True):
        raise TokenizerError(f"the pre-tokenizer {described} does not end in a ByteLevel stage without "
                             f"add_prefix_space; lm adds no space before the text.")
    use_regex = last.get("use_regex", True)
    if len(stages) == 1:
        return GPT2_PATTERN if use_regex else None
    split = stages[0]
    found = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
    if (len(stages) != 2 or use_regex or split.get("type") != "Split" or not isinstance(found, str)
            or split.get("behavior") != "Isolated" or split.get("invert")):
        raise TokenizerError(f"the pre-tokenizer {described} is not one lm can reproduce: lm reads a ByteLevel stage "
                             f"(GPT-2's regex, or none), or a Split stage with a regex, 'Isolated', then a "
                             f"ByteLevel stage without use_regex.")
    if found in (GPT4_PATTERN, GPT4_ONIGURUMA):
        return GPT4_PATTERN
    try:
        check_saved_pattern(found, trust_pattern)
        oniguruma_pattern(found)  # a repeat X{n,m}+ means one thing there and another here
    except TokenizerError as err:
        raise TokenizerError(f"{err} (Also check that it means the same in Python's regex module as in Oniguruma, "
                             f"the engine of the tokenizers library: e.g. $ ends any line there.)") from None
    return found


def specials_of(added_tokens: list) -> dict[str, int]:
    """lm's special tokens (name -> id) from tokenizer.json's added tokens."""
    specials = {}
    for token in added_tokens:
        if not (isinstance(token, dict) and isinstance(token.get("content"), str) and isinstance(token.get("id"), int)):
            raise TokenizerError(f"added token {short_repr(token)} needs a 'content' string and an 'id'.")
        stripped = [key for key in ("lstrip", "rstrip", "single_word") if token.get(key)]
        if stripped:
            raise TokenizerError(f"added token {token['content']!r} sets {stripped}; lm matches special tokens "
                                 f"exactly as written, without taking spaces around them or checking word edges.")
        specials[token["content"]] = token["id"]
    return specials


def ordinary_tokens(vocab: dict, specials: set[str]) -> list[bytes]:
    """The model's vocabulary without the special tokens, as bytes by id; ids must be 0, 1, ..., n-1."""
    ids = {}
    for name, i in vocab.items():
        if name not in specials:
            if not isinstance(i, int) or i in ids:
                raise TokenizerError(f"token {short_repr(name)} has id {short_repr(i)}; ids must be distinct ints.")
            ids[i] = name
    missing = next((i for i in range(len(ids)) if i not in ids), None)
    if missing is not None:
        raise TokenizerError(f"the ordinary tokens do not have the ids 0..{len(ids) - 1}: {missing} is missing. "
                             f"lm numbers its byte-level tokens without gaps, special tokens after them.")
    return [hf_to_bytes(ids[i]) for i in range(len(ids))]


def merges_of(merges) -> list[tuple[bytes, bytes]]:
    """The merges as byte pairs: tokenizer.json writes each as "left right" or as [left, right]."""
    if not isinstance(merges, list):
        raise TokenizerError(f"the BPE model's merges must be a list, got {type(merges).__name__}.")
    pairs = []
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TokenizerError(f"merge {short_repr(merge)} is not a pair of tokens.")
        pairs.append((hf_to_bytes(pair[0]), hf_to_bytes(pair[1])))
    return pairs


def check_merge_order(tokens: list[bytes], merges: list[tuple[bytes, bytes]]) -> None:
    """Raise unless the merges make lm's choice: lm joins the pair whose joined token has the lowest
    id, a BPE model the pair listed first. Both choose alike when merges join known tokens, come in
    the order of the ids they make, and make every token from id 256 on."""
    ids = {token: i for i, token in enumerate(tokens)}
    made, last = set(), -1
    for k, (left, right) in enumerate(merges):
        joined = ids.get(left + right)
        if left not in ids or right not in ids or joined is None:
            raise TokenizerError(f"merge {k} ({bytes_to_hf(left)!r}, {bytes_to_hf(right)!r}) joins tokens that are "
                                 f"not both in the vocabulary, or makes one that is not.")
        if joined < last:
            raise TokenizerError(f"merge {k} makes token {joined} after a merge made token {last}; lm needs the "
                                 f"merges in the order of the ids they make (lm joins the pair whose token has the "
                                 f"lowest id).")
        made.add(joined)
        last = joined
    unmade = next((i for i in range(256, len(tokens)) if i not in made), None)
    if unmade is not None:
        raise TokenizerError(f"no merge makes token {unmade} ({bytes_to_hf(tokens[unmade])!r}); lm needs each token "
                             f"after the 256 bytes to be the join of two tokens.")


# ---- reading characters ---------------------------------------------------------------------------
def char_from_json(data: dict, config: dict) -> CharTokenizer:
    """A `CharTokenizer` from the tokenizer.json `char_json` writes (ids in lm's order)."""
    model = data["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError("the character tokenizer's vocab must map characters to ids.")
    check_size("the vocabulary of the tokenizer.json", len(vocab), MAX_VOCAB_SIZE)
    if model.get("merges") or data.get("pre_tokenizer"):
        raise TokenizerError("a character tokenizer.json has no merges and no pre-tokenizer; this one has.")
    by_id = sorted(vocab, key=lambda token: vocab[token])
    chars = by_id[len(SPECIAL_TOKENS):]
    if (tuple(by_id[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or [vocab[t] for t in by_id] != list(range(len(by_id)))
            or any(len(c) != 1 for c in chars) or chars != sorted(chars)):
        raise TokenizerError(f"the character vocabulary does not follow lm's layout: ids 0..4 {SPECIAL_TOKENS}, "
                             f"then single characters in sorted order.")
    unknown = config.get(UNKNOWN_KEY)
    if unknown not in UNKNOWN_POLICIES:  # not written by lm: follow what the file does
        unknown = "replace" if model.get("unk_token") == "<UNK>" else "skip"
    return CharTokenizer(chars, unknown=unknown)
