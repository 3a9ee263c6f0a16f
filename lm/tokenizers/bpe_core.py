"""The fast, torch-free core of byte-level BPE: pre-tokenizing, merging one pre-token, the pre-token
cache, counting pre-tokens, and the worker processes that count or encode in parallel.

Why a module of its own: importing anything under `lm` runs `lm/__init__.py`, which imports torch
(about a second, and threads that make `fork` unsafe). A worker process started with
multiprocessing's "spawn" or "forkserver" also re-imports the caller's `__main__` (a script that
imports lm, and so torch) and the module of the function it runs; measured here, a spawned worker
took over a second before counting anything, longer than counting all of Shakespeare (5 MB) in one
process. So `start_worker` runs a bare `python -c` that loads *this file by its path*, not as
`lm.tokenizers.bpe_core`: it needs only the standard library and `regex`, and starts in about 50 ms
(tests/test_bpe.py checks that a worker never imports torch or lm). Nothing here may import from lm.

`ByteBPETokenizer` (bpe.py) builds on these pieces; its docstrings say what they are for.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import importlib.util
import itertools
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import regex

BYTES = [bytes([b]) for b in range(256)]
NO_RANK = 2**63  # the rank of a pair that is not a token
LONG_PRETOKEN = 64  # bytes; longer pre-tokens are split by `bpe_heap`, whose cost grows as n log n, not n²

# ---- pre-tokenizing ASCII text with the standard library's `re` -------------------------------------
# GPT-2's and GPT-4's patterns use \p{L} and \p{N}, which only the `regex` module knows. On ASCII
# text they mean [A-Za-z] and [0-9], and the same patterns written that way run about twice as fast
# under the standard `re` (Shakespeare: 0.19 s instead of 0.36 s). Whitespace must be spelled out:
# `regex`'s \s is Unicode's White_Space, which among ASCII characters is exactly WHITESPACE, while
# `re`'s \s also matches \x1c-\x1f (as str.isspace does). The tests compare both forms on random text.
WHITESPACE = "\t\n\x0b\x0c\r "
_S = re.escape(WHITESPACE)
# Letters first (the most common piece); it cannot clash with the contractions, which start with '.
GPT2_ASCII_PATTERN = rf""" ?[A-Za-z]+|'(?:[sdmt]|ll|ve|re)| ?[0-9]+| ?[^{_S}A-Za-z0-9]+|[{_S}]+(?![^{_S}])|[{_S}]+"""
# GPT-4's possessive quantifiers (?+, ++) need Python 3.11's `re`; each one here gives up nothing
# that backtracking could use (what follows it can never match what it consumed), so the plain
# greedy forms match the same pieces, and the pattern runs on Python 3.10 too.
GPT4_ASCII_PATTERN = (
    rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_S}A-Za-z0-9]+[\r\n]*|[{_S}]+$|"""
    rf"""[{_S}]*[\r\n]|[{_S}]+(?![^{_S}])|[{_S}]"""
)
BLOCK_CHARS = 1 << 16  # mixed text is pre-tokenized in blocks about this long, each by the faster engine that fits


def _cuttable(c: str) -> bool:
    return "!" <= c <= "~"  # printable ASCII, not a space


def cut_rule(ascii_pattern: str | None) -> str | None:
    """How text may be cut for the pattern whose ASCII twin this is (see `find_cut`); None: never."""
    return {GPT2_ASCII_PATTERN: "gpt2", GPT4_ASCII_PATTERN: "gpt4"}.get(ascii_pattern)


def find_cut(text: str, start: int, rule: str = "gpt2") -> int:
    r"""The first place at or after `start` where `text` can be cut in two without changing its
    pre-tokens under GPT-2's (rule "gpt2") or GPT-4's ("gpt4") pattern, or -1 if there is none.

    Cuts are made in a run of whitespace W that holds a newline and has a printable, non-space
    ASCII character on each side ("x\n\ny"). Neither pattern looks behind, so the piece after
    the cut starts as it would at the start of a text; what matters is how W ends a text.
    GPT-2 splits W as W[:-1] (`\s+(?!\S)`) and then W[-1], alone or with the word after it,
    and at the end of a text W[:-1] is one piece too: so cut before W's last character. GPT-4
    keeps a run of newlines whole (`\s*[\r\n]`, and `\s++$` at the end), so cut after W when W
    holds only \r and \n. The tests check both on random text.
    """
    n = len(text)
    k = text.find("\n", max(start, 1))
    while k >= 0:
        a, b = k, k + 1
        while a > 0 and text[a - 1] in WHITESPACE:
            a -= 1
        while b < n and text[b] in WHITESPACE:
            b += 1
        if a > 0 and b < n and _cuttable(text[a - 1]) and _cuttable(text[b]):
            if rule == "gpt2" and b - 1 >= start:
                return b - 1
            if rule == "gpt4" and not text[a:b].strip("\r\n"):
                return b
        k = text.find("\n", b)
    return -1


def cut_blocks(text: str, size: int, rule: str = "gpt2") -> Iterator[str]:
    """`text` in consecutive blocks of about `size` characters (longer where no cut is near),
    cut where the pre-tokens do not change (see `find_cut`)."""
    start = 0
    while len(text) - start > size:
        cut = find_cut(text, start + size, rule)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class Splitter:
    """Cuts text into pre-tokens: with `pattern` (a `regex` pattern; None: no split), or, on ASCII
    text, with its faster `re` twin `ascii_pattern` when one is given. A twin may only be given for
    patterns whose pre-tokens `find_cut` keeps (GPT-2's and GPT-4's): mostly-ASCII text is cut into
    blocks and each block uses the engine that fits it. With `check`, raise ValueError when the
    pattern skips characters (a custom pattern might; the text would silently lose them)."""

    def __init__(self, pattern: str | None, ascii_pattern: str | None = None, check: bool = False):
        self.pattern, self.ascii_pattern, self.check = pattern, ascii_pattern, check
        self._findall = regex.compile(pattern).findall if pattern is not None else None
        self._ascii = re.compile(ascii_pattern).findall if ascii_pattern is not None else None
        self._rule = cut_rule(ascii_pattern)

    def __call__(self, text: str) -> list[str]:
        if self._findall is None:
            return [text] if text else []
        if self._ascii is None:
            pieces = self._findall(text)
            if self.check and sum(map(len, pieces)) != len(text):
                raise ValueError(f"pattern {self.pattern!r} skips some characters of the text, which would be "
                                 f"lost; end it with an alternative that matches anything, e.g. |\\s+|.")
            return pieces
        if text.isascii():
            return self._ascii(text)
        if len(text) <= BLOCK_CHARS:
            return self._findall(text)
        pieces: list[str] = []
        for block in cut_blocks(text, BLOCK_CHARS, self._rule):
            pieces += self._ascii(block) if block.isascii() else self._findall(block)
        return pieces


def special_regex(names: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds the special tokens, longest first where one is a prefix of another."""
    names = sorted(names, key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in names)) if names else None


