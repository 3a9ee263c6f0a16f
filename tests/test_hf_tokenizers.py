"""lm tokenizers as Hugging Face files and back (`lm.tokenizers.hf`), checked offline against the
`tokenizers` library and transformers themselves: the same ids for the same text, both ways."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

import lm
from lm import TokenizerError
from lm.corpora import pydoc_corpus
from lm.data import DataError
from lm.tokenizers import (GPT4_PATTERN, ByteBPETokenizer, CharTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                           gpt2_ranks_path, load_hf_tokenizer, save_hf_tokenizer)
from lm.tokenizers import hf as lmhf
from lm.tokenizers.bpe import BYTES

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TRICKY = [
    "Hello, world!", "", " ", "  ", "\n", "\n\n", "\n\n\n  \n", "a\r\nb", "   leading spaces", "trailing spaces   ",
    "tabs\tand\ttabs", "it's I'm we'll they've you're he'd 'S 'LL O'Neil", "1234567890 3.14159 1,000,000 ١٢٣ ½",
    "日本語のテキスト", "Ελληνικά русский العربية עברית हिन्दी", "emoji 😀👍🏽👨‍👩‍👧 🇫🇷",
    "e\u0301 vs \u00e9, ﬁne Ｆｕｌｌ ①",
    "\x00\x01\x7f\u200b\ufeff", "x = [a**2 for a in range(10)]  # code", "\u00a0\u3000\u2028 unicode spaces",
    "    def f():\n        return 1\n", "!!!???...---", "the the the thethe",
]
SPECIAL_TEXTS = ["<|endoftext|>", "one<|endoftext|>two", "<|endoftext|><|endoftext|>", "<|endoftext",
                 "a <|endoftext|> b"]
PIECES = ["<|endoftext|>", "'s", "'LL", " ", "  ", "\n", "\n\n", "\r\n", "\t", "123", "1234567", "😀", "é",
          "e\u0301", "日本", " the", "!!", "\u00a0", "ab", "x"]
# Any text (lone surrogates are not text lm accepts), and texts put together from tricky pieces.
TEXTS = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(st.characters(exclude_categories=("Cs",)), max_size=3)),
             max_size=16).map("".join),
)


@pytest.fixture(scope="module")
def corpus() -> str:
    return pydoc_corpus()


def hf_files(tokenizer, folder, **kwargs):
    """(tokenizers.Tokenizer, transformers tokenizer) for `tokenizer` saved in `folder`."""
    save_hf_tokenizer(tokenizer, folder, **kwargs)
    return (tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
            transformers.AutoTokenizer.from_pretrained(str(folder)))


# ---- GPT-2's byte characters -------------------------------------------------------------------------
def test_byte_table_is_gpt2s():
    table = lmhf.BYTE_TO_CHAR
    assert len(set(table)) == 256 and all(c.isprintable() and not c.isspace() for c in table)
    assert (table[ord(" ")], table[ord("\n")], table[0], table[ord("a")], table[0xAD]) == ("Ġ", "Ċ", "Ā", "a", "Ń")
    assert lmhf.bytes_to_hf(b" the") == "Ġthe" and lmhf.hf_to_bytes("Ġthe") == b" the"
    assert lmhf.hf_to_bytes(lmhf.bytes_to_hf(bytes(range(256)))) == bytes(range(256))
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert bytes_to_unicode() == dict(enumerate(table))


# ---- byte-level BPE -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["gpt2", "gpt4", None], ids=["gpt2", "gpt4", "no-pattern"])
def bpe(request, corpus) -> ByteBPETokenizer:
    text = corpus[:60_000]
    if request.param is None:  # one sequence per line: training without a pattern is slow on one long text
        text = text.split("\n")
    return ByteBPETokenizer.train(text, 600, special_tokens=("<|endoftext|>", "<|pad|>"), pattern=request.param)


@pytest.fixture(scope="module")
def bpe_folder(bpe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    save_hf_tokenizer(bpe, folder, model_max_length=256)
    return folder


@pytest.fixture(scope="module")
def bpe_hf(bpe_folder):
    return tokenizers.Tokenizer.from_file(str(bpe_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def bpe_auto(bpe_folder):
    return transformers.AutoTokenizer.from_pretrained(str(bpe_folder))


def test_bpe_files(bpe, bpe_folder):
    assert sorted(p.name for p in bpe_folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((bpe_folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["add_bos_token"], config["model_max_length"]) == ("<|endoftext|>", False, 256)
    data = json.loads((bpe_folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(data["model"]["merges"]) == len(bpe.merges) == bpe.vocab_size - 256 - 2
    assert [t["content"] for t in data["added_tokens"]] == ["<|endoftext|>", "<|pad|>"]


def test_bpe_ids_match_on_tricky_text(bpe, bpe_hf):
    for text in TRICKY + SPECIAL_TEXTS + ["<|pad|><|endoftext|>x<|pad|"]:
        ids = bpe.encode(text)
        assert bpe_hf.encode(text).ids == ids, text
        assert bpe_hf.decode(ids, skip_special_tokens=False) == bpe.decode(ids)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_bpe_ids_match_on_any_text(bpe, bpe_hf, text):
    assert bpe_hf.encode(text).ids == bpe.encode(text)


def test_bpe_ids_match_on_a_long_text(bpe, bpe_hf, corpus):
    text = corpus[100_000:130_000]  # text the merges were not learned from
    assert bpe_hf.encode(text).ids == bpe.encode(text)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 599), max_size=8))
def test_bpe_decode_matches_on_any_ids(bpe, bpe_hf, ids):
    """Ids that cut a character in two decode to U+FFFD in both (the same number of them)."""
    assert bpe_hf.decode(ids, skip_special_tokens=False) == bpe.decode(ids)


def test_auto_tokenizer_matches(bpe, bpe_auto):
    assert isinstance(bpe_auto, transformers.PreTrainedTokenizerFast)
    assert bpe_auto.model_max_length == 256
    assert bpe_auto.eos_token_id == bpe.eos_id == bpe.special_tokens["<|endoftext|>"]
    assert len(bpe_auto) == bpe.vocab_size
    for text in TRICKY + SPECIAL_TEXTS:
        ids = bpe.encode(text)
        assert bpe_auto(text)["input_ids"] == ids, text  # nothing added around them
        assert bpe_auto.decode(ids) == bpe.decode(ids)


def test_bpe_round_trip(bpe, bpe_folder, bpe_auto):
    for source in (bpe_folder, str(bpe_folder / "tokenizer.json"), bpe_auto):
        back = load_hf_tokenizer(source)
        assert isinstance(back, ByteBPETokenizer)
        assert back.to_dict() == bpe.to_dict()  # the same vocabulary, merges, specials and pattern
        assert back.vocab == bpe.vocab
        for text in TRICKY + SPECIAL_TEXTS:
            assert back.encode(text) == bpe.encode(text)


def test_gpt4_digits_are_cut_in_threes_by_both_engines(tmp_path, corpus):
    """Oniguruma reads GPT-4's possessive \\p{N}{1,3}+ as "any number of digits", so the file holds
    the plain repeat, which cuts numbers in threes in both engines."""
    tok = ByteBPETokenizer.train(corpus[:20_000], 300, pattern="gpt4")
    hf, _ = hf_files(tok, tmp_path)
    assert [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("1234567")] == ["123", "456", "7"]
    assert tok.pretokenize("1234567") == ["123", "456", "7"]
    assert load_hf_tokenizer(tmp_path).pattern == GPT4_PATTERN


def test_overlapping_special_tokens_longest_wins(tmp_path, corpus):
    tok = ByteBPETokenizer.train(corpus[:20_000], 300, special_tokens=("<|x|>", "<|x|>y", "<|y|>"))
    hf, auto = hf_files(tok, tmp_path)
    for text in ["<|x|>yz", "<|x|><|y|>", "a<|x|>y<|x|>", "<|x|", "<|x|>y<|y|>y"]:
        assert hf.encode(text).ids == auto(text)["input_ids"] == tok.encode(text), text


def test_special_ids_after_a_gap(tmp_path):
    tok = ByteBPETokenizer(BYTES + [b"ab"], {"<|endoftext|>": 300}, pattern="gpt2")  # ids 257..299 unused
    hf, auto = hf_files(tok, tmp_path)
    text = "abc<|endoftext|>ab"
    assert hf.encode(text).ids == auto(text)["input_ids"] == tok.encode(text) == [256, 99, 300, 256]
    assert load_hf_tokenizer(tmp_path).to_dict() == tok.to_dict()


def test_custom_pattern_round_trip_needs_trust(tmp_path, corpus):
    pattern = r"\w+|\s+|[^\w\s]+"
    tok = ByteBPETokenizer.train(corpus[:20_000], 300, pattern=pattern)
    hf, _ = hf_files(tok, tmp_path)
    for text in TRICKY:
        assert hf.encode(text).ids == tok.encode(text), text
    with pytest.raises(TokenizerError, match="trust_pattern=True"):
        load_hf_tokenizer(tmp_path)
    assert load_hf_tokenizer(tmp_path, trust_pattern=True).to_dict() == tok.to_dict()


def test_possessive_repeat_is_refused(tmp_path, corpus):
    tok = ByteBPETokenizer.train(corpus[:5_000], 260, pattern=r"\d{1,3}+|\D+")
    with pytest.raises(TokenizerError, match=r"atomic group \(\?>"):
        save_hf_tokenizer(tok, tmp_path)


def test_special_token_spelled_like_an_ordinary_token_is_refused(tmp_path):
    tok = ByteBPETokenizer(BYTES + [b"ab"], {"ab": 257}, pattern="gpt2")
    with pytest.raises(TokenizerError, match="'ab' is spelled like ordinary token 256"):
        save_hf_tokenizer(tok, tmp_path)


# ---- GPT-2's real vocabulary --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2() -> TiktokenTokenizer:
    try:
        gpt2_ranks_path(download=False)
    except DataError as err:
        pytest.skip(f"GPT-2's ranks are not cached: {err}")
    return TiktokenTokenizer("gpt2")


@pytest.fixture(scope="module")
def gpt2_folder(gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    save_hf_tokenizer(gpt2, folder, model_max_length=1024)
    return folder


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_folder):
    return tokenizers.Tokenizer.from_file(str(gpt2_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def varied_text(corpus) -> str:
    """A few KB of Shakespeare (when cached), Python's docs, and other scripts."""
    try:
        shakespeare = lm.load_corpus("shakespeare")[200_000:206_000]
    except DataError:
        shakespeare = ""
    return "\n".join([shakespeare, corpus[:4_000], *TRICKY, *SPECIAL_TEXTS])


