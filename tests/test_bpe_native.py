"""The byte-pair merging in C (lm/csrc/bpe.c through `bpe_core.NativeMerger`): the same tokens as
the Python `bpe` on every input, tiktoken's ids through the tokenizer, and the Python path wherever
the C one cannot run (no compiler, LM_CPU_KERNELS=0, long pre-tokens, ids it cannot hold)."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import threading
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import lm
from lm import native
from lm.tokenizers import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, GPT4_PATTERN
from lm.tokenizers import bpe_core
from lm.tokenizers.bpe import ByteBPETokenizer

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def merger(ranks) -> bpe_core.NativeMerger:
    made = bpe_core.native_merger(ranks)
    if made is None:
        pytest.skip(f"the C merging cannot run here: {bpe_core.native_merging()[1]}")
    return made


@pytest.fixture(scope="module")
def reference(ranks) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=GPT2_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def gpt4_reference(ranks) -> tiktoken.Encoding:
    """tiktoken with GPT-2's ranks and GPT-4's pattern: the pattern is what these tests are about."""
    return tiktoken.Encoding(name="gpt2-ranks-gpt4-pattern", pat_str=GPT4_PATTERN, mergeable_ranks=ranks,
                             special_tokens=GPT2_SPECIAL_TOKENS)


@pytest.fixture
def rebuilt(monkeypatch, tmp_path):
    """An empty kernel folder, and the C merging not loaded yet in this process (restored afterwards)."""
    monkeypatch.setenv("LM_KERNEL_DIR", str(tmp_path / "kernels"))
    bpe_core.native_merging.cache_clear()
    yield
    bpe_core.native_merging.cache_clear()


def python_ids(data: bytes, ranks) -> tuple[int, ...] | None:
    """What the tokenizer gave before the C merging: the whole word, else `bpe` (or `bpe_heap`)."""
    if data in ranks:
        return (ranks[data],)
    merge = bpe_core.bpe if len(data) <= bpe_core.LONG_PRETOKEN else bpe_core.bpe_heap
    return tuple(ranks[t] for t in merge(data, ranks))


@needs_compiler
def test_the_c_merging_builds_and_runs_where_there_is_a_compiler():
    assert bpe_core.native_merging()[1] is None


def test_every_shakespeare_pretoken_merges_as_in_python(merger, ranks):
    pieces = set(regex.findall(GPT2_PATTERN, lm.load_corpus("shakespeare")))
    assert len(pieces) > 30_000
    for piece in pieces:
        data = piece.encode("utf-8")
        assert merger(data) == python_ids(data, ranks), piece


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=bpe_core.NATIVE_MAX)
       | st.text(alphabet="aab e\u00e9\U0001F600'1\n", min_size=1, max_size=400).map(str.encode))
def test_any_bytes_merge_as_in_python(merger, ranks, data):
    assert merger(data) == python_ids(data, ranks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=2, max_size=4), max_size=40, unique=True), st.binary(min_size=1, max_size=60))
def test_a_small_vocabulary_with_ties_and_gaps(tokens, data):
    """Ranks that are not GPT-2's: a random vocabulary over the bytes, ids in an arbitrary order (so
    a long token may rank before its parts, and many pairs never merge)."""
    ranks = {bytes([b]): 1000 + b for b in range(256)}
    for i, token in enumerate(t for t in tokens if len(t) > 1):
        ranks.setdefault(token, i)
    made = bpe_core.native_merger(ranks)
    if made is None:
        pytest.skip("the C merging cannot run here")
    assert made(data) == python_ids(data, ranks)


def test_what_the_c_merging_leaves_to_python(merger, ranks):
    assert merger(b"a" * (bpe_core.NATIVE_MAX + 1)) is None  # too long: bpe_heap takes it
    assert merger(b"") == ()
    no_z = {bytes([b]): b for b in range(256) if b != ord("z")}
    partial = bpe_core.native_merger(no_z)
    assert partial(b"az") is None and partial(b"ab") == (97, 98)  # a byte without a token: bpe raises
    assert bpe_core.native_merger({b"a": 2**31}) is None  # an id past int32
    assert bpe_core.native_merger({"a": 1}) is None  # not bytes


def test_the_tokenizer_encodes_as_tiktoken_through_it(ranks, reference):
    tok = ByteBPETokenizer.gpt2()
    text = lm.load_corpus("shakespeare")[:400_000] + " naïve café 日本語 " + "x" * 3000 + " 😀😀"
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)
    assert isinstance(tok._cache._merger, bpe_core.NativeMerger) or bpe_core.native_merging()[1] is not None


@pytest.mark.parametrize("how", ["switched off", "no compiler"])
def test_without_the_c_merging_the_ids_are_the_same(rebuilt, monkeypatch, ranks, reference, how):
    if how == "switched off":
        monkeypatch.setenv("LM_CPU_KERNELS", "0")
    else:
        monkeypatch.setenv("CC", "/nonexistent/cc")
    why = bpe_core.native_merging()[1]
    assert why == "LM_CPU_KERNELS=0 is set" if how == "switched off" else "no C compiler" in why
    tok = ByteBPETokenizer.gpt2()
    text = lm.load_corpus("shakespeare")[:100_000]
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)
    assert tok._cache._merger is None


@needs_compiler
def test_a_failing_compile_leaves_the_python_path(rebuilt, monkeypatch, tmp_path):
    script = tmp_path / "badcc"
    script.write_text('#!/bin/sh\ncase "$1" in --version) echo badcc 1.0; exit 0;; esac\n'
                      'echo "badcc: error: no" >&2; exit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    why = bpe_core.native_merging()[1]
    assert why.startswith("compiling bpe.c failed") and "badcc: error" in why
    assert list((tmp_path / "kernels").iterdir()) == []


def test_a_tokenizer_with_its_table_pickles_and_copies(merger, reference):
    tok = ByteBPETokenizer.gpt2()
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    for other in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert len(other._cache) == 0  # the cache (and its C table) is remade on demand
        assert other.encode("The quick brown fox jumps over the lazy dog") == ids
        assert other.encode("pickled once more") == reference.encode_ordinary("pickled once more")


def test_the_table_is_freed_with_its_merger(ranks, merger):
    made = bpe_core.native_merger({bytes([b]): b for b in range(256)} | {b"ab": 300})
    finalizer = made._finalizer
    assert finalizer.alive and made(b"abc") == (300, 99)
    del made
    gc.collect()
    assert not finalizer.alive


def test_threads_encoding_at_once_get_their_own_ids(merger, ranks):
    """The C call lets go of the GIL; each call writes into its own buffer."""
    words = [w.encode() for w in regex.findall(GPT2_PATTERN, lm.load_corpus("shakespeare")[:200_000])]
    expected = [python_ids(w, ranks) for w in words]
    results: dict[int, list] = {}

    def work(k: int) -> None:
        results[k] = [merger(w) for w in (words if k % 2 else words[::-1])]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, got in results.items():
        assert got == (expected if k % 2 else expected[::-1])


def test_a_worker_merges_in_c_without_importing_lm(merger):
    """Workers load bpe_core by its path: the C merging loads lm/native.py by its path too."""
    script = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('w', sys.argv[1]); "
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
              "ranks = {bytes([b]): b for b in range(256)} | {b'ab': 256}; "
              "print(m.native_merging()[1], m.native_merger(ranks)(b'abab'), "
              "sorted(n for n in sys.modules if n == 'torch' or n == 'lm' or n.startswith('lm.')))")
    out = subprocess.run([sys.executable, "-c", script, bpe_core.__file__], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "None (256, 256) []"


def test_encode_batch_over_processes_gives_the_same_ids(merger, reference):
    tok = ByteBPETokenizer.gpt2()
    texts = lm.load_corpus("shakespeare")[:300_000].split("\n\n")
    got = tok.encode_batch(texts, allowed_special="none", processes=2)
    assert got == [reference.encode_ordinary(t) for t in texts]


# ---- whole ASCII texts in C (bpe_core.TextEncoder over lm_bpe_text) -----------------------------------------
ASCII_RUNS = "aZz09 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'sdmtlvreSDLLVE.,!?-_()\"$\x00\x7f"


def ascii_text(rng, n: int) -> str:
    """Runs of characters from ASCII_RUNS (long words, numbers, whitespace runs, contractions and near misses)."""
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(ASCII_RUNS) * rng.choice([1, 1, 1, 2, 3, 7]))
    return "".join(out)[:n]


def piece_by_piece(text: str, ranks, pattern: str = GPT2_PATTERN) -> list[int]:
    """The ids the plain way: `regex`'s pre-tokens, each merged by the Python `bpe`."""
    cache = bpe_core.TokenCache(ranks, 10**9)
    cache._merger = None  # no C at all
    return [i for piece in regex.findall(pattern, text) for i in cache[piece]]


