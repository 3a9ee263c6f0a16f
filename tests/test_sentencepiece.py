"""`SentencePieceTokenizer` against the sentencepiece library itself."""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lm
from lm import TokenizerError, load_tokenizer
from lm.corpora import pydoc_corpus
from lm.tokenizers import SentencePieceTokenizer, tokenizer_from_dict

SPACE_MARK = "\u2581"
TRICKY = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines\r\n",
    "ﬁne ½ Ｆｕｌｌ ｗｉｄｔｈ ①",  # NFKC would rewrite every one of these
    "e\u0301 vs \u00e9",  # decomposed and composed é stay distinct
    "日本語 😀 Ελληνικά العربية",
    "<s> </s> <unk> <pad> <0x41>",  # special pieces written as text are text
    "\x00\x01\x7f",
    "",
    " ",
]


@pytest.fixture(scope="module")
def sp() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(pydoc_corpus(), vocab_size=1000)


@pytest.fixture(scope="module")
def reference(sp) -> spm.SentencePieceProcessor:
    """The sentencepiece library's own processor for the same model."""
    return spm.SentencePieceProcessor(model_proto=base64.b64decode(sp.to_dict()["model"]))


# ---- ids and vocabulary ----------------------------------------------------------------------------
def test_special_ids_follow_the_seed(sp, reference):
    assert sp.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
    assert (reference.unk_id(), reference.bos_id(), reference.eos_id(), reference.pad_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]


def test_vocab_size_is_exact_and_has_every_byte(sp, reference):
    assert sp.vocab_size == len(sp) == reference.get_piece_size() == 1000
    byte_pieces = [sp.id_to_piece(i) for i in range(4, 4 + 256)]
    assert byte_pieces == [f"<0x{b:02X}>" for b in range(256)]


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_sentencepiece(sp, reference, text):
    assert sp.encode(text) == reference.encode(text)
    assert sp.pieces(text) == reference.encode(text, out_type=str)


@settings(max_examples=300, deadline=None)
@given(st.text().filter(lambda s: SPACE_MARK not in s))
def test_ids_match_sentencepiece_property(sp, reference, text):
    assert sp.encode(text) == reference.encode(text)


def test_pieces(sp):
    pieces = sp.pieces("the value of the")
    assert pieces[0].startswith("the") and any(p.startswith(SPACE_MARK) for p in pieces)
    assert "".join(pieces).replace(SPACE_MARK, " ") == "the value of the"
    assert sp.pieces("😀") == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback, not <unk>


def test_merges_compress_english(sp):
    text = pydoc_corpus()[:5000]
    assert len(sp.encode(text)) < len(text) / 2.5


def test_literal_special_pieces_are_text(sp):
    ids = sp.encode("<s>hi</s><pad><unk>")
    assert not set(ids) & {0, 1, 2, 3}


def test_add_bos_and_eos(sp):
    plain = sp.encode("Hello")
    assert sp.encode("Hello", add_bos=True, add_eos=True) == [1, *plain, 2]
    assert sp.encode("", add_bos=True) == [1]
    assert sp.decode([1, *plain, 2, 3, 3]) == "Hello"  # control pieces decode to nothing


def test_encode_batch(sp):
    texts = ["Hello", "", "a b"]
    assert sp.encode_batch(texts, add_eos=True) == [sp.encode(t, add_eos=True) for t in texts]
    assert sp.decode_batch(sp.encode_batch(texts)) == texts