def test_gpt2_files_have_gpt2s_merges(gpt2_folder):
    data = json.loads((gpt2_folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    assert len(merges) == 50_000 and merges[:4] == ["Ġ t", "Ġ a", "h e", "i n"]  # as in GPT-2's merges.txt
    assert data["model"]["vocab"]["Ġthe"] == 262 and data["model"]["vocab"]["<|endoftext|>"] == 50256


def test_gpt2_through_transformers_gives_tiktokens_ids(gpt2, gpt2_folder, gpt2_hf, varied_text):
    ids = gpt2.encode(varied_text)
    assert len(ids) > 2_000
    auto = transformers.AutoTokenizer.from_pretrained(str(gpt2_folder))
    assert gpt2_hf.encode(varied_text).ids == ids
    assert auto(varied_text)["input_ids"] == ids
    assert auto.decode(ids) == gpt2.decode(ids) == varied_text
    assert auto.model_max_length == 1024 and auto.eos_token_id == 50256


def test_gpt2_tokenizer_class_loads_the_folder(gpt2, gpt2_folder, varied_text):
    """transformers' own GPT-2 class rebuilds its pipeline from the vocabulary and merges alone (no
    ignore_merges); with GPT-2's regex and merges that still gives tiktoken's ids."""
    gpt2_class = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    tok = gpt2_class.from_pretrained(str(gpt2_folder))
    assert tok(varied_text)["input_ids"] == gpt2.encode(varied_text)
    assert load_hf_tokenizer(tok).encode(varied_text) == gpt2.encode(varied_text)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_gpt2_ids_match_on_any_text(gpt2, gpt2_hf, text):
    assert gpt2_hf.encode(text).ids == gpt2.encode(text)


def test_gpt2_round_trip(gpt2, gpt2_folder, varied_text):
    back = load_hf_tokenizer(gpt2_folder)
    reference = ByteBPETokenizer.gpt2()
    assert isinstance(back, ByteBPETokenizer) and back.vocab == reference.vocab
    assert back.special_tokens == gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert back.encode(varied_text) == gpt2.encode(varied_text)


# ---- characters ---------------------------------------------------------------------------------------
CHAR_TRAINING = "hello world, <BOS>!\né"
CHAR_TEXTS = ["hello world", "<BOS>hello<SEP>world<EOS><PAD>", "e\u0301", "<UNK>", "", "<BOS", "<<BOS>>", "\n\n"]
UNSEEN_TEXTS = ["xyz hello", "hello 😀", "<BOS>\u0338", "ĥello"]  # "<BOS>" + U+0338: NFC makes "<BOS≯"


@pytest.fixture(scope="module", params=["error", "replace", "skip"])
def char(request) -> CharTokenizer:
    return CharTokenizer.train(CHAR_TRAINING, unknown=request.param)


@pytest.fixture(scope="module")
def char_folder(char, tmp_path_factory):
    folder = tmp_path_factory.mktemp("char")
    save_hf_tokenizer(char, folder)
    return folder


@pytest.fixture(scope="module")
def char_hf(char_folder):
    return tokenizers.Tokenizer.from_file(str(char_folder / "tokenizer.json"))


def test_char_ids_match(char, char_folder, char_hf):
    hf = char_hf
    auto = transformers.AutoTokenizer.from_pretrained(str(char_folder))
    for text in CHAR_TEXTS:
        ids = char.encode(text)
        assert hf.encode(text).ids == auto(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == auto.decode(ids) == char.decode(ids)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (1, 2, 0, 4)


def test_char_unknown_characters(char, char_hf):
    """"replace" and "skip" behave the same in transformers; "error" cannot raise there, so it
    gives <UNK> as "replace" does."""
    hf = char_hf
    replacing = CharTokenizer.train(CHAR_TRAINING, unknown="replace" if char.unknown == "error" else char.unknown)
    for text in UNSEEN_TEXTS:
        assert hf.encode(text).ids == replacing.encode(text), text
        if char.unknown == "error":
            with pytest.raises(TokenizerError, match="not in the vocabulary"):
                char.encode(text)


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from([*CHAR_TRAINING, "<BOS>", "<EOS>", "<SEP>", "e\u0301", "\u0338", "x", "😀"]),
                     max_size=20).map("".join))
def test_char_ids_match_on_any_text(char, char_hf, text):
    if char.unknown == "error":  # the file gives <UNK>
        char = CharTokenizer.train(CHAR_TRAINING, unknown="replace")
    assert char_hf.encode(text).ids == char.encode(text)


def test_char_round_trip(char, char_folder):
    for source in (char_folder, transformers.AutoTokenizer.from_pretrained(str(char_folder))):
        back = load_hf_tokenizer(source)
        assert isinstance(back, CharTokenizer) and back.to_dict() == char.to_dict()  # the policy too


def test_char_policy_follows_the_file_without_lms_config(char, char_folder, tmp_path):
    shutil.copy(char_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    assert load_hf_tokenizer(tmp_path).unknown == ("skip" if char.unknown == "skip" else "replace")


# ---- sentencepiece ------------------------------------------------------------------------------------
SP_TEXTS = TRICKY + ["<s> </s> <unk> <pad> <0x41>", "x<s>y", "a\n\n  b  "]


@pytest.fixture(scope="module", params=[("bpe", True), ("bpe", False), ("unigram", True)],
                ids=["bpe", "bpe-no-byte-fallback", "unigram"])
def sp(request, corpus) -> SentencePieceTokenizer:
    model_type, byte_fallback = request.param
    return SentencePieceTokenizer.train(corpus[:200_000], vocab_size=800 if byte_fallback else 500,
                                        model_type=model_type, byte_fallback=byte_fallback)


@pytest.fixture(scope="module")
def sp_folder(sp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    save_hf_tokenizer(sp, folder)
    return folder


@pytest.fixture(scope="module")
def sp_hf(sp_folder):
    return tokenizers.Tokenizer.from_file(str(sp_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp_reference(sp) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=lmhf.sentencepiece_proto(sp))


def test_sp_files(sp, sp_folder):
    assert sorted(p.name for p in sp_folder.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (sp_folder / "tokenizer.model").read_bytes() == lmhf.sentencepiece_proto(sp)
    config = json.loads((sp_folder / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["split_special_tokens"]) == (False, False, True)
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == \
        ("<s>", "</s>", "<unk>", "<pad>")


def test_sp_ids_match(sp, sp_folder, sp_hf, corpus):
    hf = sp_hf
    auto = transformers.AutoTokenizer.from_pretrained(str(sp_folder))
    assert len(auto) == sp.vocab_size and (auto.bos_token_id, auto.eos_token_id) == (1, 2)
    texts = SP_TEXTS + [corpus[250_000:252_000], "Now is the winter of our discontent\nMade glorious summer."]
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text).ids == ids, text
        assert auto(text)["input_ids"] == ids, text  # no <s> added: the config says add_bos_token=False
        if sp.unk_id not in ids:  # sentencepiece decodes <unk> as " ⁇ ", the file as "<unk>"
            assert hf.decode(ids) == auto.decode(ids) == sp.decode(ids)


def score(tokenizer: SentencePieceTokenizer, ids: list[int]) -> float:
    pieces = lmhf.read_sentencepiece_model(lmhf.sentencepiece_proto(tokenizer)).pieces
    return sum(pieces[i][1] for i in ids)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS.map(lambda t: t.replace("\u2581", " ")))  # lm's own way with "▁": see the next test
def test_sp_ids_match_on_any_text(sp, sp_hf, text):
    ids, theirs = sp.encode(text), sp_hf.encode(text).ids
    if lmhf.read_sentencepiece_model(lmhf.sentencepiece_proto(sp)).model_type == lmhf.BPE:
        assert theirs == ids
    else:  # the same ids, or another cut of the same score (see test_sp_unigram_ties)
        assert theirs == ids or score(sp, theirs) == pytest.approx(score(sp, ids), abs=1e-3)


def test_sp_space_mark_in_text_follows_sentencepiece(sp, sp_hf, sp_reference):
    """lm writes a "▁" of the text as its bytes (to decode it back); the file, like sentencepiece
    itself, reads it as a space."""
    text = "a▁b ▁"
    assert sp_hf.encode(text).ids == sp_reference.encode(text)
    if sp_reference.piece_to_id("<0xE2>") != sp.unk_id:  # with byte fallback
        assert sp.encode(text) != sp_reference.encode(text) and sp.decode(sp.encode(text)) == text


def test_sp_unigram_ties(corpus, tmp_path):
    """A text with two cuts of exactly the same score, such as a run of one character ("*****" as
    "**" "**" "*" or "*" "**" "**"): sentencepiece adds scores in 32-bit floats, the tokenizers
    library in 64-bit, so such ties may go either way. Both cuts are best, and decode alike."""
    tok = SentencePieceTokenizer.train(corpus[:200_000], vocab_size=800, model_type="unigram")
    hf, _ = hf_files(tok, tmp_path)
    for run in ["*" * n for n in range(1, 30)] + ["=" * n for n in range(1, 30)] + ["-" * n for n in range(1, 30)]:
        ids, theirs = tok.encode(run), hf.encode(run).ids
        assert score(tok, theirs) == pytest.approx(score(tok, ids), abs=1e-3)
        assert hf.decode(theirs) == tok.decode(ids) == run


def test_sp_round_trip(sp, sp_folder):
    auto = transformers.AutoTokenizer.from_pretrained(str(sp_folder))
    for source in (sp_folder, sp_folder / "tokenizer.model", auto):
        back = load_hf_tokenizer(source)
        assert isinstance(back, SentencePieceTokenizer) and back.to_dict() == sp.to_dict()


def test_sp_protobuf_reader_matches_protobuf(sp):
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(lmhf.sentencepiece_proto(sp))
    ours = lmhf.read_sentencepiece_model(lmhf.sentencepiece_proto(sp))
    assert ours.pieces == [(p.piece, pytest.approx(p.score), p.type) for p in proto.pieces]
    assert (ours.model_type, ours.byte_fallback) == (proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback)
    spec = proto.normalizer_spec
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces, ours.escape_whitespaces,
            ours.precompiled_charsmap) == (spec.add_dummy_prefix, spec.remove_extra_whitespaces,
                                           spec.escape_whitespaces, spec.precompiled_charsmap)


def sentencepiece_model(corpus, **settings) -> SentencePieceTokenizer:
    """A model trained with sentencepiece's own defaults, changed by `settings`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[:200_000].split("\n")), model_writer=model,
                                   vocab_size=800, byte_fallback=True, minloglevel=2, num_threads=1, **settings)
    return SentencePieceTokenizer(model.getvalue())


@pytest.mark.parametrize("settings", [
    {"model_type": "bpe"},  # a dummy prefix, extra whitespace removed
    {"model_type": "bpe", "remove_extra_whitespaces": False},
    {"model_type": "bpe", "user_defined_symbols": ["<sep>", "a.b"]},
    {"model_type": "unigram", "user_defined_symbols": ["<sep>", "a.b"]},
], ids=["dummy-prefix", "keep-whitespace", "user-defined", "unigram-user-defined"])
def test_sp_settings_of_other_models(corpus, tmp_path, settings):
    """Models trained elsewhere (identity normalization, as Llama's) with sentencepiece's other
    whitespace settings and user-defined pieces, against sentencepiece itself."""
    tok = sentencepiece_model(corpus, normalization_rule_name="identity", **settings)
    hf, auto = hf_files(tok, tmp_path)
    reference = spm.SentencePieceProcessor(model_proto=lmhf.sentencepiece_proto(tok))
    for text in SP_TEXTS + ["  a.b<sep>  x  ", "<sep><sep>", "a a.b.b", "x\n  y  \n"]:
        ids = reference.encode(text)
        assert hf.encode(text).ids == auto(text)["input_ids"] == ids, text
        assert hf.decode(ids) == reference.decode(ids), text


def test_sp_normalization_table_is_refused(corpus, tmp_path):
    tok = sentencepiece_model(corpus, model_type="bpe")  # nmt_nfkc
    with pytest.raises(TokenizerError, match="normalization_rule_name='identity'"):
        save_hf_tokenizer(tok, tmp_path)


# ---- what lm does not read ----------------------------------------------------------------------------
def write_json(folder, data) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def small_bpe(corpus) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(corpus[:5_000], 280)


def edited(tokenizer, change) -> dict:
    data = lmhf.byte_level_json(tokenizer)
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer \\(NFKC\\)"),
    (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer .*Whitespace"),
    (lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+|\W+"}, "behavior": "Isolated", "invert": False},
        {**lmhf.BYTE_LEVEL, "use_regex": False}]}), "trust_pattern=True"),
    (lambda d: d.update(decoder={"type": "WordPiece"}), "decodes with \\['WordPiece'\\]"),
    (lambda d: d["model"]["merges"].reverse(), "in the order of the ids"),
    (lambda d: d["model"]["merges"].pop(3), "no merge makes token 259"),
    (lambda d: d["model"]["vocab"].pop("a"), "do not have the ids 0..*: 97 is missing"),
    (lambda d: d["model"]["vocab"].update({"日": d["model"]["vocab"].pop("a")}), "not one of GPT-2's 256 byte"),
    (lambda d: d["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
], ids=["normalizer", "prefix-space", "whitespace", "untrusted-regex", "decoder", "merge-order", "missing-merge",
        "id-gap", "not-bytes", "lstrip", "byte-fallback"])
def test_byte_level_json_that_lm_cannot_reproduce(small_bpe, tmp_path, change, message):
    write_json(tmp_path, edited(small_bpe, change))
    with pytest.raises(TokenizerError, match=message):
        load_hf_tokenizer(tmp_path)


def test_other_models_are_refused(sp_folder, tmp_path):
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="WordPiece .*lm reads byte-level BPE"):
        load_hf_tokenizer(tmp_path)
    shutil.copy(sp_folder / "tokenizer.json", tmp_path / "tokenizer.json")  # without its tokenizer.model
    with pytest.raises(TokenizerError, match="without its tokenizer.model|not byte-level"):
        load_hf_tokenizer(tmp_path)
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    unigram.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="Unigram model without its tokenizer.model"):
        load_hf_tokenizer(tmp_path)


def test_nothing_is_downloaded(tmp_path):
    with pytest.raises(TokenizerError, match="lm never downloads"):
        load_hf_tokenizer("openai-community/gpt2")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="transformers tokenizer, got int"):
        load_hf_tokenizer(3)


def test_sizes_are_bounded(small_bpe, tmp_path, monkeypatch):
    with open(tmp_path / "tokenizer.json", "wb") as f:  # sparse: takes no disk
        f.truncate(64 * 2**20 + 1)
    with pytest.raises(TokenizerError, match="over lm's limit"):
        load_hf_tokenizer(tmp_path)
    write_json(tmp_path, lmhf.byte_level_json(small_bpe))
    monkeypatch.setattr(lmhf, "MAX_VOCAB_SIZE", 100)
    with pytest.raises(TokenizerError, match="vocabulary of the tokenizer.json is 281, over lm's limit of 100"):
        load_hf_tokenizer(tmp_path)


def test_save_refusals(small_bpe, tmp_path):
    with pytest.raises(TokenizerError, match="cannot write a str"):
        save_hf_tokenizer("not a tokenizer", tmp_path)
    with pytest.raises(TokenizerError, match="model_max_length=0 must be a positive int"):
        save_hf_tokenizer(small_bpe, tmp_path, model_max_length=0)
    unreachable = ByteBPETokenizer(BYTES + [b"ab", b"abcd"], {}, pattern=None)  # "abcd": no two tokens make it
    with pytest.raises(TokenizerError, match="not the join of two earlier tokens"):
        save_hf_tokenizer(unreachable, tmp_path)