# ---- encoding one pre-token ----------------------------------------------------------------------
def bpe(data: bytes, ranks: Mapping[bytes, int]) -> list[bytes]:
    """Split `data` into tokens: start from single bytes and keep joining the adjacent pair whose
    concatenation has the lowest rank (the leftmost on ties), as tiktoken does."""
    parts = [BYTES[b] for b in data]
    get = ranks.get
    pair_ranks = [get(left + right, NO_RANK) for left, right in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == NO_RANK:
            break
        i = pair_ranks.index(best)
        parts[i] += parts.pop(i + 1)  # join the pair
        del pair_ranks[i]
        if i < len(pair_ranks):  # only the new token's two neighbouring pairs change
            pair_ranks[i] = get(parts[i] + parts[i + 1], NO_RANK)
        if i:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], NO_RANK)
    return parts


def bpe_heap(data: bytes, ranks: Mapping[bytes, int]) -> list[bytes]:
    """`bpe` for long pre-tokens: the same tokens, in O(n log n) steps instead of O(n²).

    `bpe` scans every pair for the lowest rank at each merge, so a pre-token of n bytes costs about
    n² steps: a 40,000-letter word (GPT-2's pattern keeps a run of letters whole) takes seconds.
    Here the pairs wait in a heap ordered by (rank, position), which pops the lowest rank and, on
    ties, the leftmost pair, as `bpe` chooses. The parts are a linked list of byte offsets:
    part `s` is data[s : end[s]], and `before[s]` is where the part before it starts.
    A merge does not remove the pairs it breaks from the heap; each heap entry (rank, s, stop)
    records where its right part stopped, and is skipped when it comes up if `s` is no longer a
    part or the part after `s` no longer stops there (one of the two has merged since).
    """
    n = len(data)
    end = list(range(1, n + 1))  # -1 once the part that started here has joined the one before it
    before = list(range(-1, n - 1))
    get = ranks.get
    heap = []
    for s in range(n - 1):
        rank = get(data[s : s + 2])
        if rank is not None:
            heap.append((rank, s, s + 2))
    heapq.heapify(heap)
    while heap:
        _, s, stop = heapq.heappop(heap)
        right = end[s]
        if right < 0 or right >= n or end[right] != stop:  # stale: a part of this pair has merged since
            continue
        end[s], end[right] = stop, -1  # join part s and the part after it
        if stop < n:
            before[stop] = s
        # the new part forms two new pairs, with its left and its right neighbour
        left = before[s]
        if left >= 0 and (rank := get(data[left:stop])) is not None:
            heapq.heappush(heap, (rank, left, stop))
        if stop < n and (rank := get(data[s : end[stop]])) is not None:
            heapq.heappush(heap, (rank, s, end[stop]))
    parts, s = [], 0
    while s < n:
        parts.append(data[s : end[s]])
        s = end[s]
    return parts