# ---- exact round trip ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TRICKY + ["a\u2581b", "\u2581\u2581 \u2581x", "\u2581"])
def test_round_trip_examples(sp, text):
    assert sp.decode(sp.encode(text)) == text


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_round_trip_any_text(sp, text):
    assert sp.decode(sp.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_encodings_concatenate(sp, a, b):
    # no space is added in front of a text, so pieces encoded apart decode to the joined text
    assert sp.decode(sp.encode(a) + sp.encode(b)) == a + b


def test_space_mark_is_written_as_bytes(sp, reference):
    ids = sp.encode("a\u2581b")
    assert sp.pieces("a\u2581b") == ["a", "<0xE2>", "<0x96>", "<0x81>", "b"]
    assert reference.decode(reference.encode("a\u2581b")) == "a b"  # what the library alone does
    assert reference.decode(ids) == "a\u2581b"  # our ids mean the same to the library


# ---- training ----------------------------------------------------------------------------------------
def test_training_is_deterministic_and_input_forms_agree(tmp_path):
    text = pydoc_corpus()[:50000]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    from_text = SentencePieceTokenizer.train(text, 500).to_dict()
    assert SentencePieceTokenizer.train(text, 500).to_dict() == from_text
    assert SentencePieceTokenizer.train(path, 500).to_dict() == from_text
    assert SentencePieceTokenizer.train(iter(text.split("\n")), 500).to_dict() == from_text


def test_training_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    SentencePieceTokenizer.train("one line\nanother line\n" * 20, 280)
    assert os.listdir(tmp_path) == []


def test_unigram_model_type():
    tok = SentencePieceTokenizer.train(pydoc_corpus()[:50000], 500, model_type="unigram")
    text = "Unigram  pieces ﬁ 😀\n"
    assert tok.vocab_size == 500 and tok.decode(tok.encode(text)) == text


def test_empty_corpus():
    for empty in ("", "\n\n", [], iter(())):
        with pytest.raises(TokenizerError, match="empty corpus"):
            SentencePieceTokenizer.train(empty, 300)


def test_vocab_size_too_small_is_explained():
    with pytest.raises(TokenizerError) as err:
        SentencePieceTokenizer.train("abc abc\n", 100)
    message = str(err.value)
    assert "vocab_size=100 is too small" in message and "at least 264" in message  # 4 + 256 + "abc "
    assert "INTERNAL" not in message


def test_vocab_size_too_large_is_explained():
    with pytest.raises(TokenizerError) as err:
        SentencePieceTokenizer.train("abc abc\n", 8000)
    message = str(err.value)
    assert "vocab_size=8000" in message and "at most" in message and "Lower vocab_size" in message


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 4}, "larger than 4"), ({"vocab_size": "300"}, "must be an int"),
    ({"vocab_size": 300, "model_type": "wordpiece"}, "model_type='wordpiece'"),
])
def test_bad_training_arguments(kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        SentencePieceTokenizer.train("abc\n", **kwargs)


def test_bad_training_input(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        SentencePieceTokenizer.train(tmp_path / "missing.txt", 300)
    with pytest.raises(TokenizerError, match="must be a str"):
        SentencePieceTokenizer.train(["fine", 3], 300)
    with pytest.raises(TokenizerError, match="iterable of str"):
        SentencePieceTokenizer.train(42, 300)


def test_lines_longer_than_max_sentence_length():
    with pytest.raises(TokenizerError, match="max_sentence_length=100"):
        SentencePieceTokenizer.train("x" * 200, 300, max_sentence_length=100)


# ---- errors at use ---------------------------------------------------------------------------------
def test_decode_out_of_range(sp):
    with pytest.raises(TokenizerError, match="id 1000 is out of range"):
        sp.decode([5, 1000])
    with pytest.raises(TokenizerError, match="-1"):
        sp.decode([-1])


def test_encode_needs_a_str(sp):
    with pytest.raises(TokenizerError, match="bytes"):
        sp.encode(b"Hello")


# ---- persistence -----------------------------------------------------------------------------------
def test_model_file_round_trip(sp, tmp_path):
    path = tmp_path / "tokenizer.model"
    sp.save_model(path)
    library = spm.SentencePieceProcessor(model_file=str(path))
    loaded = SentencePieceTokenizer.from_file(path)
    text = "Model files work in the library too. ﬁ 😀"
    assert loaded.encode(text) == library.encode(text) == sp.encode(text)
    assert loaded.to_dict() == sp.to_dict()


def test_json_round_trip(sp, tmp_path):
    path = tmp_path / "tokenizer.json"
    sp.save(path)
    assert json.loads(path.read_text())["kind"] == "sentencepiece"
    for loaded in (load_tokenizer(path), SentencePieceTokenizer.load(path)):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.encode(TRICKY[3]) == sp.encode(TRICKY[3])


def test_to_dict_survives_a_weights_only_checkpoint(sp):
    data = sp.to_dict()
    assert set(data) == {"kind", "model"} and all(isinstance(v, str) for v in data.values())
    buffer = io.BytesIO()
    torch.save({"tokenizer": data}, buffer)
    buffer.seek(0)
    loaded = tokenizer_from_dict(torch.load(buffer, weights_only=True)["tokenizer"])
    assert loaded.encode("checkpoint") == sp.encode("checkpoint")


def test_model_with_sentencepiece_tokenizer_saves_and_generates(sp, tmp_path):
    config = lm.ModelConfig(vocab_size=sp.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
    model = lm.GPT(config, tokenizer=sp)
    lm.save_checkpoint(tmp_path / "m.pt", model)
    loaded = lm.load_model(tmp_path / "m.pt", device="cpu")
    assert isinstance(loaded.tokenizer, SentencePieceTokenizer)
    text = loaded.generate("The value", max_new_tokens=5, seed=0)
    assert isinstance(text, str)
    assert isinstance(loaded.generate("", max_new_tokens=3, seed=0), str)  # an empty prompt starts from <s>


def test_bad_model_data(tmp_path):
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        SentencePieceTokenizer(b"not a model")
    with pytest.raises(TokenizerError, match="does not exist"):
        SentencePieceTokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="base64"):
        SentencePieceTokenizer.from_dict({"kind": "sentencepiece", "model": "***"})
    with pytest.raises(TokenizerError, match="expected a 'sentencepiece' tokenizer"):
        SentencePieceTokenizer.from_dict({"kind": "char", "chars": []})


def test_a_piece_that_is_not_utf8_is_a_clear_error(sp):
    proto = base64.b64decode(sp.to_dict()["model"])
    # a byte piece's name, damaged: the library's own error message is then not UTF-8 either
    damaged = proto.replace(b"<0x3C>", b"<0\xa53C>", 1)
    assert damaged != proto
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        SentencePieceTokenizer(damaged)


def test_a_saved_model_over_the_size_limit_is_refused(sp, monkeypatch):
    monkeypatch.setattr("lm.tokenizers.sentencepiece.MAX_FILE_BYTES", 1_000)
    with pytest.raises(TokenizerError, match="length of the saved sentencepiece model is .*over lm's limit of 1,000"):
        tokenizer_from_dict(sp.to_dict())


@pytest.fixture(scope="module")
def small_model() -> bytes:
    return SentencePieceTokenizer.train(pydoc_corpus()[:20_000], vocab_size=400)._proto


edits = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["set", "cut", "insert"]),
                           st.binary(min_size=1, max_size=8)), min_size=1, max_size=5)