def test_whole_ascii_texts_take_the_c_encoder(merger, reference):
    tok = ByteBPETokenizer.gpt2()
    assert tok.encode("hello") == reference.encode("hello") and tok._cache._text is False  # short: Python's
    text = lm.load_corpus("shakespeare")[:300_000]
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)
    assert isinstance(tok._cache._text, bpe_core.TextEncoder)
    assert list(tok._cache) == ["hello"]  # no pre-token of the long text went through Python's cache


def test_random_ascii_texts_encode_as_regex_and_bpe_and_as_tiktoken(merger, ranks, reference):
    import random

    rng = random.Random(0)
    tok = ByteBPETokenizer.gpt2()
    for n in [0, 1, 2, 3, 5, 10, 30, 200, 5_000]:
        for _ in range(40 if n < 1_000 else 3):
            text = ascii_text(rng, n)
            want = piece_by_piece(text, ranks)
            assert want == reference.encode_ordinary(text), text
            assert tok.encode(text, allowed_special="none") == want, text
    every = "".join(chr(c) for c in range(128)) * 3
    assert tok.encode(every, allowed_special="none") == reference.encode_ordinary(every)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ASCII_RUNS, max_size=80) | st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_any_ascii_text_encodes_as_tiktoken(merger, reference, text):
    tok = ByteBPETokenizer.gpt2()
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)
    cache = tok._token_cache()
    ids = []
    assert cache.text_encoder()(text, cache, ids)  # the C encoder itself, also below TEXT_MIN characters
    assert ids == reference.encode_ordinary(text)