# ---- merging in C -----------------------------------------------------------------------------------
# `bpe` costs about 9 µs of Python per pre-token of 7 bytes: on the first encoding of a text most of
# the time goes to the pre-tokens met for the first time (Shakespeare has 36k distinct ones among its
# 1.36M). lm/csrc/bpe.c merges the same way in C (about 0.3 µs), built on first use by lm/native.py;
# without a C compiler, or with LM_CPU_KERNELS=0, `bpe` runs as before. The results are identical.
NATIVE_MAX = 1024  # bytes; the C merging takes pre-tokens up to this long (LM_BPE_MAX in bpe.c)
NATIVE_FLAGS = ("-O2", "-shared", "-fPIC")
TEXT_IDS = 1 << 20  # ids one call of the C text encoder may return (its buffer: 4 MiB)
TEXT_MIN = 16  # characters; shorter texts take the Python path: with a warm cache "hello" costs 1.5 us there, 2.8 in C
# The patterns whose pre-tokens bpe.c finds itself (its `pattern` argument), by their ASCII twins
IN_C = {GPT2_ASCII_PATTERN: 2, GPT4_ASCII_PATTERN: 4}


def _native_module():
    """lm/native.py: `lm.native` when this file was imported as part of lm, else (in a worker, which
    must not import lm) loaded by its path."""
    if __package__:
        from .. import native
        return native
    spec = importlib.util.spec_from_file_location("_lm_native", Path(__file__).resolve().parents[1] / "native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def native_merging():
    """(the compiled merging's library, None), or (None, why it cannot run here); once a process."""
    native = _native_module()
    why = native.unbuildable()
    if why is not None:
        return None, why
    try:
        library = ctypes.CDLL(str(native.build(native.CSRC / "bpe.c", NATIVE_FLAGS, native.compiler())))
        library.lm_bpe_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        library.lm_bpe_new.restype = ctypes.c_void_p
        library.lm_bpe_free.argtypes = [ctypes.c_void_p]
        library.lm_bpe_free.restype = None
        # lm_bpe_encode(table, data, n, out) is called once per new pre-token, so it is left without
        # `argtypes` (their checks cost more than the merging): NativeMerger passes a c_void_p, bytes,
        # an int and an int32 array, exactly its C types
        library.lm_bpe_encode.restype = ctypes.c_int
        library.lm_bpe_cache_new.argtypes = [ctypes.c_int64]
        library.lm_bpe_cache_new.restype = ctypes.c_void_p
        library.lm_bpe_cache_free.argtypes = [ctypes.c_void_p]
        library.lm_bpe_cache_free.restype = None
        # lm_bpe_text too, called once per text: its ten checked arguments cost 1.2 us a call, a short text's
        # whole scan; TextEncoder passes each as a ctypes object of its exact C type (or bytes), made once
        library.lm_bpe_text.restype = ctypes.c_int64
        library.lm_bpe_set_classes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
        library.lm_bpe_set_classes.restype = ctypes.c_int
        library.lm_bpe_counts_new.argtypes = []
        library.lm_bpe_counts_new.restype = ctypes.c_void_p
        library.lm_bpe_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
        library.lm_bpe_count.restype = ctypes.c_int
        library.lm_bpe_counts_size.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        library.lm_bpe_counts_size.restype = ctypes.c_int64
        library.lm_bpe_counts_export.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        library.lm_bpe_counts_export.restype = None
        library.lm_bpe_vocab_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64]
        library.lm_bpe_vocab_new.restype = ctypes.c_void_p
        library.lm_bpe_vocab_free.argtypes = [ctypes.c_void_p]
        library.lm_bpe_vocab_free.restype = None
        library.lm_bpe_decoded_size.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        library.lm_bpe_decoded_size.restype = ctypes.c_int64
        library.lm_bpe_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p]
        library.lm_bpe_decode.restype = None
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        return None, f"compiling bpe.c failed: {error}"
    # a check against `bpe`: a vocabulary of the bytes and a few merges, ties and unmergeable pairs
    ranks = {b: i for i, b in enumerate(BYTES)}
    for token in (b"ab", b"bc", b"abc", b"cc", b"ccc", b"xy", b"aa", b"aaa"):
        ranks[token] = len(ranks)
    merger = NativeMerger(library, ranks)
    for word in (b"abcabc", b"ccccc", b"aaaaaaa", b"xyzab", b"q", b"abcccab", bytes(range(200, 256))):
        if merger(word) != tuple(ranks[t] for t in bpe(word, ranks)):
            return None, "the compiled merging disagrees with bpe() on a test word"
    return library, None


