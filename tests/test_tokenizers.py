from __future__ import annotations

import json
import socket
import subprocess
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm import CharTokenizer, TokenizerError, load_tokenizer
from lm.tokenizers import SPECIAL_TOKENS, tokenizer_from_dict

CORPUS = "Hello, wörld! Ça va? Straße 日本語 😀 naïve café\n\ttabs"


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer.train(CORPUS)


def test_specials_take_ids_0_to_4(tok):
    assert tok.itos[:5] == ["<PAD>", "<BOS>", "<EOS>", "<SEP>", "<UNK>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIAL_TOKENS)}


def test_vocabulary_is_the_sorted_distinct_characters(tok):
    chars = sorted(set(unicodedata.normalize("NFC", CORPUS)))
    assert tok.itos[5:] == chars
    assert tok.vocab_size == len(tok) == 5 + len(chars)
    assert CharTokenizer.train(CORPUS[::-1]).itos == tok.itos  # order of the text does not matter


def test_nfc_normalisation():
    decomposed, composed = "e\u0301", "\u00e9"
    assert decomposed != composed
    tok = CharTokenizer.train("caf" + decomposed)
    assert composed in tok.stoi and "\u0301" not in tok.stoi
    assert tok.encode("caf" + decomposed) == tok.encode("caf" + composed)
    assert len(tok.encode(decomposed)) == 1
    assert tok.decode(tok.encode(decomposed)) == composed


def test_parse_special(tok):
    text = "<BOS>Hello<SEP>wörld<EOS>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[6] == tok.sep_id
    assert len(ids) == 1 + 5 + 1 + 5 + 1
    assert tok.decode(ids) == text


def test_parse_special_off_encodes_the_literal_characters():
    tok = CharTokenizer.train("<BOS> abc")
    ids = tok.encode("<BOS>", parse_special=False)
    assert ids == [tok.stoi[c] for c in "<BOS>"]
    assert tok.bos_id not in ids


def test_add_bos_and_eos(tok):
    plain = tok.encode("Hello")
    assert tok.encode("Hello", add_bos=True, add_eos=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("", add_bos=True, add_eos=True) == [tok.bos_id, tok.eos_id]


def test_no_double_bos_or_eos(tok):
    ids = tok.encode("<BOS>Hello<EOS>", add_bos=True, add_eos=True)
    assert ids == [tok.bos_id, *tok.encode("Hello"), tok.eos_id]
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1


def test_unknown_error_names_the_character(tok):
    with pytest.raises(TokenizerError) as err:
        tok.encode("Hello Zq")
    message = str(err.value)
    assert "'Z'" in message and "'q'" in message and "2 character(s)" in message
    assert "replace" in message and "skip" in message  # the message names the fixes


def test_unknown_replace_and_skip():
    replace = CharTokenizer.train("abc", unknown="replace")
    skip = CharTokenizer.train("abc", unknown="skip")
    a, b, c = (replace.stoi[ch] for ch in "abc")
    assert replace.encode("axbz") == [a, replace.unk_id, b, replace.unk_id]
    assert skip.encode("axbz") == [a, b]
    assert replace.decode(replace.encode("cxz")) == "c<UNK><UNK>"


def test_bad_unknown_policy():
    with pytest.raises(TokenizerError, match="ignore"):
        CharTokenizer.train("abc", unknown="ignore")


def test_encode_needs_a_str(tok):
    with pytest.raises(TokenizerError, match="bytes"):
        tok.encode(b"Hello")


def test_decode_out_of_range(tok):
    n = tok.vocab_size
    with pytest.raises(TokenizerError, match=f"id {n} is out of range"):
        tok.decode([5, n])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


def test_decode_skip_special(tok):
    ids = tok.encode("<BOS>Hello<SEP>Ça<EOS><PAD><PAD>")
    assert tok.decode(ids, skip_special=True) == "HelloÇa"
    assert tok.decode(ids) == "<BOS>Hello<SEP>Ça<EOS><PAD><PAD>"


def test_batch_encode_decode(tok):
    texts = ["Hello", "", "日本語 😀", "café"]
    batch = tok.encode_batch(texts, add_bos=True)
    assert batch == [tok.encode(t, add_bos=True) for t in texts]
    assert tok.decode_batch(batch, skip_special=True) == texts
    assert tok.decode_batch(batch) == ["<BOS>" + t for t in texts]


def test_decode_accepts_tensors_and_numpy(tok):
    import numpy as np
    import torch

    ids = tok.encode("Hello")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "Hello"


def test_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train(CORPUS, unknown="replace")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    for loaded in (CharTokenizer.load(path), load_tokenizer(path), tokenizer_from_dict(json.loads(path.read_text()))):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.itos == tok.itos and loaded.unknown == "replace"
        assert loaded.encode(CORPUS + "?!#") == tok.encode(CORPUS + "?!#")


def test_saved_file_is_readable_utf8_json(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["kind"] == "char" and "日" in data["chars"]


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="does not exist"):
        CharTokenizer.load(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="bpe"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        tokenizer_from_dict(["not", "a", "dict"])
    known = r"known kinds are \['bpe', 'char', 'sentencepiece', 'tiktoken'\]"
    with pytest.raises(TokenizerError, match=r"unknown tokenizer kind 'wordpiece'; " + known):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(TokenizerError, match=r"unknown tokenizer kind \['char'\]"):
        tokenizer_from_dict({"kind": ["char"]})
    with pytest.raises(TokenizerError, match="expected a 'char' tokenizer"):
        CharTokenizer.from_dict({"kind": "bpe", "chars": []})


def test_malformed_saved_char_fields():
    for data in ({"chars": "abc"}, {"chars": ["a", 1]}, {}):
        with pytest.raises(TokenizerError, match="'chars': a list of single characters"):
            tokenizer_from_dict({"kind": "char", **data})
    with pytest.raises(TokenizerError, match="is not a policy"):
        tokenizer_from_dict({"kind": "char", "chars": ["a"], "unknown": ["error"]})


# ---- hostile files -----------------------------------------------------------------------------------
def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    CharTokenizer.train(CORPUS).save(path)
    monkeypatch.setattr("lm.tokenizers.base.MAX_FILE_BYTES", 100)
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda self: pytest.fail("the file was read"))
    with pytest.raises(TokenizerError, match=r"size in bytes of tokenizer file .* is \d+, over lm's limit of 100"):
        load_tokenizer(path)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b'{"kind": "char", "chars": [', b"[" * 100_000, b""])