def test_gpt4_s_pattern_takes_the_c_encoder_too(merger, ranks, gpt4_reference):
    import random

    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, GPT4_PATTERN)
    text = lm.load_corpus("shakespeare")[:300_000]
    assert tok.encode(text, allowed_special="none") == gpt4_reference.encode_ordinary(text)
    assert isinstance(tok._cache._text, bpe_core.TextEncoder) and len(tok._cache) == 0  # nothing through Python
    rng = random.Random(4)
    for n in [0, 1, 2, 3, 5, 10, 30, 200, 5_000]:
        for _ in range(40 if n < 1_000 else 3):
            text = ascii_text(rng, n)
            want = piece_by_piece(text, ranks, GPT4_PATTERN)
            assert want == gpt4_reference.encode_ordinary(text), text
            assert tok.encode(text, allowed_special="none") == want, text
    every = "".join(chr(c) for c in range(128)) * 3
    assert tok.encode(every, allowed_special="none") == gpt4_reference.encode_ordinary(every)
    assert tok.encode("x" * 3000 + " 1234567 'LL 'Ve\r\n\n  \t\n" * 3 + "<|endoftext|>" + "!?" * 700 + "  ",
                      allowed_special="all") == gpt4_reference.encode(
        "x" * 3000 + " 1234567 'LL 'Ve\r\n\n  \t\n" * 3 + "<|endoftext|>" + "!?" * 700 + "  ", allowed_special="all")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ASCII_RUNS, max_size=80) | st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_any_ascii_text_encodes_as_tiktoken_under_gpt4_s_pattern(merger, ranks, gpt4_reference, text):
    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, GPT4_PATTERN)
    cache = tok._token_cache()
    ids = []
    assert cache.text_encoder()(text, cache, ids, 4)  # the C encoder itself, also below TEXT_MIN characters
    assert ids == gpt4_reference.encode_ordinary(text)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_encode_iter_hands_the_text_between_cuts_to_the_c_encoder(merger, ranks, pattern):
    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, pattern)
    reference = tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=ranks, special_tokens=GPT2_SPECIAL_TOKENS)
    text = lm.load_corpus("shakespeare")[:200_000]
    text = text[:50_000] + "<|endoftext|>" + text[50_000:120_000] + "\n<|endoftext|>\n\n" + text[120_000:]
    for chunk_chars in (100, 4_000, 70_000):
        tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, pattern)
        assert list(tok.encode_iter(text.splitlines(keepends=True), chunk_chars=chunk_chars)) == \
            reference.encode(text, allowed_special="all")
        assert isinstance(tok._cache._text, bpe_core.TextEncoder)
        if chunk_chars > 100:  # few pre-tokens through Python's cache (texts under TEXT_MIN characters only)
            assert len(tok._cache) < 300, len(tok._cache)