class NativeDecoder:
    """Decoding in C: a copy of `table` (id -> the token's bytes, None for an id with no token) that turns
    an array of int32 ids into their bytes in two passes (the size, then the bytes), where
    `b"".join(table[i] for i in ids)` spends most of its time on the many small bytes objects. Freed with
    it. Calling it gives the bytes, or None when an id is out of range or has no token (the caller's
    Python path then says which)."""

    def __init__(self, library, table: Sequence[bytes | None]):
        tokens = [token or b"" for token in table]  # no token: an empty one (a real token has a byte or more)
        offsets = array("q", [0])
        offsets.extend(itertools.accumulate(map(len, tokens)))
        handle = library.lm_bpe_vocab_new(b"".join(tokens), offsets.buffer_info()[0], len(tokens))
        if not handle:
            raise MemoryError("no memory for the C decoding table")
        self._finalizer = weakref.finalize(self, library.lm_bpe_vocab_free, handle)
        self._library, self._table = library, ctypes.c_void_p(handle)

    def __call__(self, ids: array) -> bytes | None:
        """The bytes of `ids` (an array of type "i"), or None if one of them has no token."""
        address, n = ids.buffer_info()
        size = self._library.lm_bpe_decoded_size(self._table, address, n)
        if size < 0:
            return None
        out = ctypes.create_string_buffer(size)
        self._library.lm_bpe_decode(self._table, address, n, out)
        return out.raw


class LazyDecoder:
    """A NativeDecoder for one tokenizer's id table, made on the first call; a copy or a pickle of it starts
    without one (the C table is remade where it is used)."""

    def __init__(self):
        self._made: NativeDecoder | None | bool = False

    def __reduce__(self):
        return type(self), ()

    def __call__(self, table: Sequence[bytes | None], ids: list) -> bytes | None:
        """The bytes of `ids` through C, or None where C cannot give them (no C compiler, ids that are not all
        int32, or an id with no token: the caller's Python path then says which)."""
        if self._made is False:
            library = native_merging()[0]
            try:
                self._made = NativeDecoder(library, table) if library is not None else None
            except MemoryError:
                self._made = None
        if self._made is None:
            return None
        try:
            return self._made(array("i", ids))  # TypeError: not ints; OverflowError: past int32
        except (TypeError, OverflowError):
            return None


class NativeMerger:
    """The C merging for one vocabulary, `ranks` (token bytes -> id, which is its rank): calling it
    with a pre-token's bytes (at most NATIVE_MAX) gives its ids, or None when a byte has no token
    (then `bpe` runs, and raises). Its table is freed with it."""

    def __init__(self, library, ranks: Mapping[bytes, int]):
        tokens = list(ranks)
        offsets = array("q", [0])
        offsets.extend(itertools.accumulate(map(len, tokens)))
        ids = array("i", ranks.values())  # OverflowError for ids past 2**31: no C merging
        table = library.lm_bpe_new(b"".join(tokens), offsets.buffer_info()[0], ids.buffer_info()[0], len(tokens))
        if not table:
            raise MemoryError("no memory for the C merging's table")
        self._finalizer = weakref.finalize(self, library.lm_bpe_free, table)
        self._encode, self._table = library.lm_bpe_encode, ctypes.c_void_p(table)

    def __call__(self, data: bytes) -> tuple[int, ...] | None:
        out = (ctypes.c_int32 * len(data))()  # each call its own: threads may encode at once
        count = self._encode(self._table, data, len(data), out)
        return tuple(out[:count]) if count >= 0 else None