@settings(max_examples=150, deadline=5_000)
@given(edits=edits)
def test_damaged_model_bytes_load_or_fail_clearly(small_model, edits):
    """Random edits of a model's bytes give a `TokenizerError` or a tokenizer that works."""
    data = bytearray(small_model)
    for where, how, new in edits:
        at = int(where * (len(data) - 1))
        if how == "set":
            data[at : at + len(new)] = new
        elif how == "cut":
            del data[at : at + len(new)]
        else:
            data[at:at] = new
    try:
        tok = SentencePieceTokenizer(bytes(data))
    except TokenizerError:
        return
    assert isinstance(tok.decode(tok.encode("Hello, naïve world 😀")), str)


def test_a_model_trained_with_library_defaults_loads(tmp_path):
    """Any .model file works; its own settings (NFKC, a leading space) then apply."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(pydoc_corpus()[:50000].split("\n")), model_writer=model,
                                   vocab_size=400, minloglevel=2, num_threads=1)
    library = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = SentencePieceTokenizer(model.getvalue())
    for text in ("ﬁne  spaces", "a\u2581b", "Hello"):
        assert tok.encode(text) == library.encode(text)
        assert tok.decode(tok.encode(text)) == library.decode(library.encode(text))
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}  # the library's defaults: no <pad>
    assert tok.pad_id is None