def test_decoding_in_c_gives_python_s_bytes_and_errors(merger, ranks, reference):
    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, GPT2_PATTERN, {"<|endoftext|>": 50256, "<|pad|>": 50300})
    text = lm.load_corpus("shakespeare")[:100_000] + "<|endoftext|> naïve 日本語 😀<|pad|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == reference.decode_bytes(ids[:-1]) + b"<|pad|>"
    assert isinstance(tok._decoder._made, bpe_core.NativeDecoder)  # the list went through C
    assert tok.decode_bytes([int(i) for i in ids[:63]]) == reference.decode_bytes(ids[:63])  # short: Python's
    assert tok.decode_bytes(tuple(ids)) == tok.decode_bytes(ids)  # not a list: Python's, the same bytes
    assert tok.decode([float(i) for i in ids[:100]]) == tok.decode(ids[:100])  # floats: Python's int()
    for bad, message in ((50_301, "out of range"), (-1, "out of range"), (2**40, "out of range"),
                         (50_257, "not assigned")):  # 50,257-50,299: between the ordinary and the special ids
        with pytest.raises(lm.tokenizers.TokenizerError, match=message):
            tok.decode(ids[:100] + [bad] + ids[:100])
    assert copy.deepcopy(tok).decode(ids) == text == pickle.loads(pickle.dumps(tok)).decode(ids)


def test_pretokens_too_long_for_c_and_special_tokens_between(merger, reference):
    """A pre-token over NATIVE_MAX bytes goes back to Python's bpe_heap, and the C scan goes on after it."""
    tok = ByteBPETokenizer.gpt2()
    text = ("Hello there " + "x" * 3000 + " and " + "9" * 1500 + "<|endoftext|>" + " " * 2000 + "end.'s\n" +
            "!?" * 700 + " done")
    want = reference.encode(text, allowed_special="all")
    assert tok.encode(text) == want
    assert tok.encode(text) == want  # again, from the caches
    assert len(tok._cache) == 4  # only the four long pre-tokens came through Python's cache


def test_a_small_cache_empties_and_refills_with_the_same_ids(merger, reference):
    tok = ByteBPETokenizer.gpt2()
    tok._cache = bpe_core.TokenCache(tok._ranks, 50)  # the C cache keeps 50 pre-tokens too
    text = lm.load_corpus("shakespeare")[:50_000]
    for _ in range(2):
        assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)