UNICODE_CLASSES = regex.compile(r"(\p{L}+)|(\p{N}+)|(\s+)")  # bpe.c's LETTER, DIGIT and SPACE: 1, 2, 3
_classes_lock = threading.Lock()
_classes_given: set[int] = set()  # id()s of the libraries that have the classes


def give_unicode_classes(library) -> None:
    r"""Hand bpe.c the ranges of code points past ASCII that `regex` counts as letters (\p{L}), numbers
    (\p{N}) and spaces (\s), read off `regex` itself, so that the C scan and the patterns agree on every
    character. Once per process (about 0.1 s), before the first text that is not ASCII goes to C."""
    with _classes_lock:
        if id(library) in _classes_given:
            return
        first, last, kind = array("I"), array("I"), array("B")
        for low, high in ((0x80, 0xD800), (0xE000, 0x110000)):  # around the surrogates, which UTF-8 never holds
            for match in UNICODE_CLASSES.finditer("".join(map(chr, range(low, high)))):
                first.append(low + match.start()), last.append(low + match.end() - 1), kind.append(match.lastindex)
        if library.lm_bpe_set_classes(first.buffer_info()[0], last.buffer_info()[0], kind.buffer_info()[0],
                                      len(first)) < 0:
            raise MemoryError("no memory for the Unicode classes")
        _classes_given.add(id(library))