def test_a_file_that_is_not_json_is_a_clear_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer file .* (is not UTF-8 JSON|nests its JSON too deeply)"):
        load_tokenizer(path)


def saved_tokenizers() -> dict[str, dict]:
    """One small saved tokenizer of each kind (GPT-2's only when its ranks are on this machine)."""
    from lm.tokenizers import ByteBPETokenizer, SentencePieceTokenizer, gpt2_ranks_path

    saved = {"char": CharTokenizer.train(CORPUS).to_dict(),
             "bpe": ByteBPETokenizer.train(CORPUS * 3, vocab_size=300).to_dict(),
             "sentencepiece": SentencePieceTokenizer.train(CORPUS * 3, vocab_size=300).to_dict()}
    try:
        gpt2_ranks_path(download=False)
        saved["tiktoken"] = {"kind": "tiktoken", "name": "gpt2"}
    except ValueError:
        pass
    return saved


SAVED = saved_tokenizers()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["gpt2", "gpt4", "char", "bpe", "a", "<|endoftext|>", "cl100k_base", "r50k_base"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def mutate(draw, value, depth: int = 0):
    """`value` with one part replaced or deleted: a field of the saved dict, or a part of one (an
    item of a list, a value of a dict), down to depth 3."""
    if isinstance(value, (dict, list)) and value and depth < 3 and (depth == 0 or draw(st.integers(0, 2)) > 0):
        value = dict(value) if isinstance(value, dict) else list(value)
        key = draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        if draw(st.integers(0, 4)) == 4:
            del value[key]
        else:
            value[key] = mutate(draw, value[key], depth + 1)
        return value
    return draw(JSON_VALUES)


def edit_text(draw, text: str) -> str:
    """A cut, an insertion or a changed character in the JSON text itself."""
    at = draw(st.integers(0, len(text)))
    how = draw(st.sampled_from(["cut", "insert", "set"]))
    if how == "cut":
        return text[:at]
    piece = draw(st.text(alphabet='{}[]",:0123456789e-.\\ux abtrue', min_size=1, max_size=4))
    return text[:at] + piece + text[at + (len(piece) if how == "set" else 0):]


@settings(max_examples=300, deadline=5_000)
@given(kind=st.sampled_from(sorted(SAVED)), data=st.data())
def test_mutated_saved_tokenizers_load_or_fail_clearly(tmp_path_factory, kind, data):
    """Random damage to a valid tokenizer file gives a `TokenizerError` or a tokenizer that works,
    without touching the network (the deadline catches a load that hangs)."""
    saved = mutate(data.draw, SAVED[kind])
    text = json.dumps(saved, ensure_ascii=data.draw(st.booleans()))
    if data.draw(st.integers(0, 3)) == 3:  # hypothesis favours small draws: the rare case gets the large one
        text = edit_text(data.draw, text)
    path = tmp_path_factory.getbasetemp() / "mutated.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((socket.socket, "connect"), (socket, "create_connection"), (subprocess, "Popen")):
            patch.setattr(owner, name, lambda *args, **kwargs: pytest.fail("the loader reached for the network"))
        try:
            tok = load_tokenizer(path)
        except TokenizerError:
            return
    try:
        ids = tok.encode("Hello, naïve world 😀 <|endoftext|>")
    except TokenizerError:  # e.g. a char tokenizer that refuses unseen characters
        return
    assert isinstance(tok.decode(ids), str)


def test_multi_character_vocabulary_entries_are_refused():
    with pytest.raises(TokenizerError, match="single characters"):
        CharTokenizer(["a", "ab"])


@pytest.mark.parametrize("text", ["", None])
def test_empty_training_text(text):
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.train(text)


# ---- properties ------------------------------------------------------------------------------------
ALPHABET_TOK = CharTokenizer.train(CORPUS)
ALPHABET = ALPHABET_TOK.itos[len(SPECIAL_TOKENS):]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=60))
def test_round_trip_over_the_training_alphabet(text):
    ids = ALPHABET_TOK.encode(text)
    assert all(0 <= i < ALPHABET_TOK.vocab_size for i in ids)
    assert ALPHABET_TOK.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_round_trip_of_any_training_text(text):
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text, parse_special=False)) == unicodedata.normalize("NFC", text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("abc<>BOSEP"), max_size=40))
def test_parse_special_round_trips_text_with_literal_markers(text):
    tok = CharTokenizer.train("abc<>BOSEP")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text