def test_threads_encoding_whole_texts_at_once(merger, reference):
    """One thread at a time uses the C encoder (ctypes lets go of the GIL); the others take the Python path."""
    tok = ByteBPETokenizer.gpt2()
    texts = lm.load_corpus("shakespeare")[:400_000].split("\n\n")
    expected = [reference.encode_ordinary(t) for t in texts]
    results: dict[int, list] = {}

    def work(k: int) -> None:
        results[k] = [tok.encode(t, allowed_special="none") for t in texts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(got == expected for got in results.values())


def test_the_c_cache_is_freed_with_its_tokenizer(merger):
    tok = ByteBPETokenizer.gpt2()
    tok.encode("some text to fill the cache, long enough for the C encoder to take it: " * 2)
    finalizer = tok._cache._text._finalizer
    assert finalizer.alive
    del tok
    gc.collect()
    assert not finalizer.alive


# ---- counting pre-tokens in C for training (bpe_core.TextCounter over lm_bpe_count) -------------------------
TWINS = {GPT2_PATTERN: bpe_core.GPT2_ASCII_PATTERN, GPT4_PATTERN: bpe_core.GPT4_ASCII_PATTERN}
both_patterns = pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])


def counted(texts: list[str], special_tokens=("<|endoftext|>",),
            pattern: str = GPT2_PATTERN) -> tuple[bpe_core.PieceCounter, Counter]:
    counter = bpe_core.PieceCounter(pattern, TWINS[pattern], False, special_tokens)
    counter(texts)
    return counter, counter.finish()


def regex_counts(texts: list[str], pattern: str = GPT2_PATTERN) -> Counter:
    counts = Counter()
    for text in texts:
        for segment in text.split("<|endoftext|>"):
            counts.update(regex.findall(pattern, segment))
    return counts


@both_patterns
def test_counting_in_c_equals_regex_on_shakespeare_and_random_ascii(merger, pattern):
    import random

    rng = random.Random(3)
    texts = [lm.load_corpus("shakespeare")[:200_000], "one<|endoftext|>two 's x" + "y" * 2000,
             *(ascii_text(rng, n) for n in (0, 1, 5, 50, 3_000) for _ in range(20))]
    counter, counts = counted(texts, pattern=pattern)
    assert counter.in_c is not None
    assert counts == regex_counts(texts, pattern)
    assert counter.finish() == counts  # finishing again adds nothing twice


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=ASCII_RUNS, max_size=60) | st.text(alphabet=st.characters(max_codepoint=127),
                                                                   max_size=60), max_size=4))
def test_counting_any_ascii_texts_in_c_equals_regex(merger, texts):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert counted(texts, pattern=pattern)[1] == regex_counts(texts, pattern)


@both_patterns
def test_mixed_text_is_counted_and_encoded_in_c(merger, ranks, pattern):
    text = lm.load_corpus("shakespeare")[:60_000]
    text = text[:30_000].replace("KING", "KÖNIG").replace(" the", " thé 😀").replace("'d", "’d") + text[30_000:]
    assert counted([text], pattern=pattern)[1] == regex_counts([text], pattern)
    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, pattern)
    reference = tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    assert tok.encode(text, allowed_special="none") == piece_by_piece(text, ranks, pattern) == \
        reference.encode_ordinary(text)
    assert len(tok._cache) == 0  # every pre-token through the C cache