class TextEncoder:
    """Whole texts under GPT-2's or GPT-4's pattern in C (`lm_bpe_text` in bpe.c): one scan over their UTF-8
    finds the pre-tokens (those of GPT2_PATTERN or GPT4_PATTERN, with `regex`'s Unicode classes:
    `give_unicode_classes`), each is looked up in a cache of its own (up to `limit` pre-tokens, emptied when
    full, as TokenCache is) and merged by `merger`'s table when new. A pre-token the C merging cannot take
    (longer than NATIVE_MAX bytes, or with a byte that has no token) comes back to Python's cache, `pieces`.
    One text at a time: ctypes lets go of the GIL during the call, so a second thread gets False and takes
    the Python path. The id buffer (at most TEXT_IDS) and the two C integers for where a call stopped are
    kept from one text to the next: for short texts they were half the cost of a call."""

    def __init__(self, library, merger: NativeMerger, limit: int):
        handle = library.lm_bpe_cache_new(limit)
        if not handle:
            raise MemoryError("no memory for the C pre-token cache")
        self._finalizer = weakref.finalize(self, library.lm_bpe_cache_free, handle)
        self._library, self._merger, self._run = library, merger, library.lm_bpe_text
        self._cache = ctypes.c_void_p(handle)
        self._lock = threading.Lock()
        self._out = array("i")
        self._address = ctypes.c_void_p(self._out.buffer_info()[0])
        # lm_bpe_text has no argtypes (see native_merging): every argument is a ctypes object of its C type
        self._start, self._size, self._room = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        self._patterns = {2: ctypes.c_int(2), 4: ctypes.c_int(4)}
        self._stop, self._end = ctypes.c_int64(), ctypes.c_int64()
        self._where = (ctypes.byref(self._stop), ctypes.byref(self._end))

    def __call__(self, text: str, pieces: TokenCache, ids: list[int], pattern: int = 2) -> bool:
        """Append the ids of `text` under `pattern` (2: GPT-2's, 4: GPT-4's; the pre-tokens' ids do not
        depend on it, so one cache serves both) to `ids`; False, with nothing appended, while another
        thread is encoding with it, or when the text holds a lone surrogate (not UTF-8: the Python path
        then says so)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                return False
            if len(data) != len(text):
                give_unicode_classes(self._library)
            room = min(len(data), TEXT_IDS)  # ids a call may return: a long text takes several calls
            if len(self._out) < room:
                self._out = array("i", bytes(4 * room))
                self._address.value = self._out.buffer_info()[0]
            out, (stop, end), (stop_at, end_at) = self._out, (self._stop, self._end), self._where
            start, size = self._start, self._size
            start.value, size.value, self._room.value = 0, len(data), room
            code = self._patterns[pattern]
            while True:
                count = self._run(self._merger._table, self._cache, data, start, size, self._address, self._room,
                                  stop_at, end_at, code)
                if count < 0:
                    raise MemoryError("no memory for the C pre-token cache")
                ids += out[:count]
                if stop.value >= len(data):
                    return True
                start.value = stop.value
                if end.value >= 0:  # bpe_heap, or the error for a byte without a token
                    ids += pieces[data[stop.value : end.value].decode("utf-8")]
                    start.value = end.value
        finally:
            self._lock.release()


class TextCounter:
    """Counts the pre-tokens of texts under GPT-2's or GPT-4's pattern (`pattern`: 2 or 4) in C
    (`lm_bpe_count` in bpe.c): the scan TextEncoder makes, into a C table of pre-token bytes -> count;
    `counts()` hands them over."""

    def __init__(self, library, pattern: int = 2):
        handle = library.lm_bpe_counts_new()
        if not handle:
            raise MemoryError("no memory for the pre-token counts")
        self._finalizer = weakref.finalize(self, library.lm_bpe_cache_free, handle)
        self._library, self._table, self.pattern = library, ctypes.c_void_p(handle), pattern

    def __call__(self, text: str) -> None:
        """Count the pre-tokens of `text` (UnicodeEncodeError for a lone surrogate)."""
        data = text.encode("utf-8")
        if len(data) != len(text):
            give_unicode_classes(self._library)
        if self._library.lm_bpe_count(self._table, data, len(data), self.pattern) < 0:
            raise MemoryError("no memory for the pre-token counts")

    def counts(self) -> Counter:
        """Every pre-token counted so far (str) with its count."""
        size = ctypes.c_int64()
        n = self._library.lm_bpe_counts_size(self._table, ctypes.byref(size))
        data = ctypes.create_string_buffer(max(size.value, 1))
        offsets, counts = array("q", bytes(8 * (n + 1))), array("q", bytes(8 * n))
        self._library.lm_bpe_counts_export(self._table, data, offsets.buffer_info()[0], counts.buffer_info()[0])
        raw = data.raw[: size.value]
        return Counter({raw[a:b].decode("utf-8"): count for a, b, count in zip(offsets[:-1], offsets[1:], counts)})


def native_merger(ranks: Mapping[bytes, int]) -> NativeMerger | None:
    """A NativeMerger for `ranks`, or None where the C merging cannot run (or take these ids)."""
    library, _ = native_merging()
    if library is None:
        return None
    try:
        return NativeMerger(library, ranks)
    except (OverflowError, TypeError, MemoryError):  # ids beyond int32, or not bytes -> int
        return None


class TokenCache(dict):
    """Pre-token (str) -> its token ids (a tuple), filled on demand.

    Looking up a pre-token that is not there yet calls `__missing__`, which runs BPE on it (the C
    merging where it runs, `bpe` or `bpe_heap` otherwise) and stores the result. So
    `map(cache.__getitem__, pieces)` turns a whole text's pre-tokens into ids in C, calling Python
    only once per distinct pre-token (36k distinct among Shakespeare's 1.36M).
    When `limit` entries are stored, the cache is emptied, so memory stays bounded on any corpus.
    A lone surrogate in a pre-token raises UnicodeEncodeError (its `.object` is the pre-token).
    A pickled cache is an empty one (the entries are remade on demand, the C table too).
    """

    def __init__(self, ranks: Mapping[bytes, int], limit: int):
        super().__init__()
        self.ranks, self.limit = ranks, limit
        self._merger: NativeMerger | None | bool = False  # False: not made yet (on the first miss)
        self._text: TextEncoder | None | bool = False  # likewise, on the first whole text

    def __reduce__(self):
        return type(self), (self.ranks, self.limit)

    def __missing__(self, piece: str) -> tuple[int, ...]:
        data = piece.encode("utf-8")
        merger = self.merger()
        tokens = merger(data) if merger is not None and len(data) <= NATIVE_MAX else None
        if tokens is None:
            ranks = self.ranks
            whole = ranks.get(data)  # a whole word that is one token (as tiktoken also checks first)
            if whole is not None:
                tokens = (whole,)
            else:
                merge = bpe if len(data) <= LONG_PRETOKEN else bpe_heap
                tokens = tuple(map(ranks.__getitem__, merge(data, ranks)))
        if len(self) >= self.limit:
            self.clear()
        self[piece] = tokens
        return tokens

    def merger(self) -> NativeMerger | None:
        """The C merging for these ranks (made on first use), None where it cannot run."""
        if self._merger is False:
            self._merger = native_merger(self.ranks)
        return self._merger

    def text_encoder(self) -> TextEncoder | None:
        """The C encoder of whole texts under GPT-2's or GPT-4's pattern for these ranks, None where
        the C merging cannot run."""
        if self._text is False:
            merger = self.merger()
            try:
                self._text = TextEncoder(native_merging()[0], merger, self.limit) if merger is not None else None
            except MemoryError:
                self._text = None
        return self._text


def surrogate_message(piece: str) -> str:
    """What to say when a pre-token holds a lone surrogate (str.encode fails on it)."""
    return (f"the text holds a lone surrogate in {piece!r}, which is not valid Unicode; clean it first, "
            f"e.g. text.encode('utf-8', 'replace').decode().")


def encode_pieces(pieces: Iterable[str], cache: TokenCache, ids: list[int]) -> None:
    """Append the ids of `pieces` to `ids`: one C loop over the pre-tokens, BPE only for new ones."""
    ids += itertools.chain.from_iterable(map(cache.__getitem__, pieces))


def encode_text(text: str, split: Splitter, cache: TokenCache, specials: regex.Pattern | None,
                special_ids: Mapping[str, int], ids: list[int]) -> None:
    """Append the ids of `text` to `ids`; what `specials` finds becomes that special token's id."""
    start = 0
    if specials is not None:
        for match in specials.finditer(text):
            encode_segment(text[start : match.start()], split, cache, ids)
            ids.append(special_ids[match.group()])
            start = match.end()
    encode_segment(text[start:], split, cache, ids)


def encode_segment(text: str, split: Splitter, cache: TokenCache, ids: list[int]) -> None:
    """Append the ids of `text`, which holds no special token: whole through the C encoder where the pattern is
    GPT-2's or GPT-4's, the C merging runs (`TokenCache.text_encoder`) and the text is TEXT_MIN characters or
    more; otherwise, or while another thread uses the encoder, piece by piece."""
    pattern = IN_C.get(getattr(split, "ascii_pattern", None)) if len(text) >= TEXT_MIN else None
    encoder = cache.text_encoder() if pattern else None
    if encoder is None or not encoder(text, cache, ids, pattern):
        encode_pieces(split(text), cache, ids)


# ---- the work a process does: count pre-tokens, or encode texts ------------------------------------
class PieceCounter:
    """Counts the pre-tokens of batches of texts (lists of str); special tokens are cut out first,
    and pre-tokens never span two texts. `finish()` returns the Counter of all batches."""

    def __init__(self, pattern: str | None, ascii_pattern: str | None, check: bool, special_tokens: Sequence[str]):
        self.split = Splitter(pattern, ascii_pattern, check)
        self.specials = special_regex(special_tokens)
        self.counts: Counter = Counter()
        self.in_c: TextCounter | None = None  # GPT-2's or GPT-4's pattern, where the C file runs
        library = native_merging()[0] if ascii_pattern in IN_C else None
        if library is not None:
            try:
                self.in_c = TextCounter(library, IN_C[ascii_pattern])
            except MemoryError:
                pass

    def __call__(self, texts: list[str]) -> None:
        split, update, in_c = self.split, self.counts.update, self.in_c
        for text in texts:
            for segment in (self.specials.split(text) if self.specials is not None else (text,)):
                if in_c is None:
                    update(split(segment))
                    continue
                try:
                    in_c(segment)
                except UnicodeEncodeError:  # a lone surrogate: the Python path says what to do
                    update(split(segment))

    def finish(self) -> Counter:
        """The counts of every batch so far (those counted in C added in)."""
        if self.in_c is not None:
            self.counts.update(self.in_c.counts())
            # counted once: a second finish adds nothing twice
            self.in_c = TextCounter(self.in_c._library, self.in_c.pattern)
        return self.counts


class BatchEncoder:
    """Encodes batches of texts (lists of str) to lists of ids, as `ByteBPETokenizer.encode` does
    with the special tokens `allowed` (name -> id) recognised."""

    def __init__(self, ranks: Mapping[bytes, int], pattern: str | None, ascii_pattern: str | None, check: bool,
                 allowed: Mapping[str, int], cache_size: int):
        self.split = Splitter(pattern, ascii_pattern, check)
        self.cache = TokenCache(ranks, cache_size)
        self.allowed, self.specials = dict(allowed), special_regex(allowed)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            ids: list[int] = []
            try:
                encode_text(text, self.split, self.cache, self.specials, self.allowed, ids)
            except UnicodeEncodeError as err:
                raise ValueError(surrogate_message(err.object)) from None
            out.append(ids)
        return out

    def finish(self) -> None:
        return None


TASKS: dict[str, Callable[..., Any]] = {"count": PieceCounter, "encode": BatchEncoder}


# ---- worker processes ------------------------------------------------------------------------------
# The parent and a worker exchange pickled messages, each preceded by its length (8 bytes). The
# parent sends (sys.path, task name, the task's arguments), then batches, then None; the worker
# answers each with ("ok", result) or ("error", message), and None with ("ok", task.finish()).
_BOOT = ("import importlib.util, json, sys; sys.path[:] = json.loads(sys.argv[2]); "
         "spec = importlib.util.spec_from_file_location('_lm_bpe_worker', sys.argv[1]); "
         "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.serve()")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other side closed the pipe")
    (size,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(size))


def serve() -> None:
    """A worker's main loop (run by `_BOOT` in a fresh interpreter)."""
    inbox, outbox = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the messages
    name, args = _receive(inbox)
    task = TASKS[name](*args)
    while True:
        batch = _receive(inbox)
        try:
            _send(outbox, ("ok", task.finish() if batch is None else task(batch)))
        except Exception as err:  # sent back, and raised again by the parent
            _send(outbox, ("error", str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}"))
        if batch is None:
            return


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its error (and its stderr if it died)."""


class Worker:
    """One worker process running the task `name(*args)` (see TASKS) on the batches it is sent.
    The process starts at once; the task's arguments are sent with the first batch, from the
    thread that drives this worker, so that starting several workers never waits for one."""

    def __init__(self, name: str, args: tuple):
        self._stderr = tempfile.TemporaryFile()
        self._setup: tuple | None = (name, args)
        path = json.dumps([p for p in sys.path if isinstance(p, str)])  # find `regex` where this process does
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, os.path.abspath(__file__), path],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)

    def __call__(self, batch):
        try:
            if self._setup is not None:
                _send(self.process.stdin, self._setup)
                self._setup = None
            _send(self.process.stdin, batch)
            status, result = _receive(self.process.stdout)
        except (OSError, EOFError):  # it died: report why
            self.process.wait()
            self._stderr.seek(0)
            log = self._stderr.read().decode("utf-8", "replace").strip()
            raise WorkerError(f"a tokenizer worker process exited with code {self.process.returncode}: "
                              f"{log[-2000:] or 'no message'}") from None
        if status != "ok":
            raise WorkerError(result)
        return result

    def close(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.process.wait()
        self._stderr.close()


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_parallel(name: str, args: tuple, batches: Iterable, processes: int) -> tuple[list, list]:
    """Run the task `name(*args)` (see TASKS) on every batch, in this process (`processes=1`) or
    spread over `processes` worker processes. Returns (each batch's result, in order; each
    process's `finish()` result).

    Batches are handed out one at a time to whichever worker is free, so a slow start or an
    uneven batch does not leave one waiting for the others, and `batches` is read lazily (a file
    streamed in blocks stays bounded in memory). A thread per worker sends it batches and waits
    for its answers. This process only feeds the workers: when it also counted, the GIL, held
    through each of its `findall` calls, delayed the feeding threads so much that two processes
    were slower than one.
    """
    if processes == 1:
        task = TASKS[name](*args)
        return [task(batch) for batch in batches], [task.finish()]
    source = enumerate(batches)
    lock = threading.Lock()
    results: dict[int, Any] = {}
    finals: list = []
    errors: list[BaseException] = []

    def drive(worker: Worker) -> None:
        try:
            while True:
                with lock:
                    item = None if errors else next(source, None)
                if item is None:
                    break
                results[item[0]] = worker(item[1])
            finals.append(worker(None))
        except BaseException as err:  # noqa: BLE001 (raised again below, in the caller's thread)
            errors.append(err)

    workers: list[Worker] = []
    threads: list[threading.Thread] = []
    try:
        for _ in range(processes):
            workers.append(Worker(name, args))
            threads.append(threading.Thread(target=drive, args=(workers[-1],), daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join()
    except BaseException as err:  # noqa: BLE001 (e.g. Ctrl-C, or no process could be started)
        errors.append(err)
    if errors:  # stop the workers at once; their threads then see the pipes close
        for worker in workers:
            worker.close(kill=True)
        for thread in threads:
            thread.join()
        raise errors[0]
    for worker in workers:
        worker.close()
    return [results[k] for k in range(len(results))], finals