# Characters of each class past ASCII, for GPT-2's and GPT-4's patterns: letters, numbers (digits of other
# scripts, superscripts, fractions, Roman numerals), White_Space, and others (quotes, dashes, symbols, emoji),
# with the long s that GPT-4's case-insensitive contractions read as an s
UNICODE_RUNS = ASCII_RUNS + "éÖßΩжあ日한ſǅ" + "²½٣३Ⅳ①" + "\x85\xa0\u1680\u2003\u2028\u2029\u202f\u3000" + "“”’—€©😀\u200b\u0301"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=UNICODE_RUNS, max_size=80) |
       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_unicode_text_encodes_in_c_as_regex_and_bpe(merger, ranks, text):
    for pattern, number in ((GPT2_PATTERN, 2), (GPT4_PATTERN, 4)):
        cache = bpe_core.TokenCache(ranks, 10**6)
        ids = []
        assert cache.text_encoder()(text, cache, ids, number)  # the C encoder itself, at any length
        assert ids == piece_by_piece(text, ranks, pattern), (pattern, text)
        assert counted([text], special_tokens=(), pattern=pattern)[1] == regex_counts([text], pattern)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=UNICODE_RUNS, max_size=80))
def test_unicode_text_encodes_as_tiktoken(merger, ranks, reference, gpt4_reference, text):
    for pattern, want in ((GPT2_PATTERN, reference), (GPT4_PATTERN, gpt4_reference)):
        tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, pattern)
        assert tok.encode(text * 2, allowed_special="none") == want.encode_ordinary(text * 2)


@both_patterns
def test_every_code_point_has_regex_s_class_in_c(merger, pattern):
    """Each character doubled, then a space and a digit: how the pre-tokens fall shows its class."""
    step = 1 if pattern == GPT2_PATTERN else 5
    every = [chr(c) for c in range(0x80, 0x110000, step) if not 0xD800 <= c < 0xE000]
    text = "".join(f"{c}{c} {c}1" for c in every)
    assert counted([text], special_tokens=(), pattern=pattern)[1] == regex_counts([text], pattern)


def test_gpt4_s_contractions_in_either_case_and_the_long_s(merger, ranks, gpt4_reference):
    text = "".join(f"x'{c}{d}y " for c in "sdmtlvrSDMTLVRſé" for d in "slveLVEſ")
    cache = bpe_core.TokenCache(ranks, 10**6)
    ids = []
    assert cache.text_encoder()(text, cache, ids, 4)
    assert ids == piece_by_piece(text, ranks, GPT4_PATTERN) == gpt4_reference.encode_ordinary(text)
    assert "'ſ" in regex.findall(GPT4_PATTERN, text)  # `regex` folds the long s to s, as tiktoken does
    assert counted([text], special_tokens=(), pattern=GPT4_PATTERN)[1] == regex_counts([text], GPT4_PATTERN)


def test_a_lone_surrogate_still_gets_the_python_path_s_error(merger, ranks):
    tok = ByteBPETokenizer.from_tiktoken_ranks(ranks, GPT2_PATTERN)
    with pytest.raises(lm.tokenizers.TokenizerError, match="surrogate"):
        tok.encode("a long enough text, over sixty-four characters, to go to the C encoder \ud800 here")


def test_training_with_and_without_the_c_file_learns_the_same_merges(rebuilt, monkeypatch):
    text = lm.load_corpus("shakespeare")[:300_000] + " naïve café 日本語"
    assert bpe_core.native_merging()[0] is not None
    with_c = ByteBPETokenizer.train(text, 1_000, processes=1)
    monkeypatch.setenv("LM_CPU_KERNELS", "0")
    bpe_core.native_merging.cache_clear()
    assert bpe_core.native_merging()[0] is None
    without = ByteBPETokenizer.train(text, 1_000, processes=1)
    assert with_c.merges == without.merges


def test_a_long_text_takes_several_calls_with_a_bounded_buffer(merger, reference, monkeypatch):
    monkeypatch.setattr(bpe_core, "TEXT_IDS", 7)  # at most 7 ids a call: every few pre-tokens a new call
    tok = ByteBPETokenizer.gpt2()
    text = lm.load_corpus("shakespeare")[:20_000] + " " + "z" * 2000 + " the end"
    assert tok.encode(text, allowed_special="none") == reference.encode_ordinary(text)
