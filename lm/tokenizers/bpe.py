"""`ByteBPETokenizer`: byte-level byte-pair encoding (BPE), trained here or loaded from GPT-2's ranks.

The vocabulary starts with the 256 possible bytes, so any text can be encoded and nothing is ever
unknown. Training repeats one step: find the most frequent pair of adjacent tokens in the corpus and
make it a new token. Before counting, a regular expression cuts the text into pre-tokens (words,
numbers, punctuation runs, whitespace), as GPT-2 does, so tokens never span " the" and "." etc.

Ids: the bytes are ids 0..255 (id = byte value), merge k makes id 256 + k, special tokens come
last. GPT-2's ranks use the same layout with the 256 bytes in another order, so one encoder serves
both: a pre-token starts as single bytes, then the adjacent pair whose concatenation has the
lowest id ("rank") is joined, again and again, exactly as tiktoken does.

    tok = ByteBPETokenizer.train(text, vocab_size=2000)
    tok = ByteBPETokenizer.train(Path("corpus.txt"), 32_000)   # a file, streamed, counted in parallel
    tok.encode("To be, or not to be")          # -> ids
    tok.encode_batch(documents)                # many documents, over several processes when large
    tok.merges[:3]                             # the first merges, as (left id, right id)
    gpt2 = ByteBPETokenizer.gpt2()             # GPT-2's 50,257 tokens, same ids as tiktoken

What keeps pure Python within reach of the compiled libraries (bench/encode_throughput.py,
bench/bpe_train.py; the numbers are in chapter 2): ASCII text is pre-tokenized by the standard
library's `re`, twice as fast as `regex`; each distinct pre-token is merged once, then the ids of
the whole text are gathered in one C loop (`bpe_core.TokenCache`); training updates pair counts
only where a merge happened, with each word held as a str of one character per token so that
finding and replacing a pair runs in C; and pre-tokens are counted in several processes that do not
import torch (`bpe_core`). Where a C compiler is found, new pre-tokens are merged in C (lm/csrc/bpe.c),
and text under GPT-2's or GPT-4's pattern is encoded there whole: pre-tokens found by one scan over its
UTF-8 (with `regex`'s own Unicode classes), looked up in a C cache, merged when new (`bpe_core.TextEncoder`),
about 2.4 times tiktoken's speed on Shakespeare under GPT-2's pattern and 3 times under GPT-4's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import warnings
from collections import Counter, defaultdict
from heapq import heapify, heappop, heappush
from itertools import chain
from pathlib import Path
from typing import AbstractSet, Iterable, Iterator, Mapping, Sequence

import regex

from .base import (ENDOFTEXT, MAX_SPECIAL_LENGTH, MAX_SPECIAL_TOKENS, MAX_VOCAB_SIZE, TOKENIZERS,
                   EndOfTextSpecials, Tokenizer, TokenizerError, check_kind, check_size, short_repr)
from .bpe_core import (BYTES, GPT2_ASCII_PATTERN, GPT4_ASCII_PATTERN, LONG_PRETOKEN, NO_RANK,  # noqa: F401
                       LazyDecoder, Splitter, TokenCache, WorkerError, bpe, bpe_heap, cpu_count, cut_blocks,
                       cut_rule, encode_pieces, encode_text, find_cut, run_parallel, special_regex,
                       surrogate_message)
from .gpt2_ranks import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, load_gpt2_ranks

# GPT-4's pre-tokenizer (tiktoken's cl100k_base): case-insensitive contractions, numbers in groups
# of at most 3 digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# The same patterns for ASCII text, in the standard `re` (see bpe_core): the same pieces, faster.
ASCII_TWINS = {GPT2_PATTERN: GPT2_ASCII_PATTERN, GPT4_PATTERN: GPT4_ASCII_PATTERN}
CACHE_SIZE = 100_000  # pre-tokens remembered by encode; the cache is emptied when it is full
DECODE_IN_C = 64  # ids; decode_bytes hands longer lists to C (shorter ones cost less in Python)
PAUSE_MIN = 10_000  # characters; encode pauses the garbage collector (`collector_paused`) for longer texts
CUT_WINDOW = 4_096  # characters at the end of encode_iter's buffer searched for a cut (`find_cut`)
# Parallel work: below this many characters one process is faster. Workers start in ~60 ms, and
# the text travels to them through pipes while this process only feeds them: training on
# Shakespeare (5 MB) took 0.79 s with two workers and 0.65 s in one process (bench/bpe_train.py),
# while a 500 MB file trained in 19 s with two. The input travels in blocks of BATCH_CHARS.
PARALLEL_MIN_CHARS = 16_000_000
BATCH_CHARS = 1 << 19


# ---- pre-tokenization -----------------------------------------------------------------------------
def resolve_pattern(pattern: str | None) -> str | None:
    """A pattern name ("gpt2", "gpt4"), None (no split) or a regex, as the regex to use."""
    if pattern is None or pattern in PATTERNS.values():
        return pattern
    if not isinstance(pattern, str):
        raise TokenizerError(f"pattern must be a name {sorted(PATTERNS)}, None or a regex string, got {pattern!r}.")
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if pattern.isidentifier():  # a word is a name that was meant, not a useful regex
        raise TokenizerError(f"unknown pattern name {pattern!r}; use one of {sorted(PATTERNS)}, None (no split) "
                             f"or a regular expression.")
    try:
        compiled = regex.compile(pattern)
    except regex.error as err:
        raise TokenizerError(f"pattern {pattern!r} is not a valid regular expression: {err}.") from None
    if compiled.groups:
        raise TokenizerError(f"pattern {pattern!r} has capturing groups; write them as (?:...) so that each "
                             f"match is one whole pre-token.")
    return pattern


def check_saved_pattern(pattern, trust_pattern: bool = False) -> None:
    """Refuse a saved pattern that is not one of lm's own, unless the caller trusts it.

    A regex from a file is code that runs on every text: a crafted one can backtrack for minutes
    on a few dozen characters (e.g. nested repeats like (?:a|a)*b), and whether a regex can do that
    cannot be told by looking at it. GPT-2's and GPT-4's patterns cannot, so saved files may name
    them (or None); any other pattern loads only with `trust_pattern=True`.
    """
    if pattern is not None and not isinstance(pattern, str):
        raise TokenizerError(f"the saved tokenizer's pattern must be a string or None, got {type(pattern).__name__}.")
    if trust_pattern or pattern is None or pattern in PATTERNS or pattern in PATTERNS.values():
        return
    raise TokenizerError(f"the saved tokenizer's pattern {short_repr(pattern)} is not one of lm's patterns "
                         f"{sorted(PATTERNS)} or None. An unknown regex could run for hours on a short text, so it "
                         f"is not run; if you wrote this tokenizer yourself, load it with trust_pattern=True.")


class PreTokenizer:
    """Cuts text into pre-tokens with a regex (or not at all when the pattern is None); GPT-2's
    and GPT-4's patterns run as their faster `re` twins on ASCII text (`bpe_core.Splitter`)."""

    def __init__(self, pattern: str | None):
        self.pattern = resolve_pattern(pattern)
        self.ascii_pattern = ASCII_TWINS.get(self.pattern)
        # GPT-2's and GPT-4's patterns match every character; a custom one might skip some, which
        # would silently drop text, so its pieces are checked.
        self.check = self.pattern is not None and self.pattern not in PATTERNS.values()
        self._split = Splitter(self.pattern, self.ascii_pattern, self.check)

    def __call__(self, text: str) -> list[str]:
        try:
            return self._split(text)
        except ValueError as err:
            raise TokenizerError(str(err)) from None


# ---- counting pre-tokens, in parallel -------------------------------------------------------------
def _text_batches(texts, rule: str | None) -> Iterator[list[str]]:
    """The training input as batches (lists of str) of about BATCH_CHARS characters. A batch's
    texts are counted apart, so pre-tokens never span two of them: a long str or file is cut
    only where its pre-tokens stay the same (`bpe_core.find_cut` with `rule`), or not at all if
    `rule` is None."""
    if isinstance(texts, str):
        blocks = cut_blocks(texts, BATCH_CHARS, rule) if rule is not None else [texts]
        yield from ([block] for block in blocks)
    elif isinstance(texts, os.PathLike):
        yield from ([block] for block in _file_blocks(texts, rule))
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TokenizerError(f"training text must be str, an iterable of str or a pathlib.Path, got "
                             f"{type(texts).__name__}.")
    else:
        yield from _batches(texts, "training text must be str or an iterable of str")


def _batches(texts: Iterable[str], what: str = "encode_batch expects strings") -> Iterator[list[str]]:
    """Consecutive texts grouped into lists of about BATCH_CHARS characters, each checked to be a str."""
    batch, size = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"{what}, got an item of type {type(text).__name__}.")
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _file_blocks(path: os.PathLike, rule: str | None) -> Iterator[str]:
    """A UTF-8 file's text in blocks of about BATCH_CHARS characters, read as they are consumed:
    memory holds about one block (plus, where no cut is possible for a while, the text since the
    last cut; each part of it is searched for a cut once). Line ends stay as they are in the file
    (newline=""): "\\r\\n" is text that a byte-level tokenizer sees."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            pending, searched = "", 0  # no cut before `searched` (beyond the first half block)
            while chunk := file.read(BATCH_CHARS):
                pending += chunk
                while rule is not None and len(pending) >= BATCH_CHARS:
                    cut = find_cut(pending, max(BATCH_CHARS // 2, searched), rule)
                    if cut < 0:
                        searched = max(len(pending) - 64, 0)  # a cut needs a few characters after it
                        break
                    yield pending[:cut]
                    pending, searched = pending[cut:], 0
            if pending:
                yield pending
    except FileNotFoundError:
        raise TokenizerError(f"the training file {str(path)!r} does not exist; pass a path to a UTF-8 text file "
                             f"(or the text itself as a str).") from None
    except UnicodeDecodeError as err:
        raise TokenizerError(f"the training file {str(path)!r} is not UTF-8 text ({err}); convert it first, "
                             f"e.g. with iconv.") from None


def _peek_size(batches: Iterator[list[str]], enough: int) -> tuple[Iterator[list[str]], bool]:
    """`batches` unchanged, and whether they hold at least `enough` characters (reads only that far)."""
    head, size = [], 0
    for batch in batches:
        head.append(batch)
        size += sum(map(len, batch))
        if size >= enough:
            return chain(head, batches), True
    return iter(head), False


def resolve_processes(processes: int | None, argument: str = "processes") -> int | None:
    """None (choose by input size) or a positive int; anything else is refused."""
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise TokenizerError(f"{argument}={processes!r} must be a positive int (1: this process only) or None "
                             f"(one per CPU when the input is large).")
    return processes


def count_pretokens(texts: str | Iterable[str] | os.PathLike, pretokenize: PreTokenizer,
                    special_tokens: Sequence[str] = (), processes: int | None = 1) -> Counter:
    """How often each pre-token occurs in a str, an iterable of str, or a UTF-8 file (a Path).

    Special tokens written in the text are cut out first, so that they are never learned as
    ordinary text. Pre-tokens never span two strings of an iterable. The input is read in batches
    and counted in `processes` processes (None: one per CPU when it holds at least
    PARALLEL_MIN_CHARS characters, else 1); the counts are the same whatever the number.
    """
    processes = resolve_processes(processes)
    # A long text can be cut at newlines only for GPT-2's and GPT-4's patterns, and only if no
    # special token contains a newline (a cut could fall inside one).
    rule = None if any("\n" in s for s in special_tokens) else cut_rule(pretokenize.ascii_pattern)
    batches = _text_batches(texts, rule)
    if processes is None:
        batches, large = _peek_size(batches, PARALLEL_MIN_CHARS)
        processes = cpu_count() if large else 1
    args = (pretokenize.pattern, pretokenize.ascii_pattern, pretokenize.check, list(special_tokens))
    try:
        _, finals = run_parallel("count", args, batches, processes)
    except TokenizerError:
        raise
    except (WorkerError, ValueError) as err:  # e.g. a custom pattern that skips characters
        raise TokenizerError(str(err)) from None
    counts = finals[0]
    for more in finals[1:]:
        counts.update(more)
    return counts


# ---- training ------------------------------------------------------------------------------------
def train_merges(word_counts: Mapping[bytes, int], num_merges: int, verbose: bool = False) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from words (bytes) and their counts.

    Each step merges the most frequent adjacent pair; among equal counts the smallest pair
    (left id, then right id) wins, so the result is deterministic. Instead of recounting every
    pair after each merge, the counts are updated where the merge happened:
      pair_counts  pair -> how often it occurs (weighted by word counts)
      where        pair -> the words that contain (or once contained) it, a word once per occurrence
      heap         (-count, pair), with stale entries fixed when they reach the top.
    A merge only touches the words in `where[pair]`, and in each of them only the neighbours of
    the merged pair change: (left, a) and (b, right) disappear, (left, new) and (new, right) appear.

    To keep that loop in C as much as possible, a word is a str with one character per token
    (chr(id)) and a pair is a 2-character str: `word.find(pair)` finds the merges (and skips a
    word that no longer holds the pair), `word.replace(pair, new)` makes them, left to right, as
    BPE does ("aaa" -> new + "a"), and comparing two pairs compares (left id, right id).
    The new pairs' counts are summed once per merge from the words they occur in. Python's cyclic
    garbage collector is paused meanwhile: the loop makes no reference cycles, but its many new
    lists would make the collector walk all of `where` again and again (about 8% of the time).
    `naive_bpe.train_naive` recounts everything instead; the tests check that both agree.
    """
    with collector_paused():
        return _train_merges(word_counts, num_merges, verbose)


@contextlib.contextmanager
def collector_paused():
    """Pause Python's cyclic garbage collector inside the block (and restore it after).

    Training and encoding make many small containers (tuples of ids, lists of parts) and no
    reference cycles; each batch of allocations would otherwise start a collection that walks the
    young objects for nothing. Measured on Shakespeare: training about 8% faster, encoding 5%."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _train_merges(word_counts: Mapping[bytes, int], num_merges: int, verbose: bool) -> list[tuple[int, int]]:
    words = [w.decode("latin-1") for w in word_counts if len(w) > 1]  # byte b -> chr(b)
    counts = [n for w, n in word_counts.items() if len(w) > 1]
    weight = counts.__getitem__
    where: defaultdict[str, list[int]] = defaultdict(list)
    for i, word in enumerate(words):
        for k in range(len(word) - 1):
            where[word[k : k + 2]].append(i)
    pair_counts = {pair: sum(map(weight, found)) for pair, found in where.items()}
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapify(heap)

    merges: list[tuple[int, int]] = []
    vocab = list(BYTES)  # for the progress report
    report_every = max(1, num_merges // 10)
    while len(merges) < num_merges and heap:
        neg_count, pair = heappop(heap)
        count = pair_counts[pair]
        if count != -neg_count:  # stale: counts only ever fall, so re-queue with the true count
            if count > 0:
                heappush(heap, (-count, pair))
            continue
        a, b = pair
        new = chr(256 + len(merges))
        merges.append((ord(a), ord(b)))
        vocab.append(vocab[ord(a)] + vocab[ord(b)])
        if verbose and (len(merges) % report_every == 0 or len(merges) == 1):
            shown = " + ".join(repr(bytes_to_str(vocab[ord(c)])) for c in pair)
            print(f"merge {len(merges)}/{num_merges}: {shown} -> {ord(new)} {bytes_to_str(vocab[-1])!r} "
                  f"({count:,} times)")

        made: defaultdict[str, list[int]] = defaultdict(list)  # new pair -> a word per occurrence
        for i in set(where.pop(pair)):
            word = words[i]
            j = word.find(pair)
            if j < 0:  # `where` keeps stale entries; this word no longer holds the pair
                continue
            n, end, last = counts[i], -1, len(word) - 2
            while j >= 0:
                if j:
                    if j == end:  # the left neighbour is the previous match, merged too: "abab"
                        made[new + a].pop()  # (new, a) was never there: it is (new, new)
                        made[new + new].append(i)
                    else:
                        pair_counts[word[j - 1 : j + 1]] -= n
                        made[word[j - 1] + new].append(i)
                if j < last:
                    pair_counts[word[j + 1 : j + 3]] -= n
                    made[new + word[j + 2]].append(i)
                end = j + 2
                j = word.find(pair, end)
            words[i] = word.replace(pair, new)
        pair_counts[pair] = 0
        for made_pair, found in made.items():
            if found:
                pair_counts[made_pair] = count = sum(map(weight, found))
                where[made_pair] = found
                heappush(heap, (-count, made_pair))
    return merges


# ---- readable bytes ------------------------------------------------------------------------------
_ESCAPE = regex.compile(r"\\(?:\\|x[0-9a-f]{2})")


def bytes_to_str(data: bytes) -> str:
    """Bytes as readable text: valid UTF-8 as itself, other bytes as \\xNN, a backslash as \\\\."""
    return data.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


def str_to_bytes(text: str) -> bytes:
    """Inverse of `bytes_to_str`."""
    out, pos = bytearray(), 0
    for match in _ESCAPE.finditer(text):
        out += text[pos : match.start()].encode("utf-8")
        escape = match.group()
        out += b"\\" if escape == "\\\\" else bytes([int(escape[2:], 16)])
        pos = match.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


# ---- the tokenizer -------------------------------------------------------------------------------
@TOKENIZERS.register("bpe")
class ByteBPETokenizer(EndOfTextSpecials, Tokenizer):
    """Byte-level BPE with a GPT-style pre-tokenizer and special tokens.

    `vocab[i]` is the bytes of token i for every ordinary id; ids 0..255 must be the 256 single
    bytes (in any order) and every later token the concatenation of two earlier ones. Special
    tokens (name -> id) take ids after the ordinary ones and are never split or merged.

    Build one with `train`, `gpt2`, `from_tiktoken_ranks`, `load` or `from_dict`.
    """

    kind = "bpe"

    def __init__(self, vocab: Sequence[bytes], special_tokens: Mapping[str, int] | None = None,
                 pattern: str | None = "gpt2", merges: Sequence[tuple[int, int]] | None = None):
        vocab = [bytes(t) for t in vocab]
        if sorted(vocab[:256]) != BYTES:
            raise TokenizerError("ids 0..255 of a byte-level BPE vocabulary must be the 256 single bytes.")
        special_tokens = dict(special_tokens or {})
        check_size("the number of special tokens", len(special_tokens), MAX_SPECIAL_TOKENS)
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise TokenizerError(f"special token names must be non-empty strings, got {name!r}.")
            check_size(f"the length of special token {name[:20]!r}...", len(name), MAX_SPECIAL_LENGTH)
            if not isinstance(i, int) or i < len(vocab):
                raise TokenizerError(f"special token {name!r} has id {short_repr(i)}; special ids must be integers "
                                     f"from {len(vocab)} (after the {len(vocab)} ordinary tokens) up.")
            check_size(f"the id of special token {name!r}", i, MAX_VOCAB_SIZE - 1)  # every id below it gets a row
        if len(set(special_tokens.values())) != len(special_tokens):
            raise TokenizerError(f"special tokens share ids: {special_tokens}.")

        self.pretokenize = PreTokenizer(pattern)
        self.vocab = vocab
        self._ranks: dict[bytes, int] = {}
        for i, token in enumerate(vocab):
            self._ranks.setdefault(token, i)  # a repeated byte string keeps its first (lowest) id
        self._specials = special_tokens
        size = max([len(vocab), *(i + 1 for i in special_tokens.values())])
        self._id_bytes: list[bytes | None] = vocab + [None] * (size - len(vocab))  # None: an unused id
        for name, i in special_tokens.items():
            self._id_bytes[i] = name.encode("utf-8")
        self._merges = [tuple(m) for m in merges] if merges is not None else None
        self._special_regexes: dict[frozenset, regex.Pattern | None] = {}
        # (allowed_special, disallowed_special) as given, when hashable -> (allowed regex, disallowed regex)
        self._special_plans: dict[tuple, tuple[regex.Pattern | None, regex.Pattern | None]] = {}
        self._decoder = LazyDecoder()  # the C decoding, made on the first long decode
        self._max_special_len = max(map(len, special_tokens), default=0)
        self._cache = TokenCache(self._ranks, CACHE_SIZE)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str | Iterable[str] | os.PathLike, vocab_size: int,
              special_tokens: Sequence[str] = (ENDOFTEXT,), pattern: str | None = "gpt2", verbose: bool = False,
              processes: int | None = None) -> "ByteBPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`: a str, an iterable
        of str such as documents or lines (pre-tokens never span two of them), or the path of a
        UTF-8 file (a `pathlib.Path`; a plain str is always text), read in blocks so that memory
        holds the distinct pre-tokens and their counts, not the corpus.

        Each merge joins the most frequent adjacent pair; equal counts go to the smallest pair of
        ids (left id first), so the same text always gives the same merges. Special tokens written
        in the text are cut out and never learned. Training stops early, with a warning, when no
        pair is left to merge: the vocabulary is then smaller than asked.

        `pattern`: "gpt2" (default), "gpt4", None (no split: each text is one sequence, fine for
        short demos, slow on a large corpus) or a regex of your own.

        `processes`: how many processes count the pre-tokens (None: one per CPU when the input
        holds at least PARALLEL_MIN_CHARS characters, else 1); the merges are the same whatever
        the number. The merges themselves are learned in this process.
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise TokenizerError(f"special_tokens has duplicates: {special_tokens}.")
        if any(not isinstance(s, str) or not s for s in special_tokens):
            raise TokenizerError(f"special tokens must be non-empty strings, got {special_tokens!r}.")
        minimum = 256 + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise TokenizerError(f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs the 256 bytes "
                                 f"plus {len(special_tokens)} special token(s); use vocab_size >= {minimum}.")
        pretokenize = PreTokenizer(pattern)
        counts = count_pretokens(text, pretokenize, special_tokens, processes)
        if not counts:
            raise TokenizerError("the training text is empty (or holds only special tokens); pass the corpus "
                                 "to learn the merges from.")
        word_counts = Counter()
        for piece, n in counts.items():
            try:
                word_counts[piece.encode("utf-8")] += n
            except UnicodeEncodeError:
                raise TokenizerError(surrogate_message(piece)) from None
        num_merges = vocab_size - minimum
        merges = train_merges(word_counts, num_merges, verbose=verbose)
        if len(merges) < num_merges:
            warnings.warn(f"the training text has only enough pairs for {len(merges)} merges, not {num_merges}: "
                          f"the vocabulary has {minimum + len(merges)} tokens instead of {vocab_size}.",
                          stacklevel=2)
        vocab = list(BYTES)
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        specials = {name: len(vocab) + k for k, name in enumerate(special_tokens)}
        return cls(vocab, specials, pretokenize.pattern, merges)

    @classmethod
    def from_tiktoken_ranks(cls, ranks: Mapping[bytes, int], pattern: str | None = GPT2_PATTERN,
                            special_tokens: Mapping[str, int] = GPT2_SPECIAL_TOKENS) -> "ByteBPETokenizer":
        """A tokenizer from tiktoken's `mergeable_ranks` ({token bytes: rank}); ids are the ranks."""
        vocab = sorted(ranks, key=ranks.__getitem__)
        if [ranks[t] for t in vocab] != list(range(len(vocab))):
            raise TokenizerError("ranks must number the tokens 0, 1, ..., n-1 without gaps or repeats.")
        if any(len(t) != 1 for t in vocab[:256]):
            raise TokenizerError("ranks 0..255 must be the 256 single bytes (as in GPT-2's and GPT-4's ranks).")
        return cls(vocab, special_tokens, pattern)

    @classmethod
    def gpt2(cls) -> "ByteBPETokenizer":
        """GPT-2's tokenizer (50,257 tokens): the same ids as tiktoken's "gpt2" encoding."""
        return cls.from_tiktoken_ranks(load_gpt2_ranks(), GPT2_PATTERN, GPT2_SPECIAL_TOKENS)

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def pattern(self) -> str | None:
        return self.pretokenize.pattern

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges in order, as (left id, right id): merge k made token 256 + k."""
        if self._merges is None:  # built from ranks: find the two tokens each one was made from
            merges = []
            earlier = {token: i for i, token in enumerate(self.vocab[:256])}
            for i in range(256, len(self.vocab)):
                parts = bpe(self.vocab[i], earlier)  # encoded with the tokens ranked below i only
                if len(parts) != 2:
                    raise TokenizerError(f"token {i} ({self.vocab[i]!r}) is not the join of two earlier tokens.")
                merges.append((earlier[parts[0]], earlier[parts[1]]))
                earlier.setdefault(self.vocab[i], i)
            self._merges = merges
        return list(self._merges)

    def token_bytes(self, i: int) -> bytes:
        """The bytes of token `i` (a special token's name, UTF-8 encoded)."""
        return self.decode_bytes([i])

    def __repr__(self) -> str:
        return (f"ByteBPETokenizer(vocab_size={self.vocab_size}, specials={sorted(self._specials)}, "
                f"pattern={self._pattern_name()!r})")

    def _pattern_name(self) -> str | None:
        return next((name for name, p in PATTERNS.items() if p == self.pattern), self.pattern)

    # ---- encode --------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: str | AbstractSet[str] = "all",
               disallowed_special: str | AbstractSet[str] = ()) -> list[int]:
        """Text to ids.

        `allowed_special`: which special tokens written in the text become their ids: "all"
        (default, so "<|endoftext|>" separates documents), "none" (all are encoded as ordinary
        text, like tiktoken's `encode_ordinary`) or a set of names. Where specials overlap, the
        longest match wins. `disallowed_special` ("all" or a set of names; default none): raise if
        the text contains one of these instead of encoding it as text. ("all" means all that are
        not allowed; tiktoken's own default is allowed_special=set(), disallowed_special="all".)
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}.")
        allowed = self._allowed_regex(allowed_special, disallowed_special, text)
        ids: list[int] = []
        if len(text) < PAUSE_MIN:  # a short text makes too few objects for a collection to matter
            self._encode_with_specials(text, allowed, ids)
            return ids
        with collector_paused():
            self._encode_with_specials(text, allowed, ids)
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special: str | AbstractSet[str] = "all",
                     disallowed_special: str | AbstractSet[str] = (), processes: int | None = None) -> list[list[int]]:
        """`[encode(text) for text in texts]`, spread over `processes` processes for a large corpus.

        `processes`: None (default) uses one per CPU when the texts hold at least
        PARALLEL_MIN_CHARS characters in all, else only this one; 1 never starts a process. The
        workers are fresh Python processes that load only `bpe_core` (no torch), so this is safe in
        Jupyter and after torch has started threads; each gets a copy of the ranks (GPT-2's: ~1 MB)
        and batches of about BATCH_CHARS characters. The ids are exactly those of `encode`.
        """
        processes = resolve_processes(processes)
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise TokenizerError(f"encode_batch expects a list of str, got {type(texts).__name__}; "
                                 f"use encode for a single text.")
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TokenizerError(f"encode_batch expects strings, got an item of type {type(bad).__name__}.")
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if processes is None:
            processes = cpu_count() if sum(map(len, texts)) >= PARALLEL_MIN_CHARS else 1
        if processes == 1:
            return [self.encode(text, allowed_special, disallowed_special) for text in texts]
        if disallowed:
            found = self._special_regex(disallowed)
            for text in texts:
                self._check_disallowed(text, found)
        args = (self._ranks, self.pattern, self.pretokenize.ascii_pattern, self.pretokenize.check,
                {name: self._specials[name] for name in allowed}, CACHE_SIZE)
        try:
            results, _ = run_parallel("encode", args, _batches(texts), processes)
        except (WorkerError, ValueError) as err:
            raise TokenizerError(str(err)) from None
        return [ids for batch in results for ids in batch]

    def encode_iter(self, lines: Iterable[str], allowed_special: str | AbstractSet[str] = "all",
                    disallowed_special: str | AbstractSet[str] = (), chunk_chars: int = 1 << 16) -> Iterator[int]:
        """Encode a stream of strings (e.g. the lines of a big file) in bounded memory.

        The ids are exactly those of `encode("".join(lines))`: text is gathered until about
        `chunk_chars` characters, then encoded up to a point where the pre-tokenizer is sure to cut
        whatever follows. For GPT-2's and GPT-4's patterns that is, first, the last line break between
        printable characters in the buffer's final CUT_WINDOW characters (`find_cut`), the text before it
        encoded as `encode` would (whole, in C); failing that, a point before the last two
        pre-tokens that hold a non-space character (a pre-token is decided by the text up to two
        characters after it, or up to the end of its whitespace run). Memory grows past
        `chunk_chars` only on a stretch without such a point: long whitespace, or any text
        between special tokens when `pattern` is None; what is kept is scanned again only each time
        it doubles, so time stays linear. (A custom pattern keeps the guarantee only
        if its pre-tokens are decided as locally; simply encoding line by line would not: GPT-2's
        pattern splits "  \n\n" differently when the next line follows.)
        """
        pending: list[str] = []
        size, next_look = 0, chunk_chars
        for line in lines:
            if not isinstance(line, str):
                raise TokenizerError(f"encode_iter expects strings, got an item of type {type(line).__name__}.")
            pending.append(line)
            size += len(line)
            if size >= next_look:
                buffer = "".join(pending)
                allowed = self._allowed_regex(allowed_special, disallowed_special, buffer)
                ids: list[int] = []
                cut = self._encode_safe_prefix(buffer, allowed, ids)
                yield from ids
                pending, size = [buffer[cut:]], len(buffer) - cut
                # What is left is looked at again once it has doubled, not at every line: a long
                # stretch without a safe point is then scanned O(log n) times, in O(n) time in all.
                next_look = max(chunk_chars, 2 * size)
        yield from self.encode("".join(pending), allowed_special, disallowed_special)

    def _allowed_regex(self, allowed_special, disallowed_special, text: str) -> regex.Pattern | None:
        """The regex of the allowed special tokens; raises if `text` holds a disallowed one. What the
        arguments mean is worked out once for each pair of them ("all", "none", frozensets...)."""
        key = (allowed_special, disallowed_special)
        try:
            plan = self._special_plans.get(key)
        except TypeError:  # a set: not hashable, so worked out each time
            plan, key = None, None
        if plan is None:
            allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
            plan = (self._special_regex(allowed), self._special_regex(disallowed) if disallowed else None)
            if key is not None:
                self._special_plans[key] = plan
        if plan[1] is not None:
            self._check_disallowed(text, plan[1])
        return plan[0]

    def _special_sets(self, allowed_special, disallowed_special) -> tuple[set[str], set[str]]:
        """The names of the allowed and of the disallowed special tokens."""
        allowed = self._special_names(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = set(self._specials) - allowed
        else:
            disallowed = self._special_names(disallowed_special, "disallowed_special") - allowed
        return allowed, disallowed

    def _check_disallowed(self, text: str, disallowed: regex.Pattern) -> None:
        found = disallowed.search(text)
        if found:
            raise TokenizerError(f"the text contains the special token {found.group()!r}, which is disallowed; "
                                 f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as a "
                                 f"special token, or leave it out of disallowed_special to encode it as text.")

    def _special_names(self, names, argument: str) -> set[str]:
        if names == "all":
            return set(self._specials)
        if names == "none" or not names:
            return set()
        if isinstance(names, str) or not isinstance(names, AbstractSet):
            raise TokenizerError(f"{argument}={names!r} must be 'all', 'none' or a set of special token names.")
        unknown = sorted(set(names) - set(self._specials))
        if unknown:
            raise TokenizerError(f"{argument} names unknown special token(s) {unknown}; this tokenizer's special "
                                 f"tokens are {sorted(self._specials)}.")
        return set(names)

    def _special_regex(self, names: set[str]) -> regex.Pattern | None:
        key = frozenset(names)
        if key not in self._special_regexes:
            self._special_regexes[key] = special_regex(names)
        return self._special_regexes[key]

    def _token_cache(self) -> TokenCache:
        """The pre-token cache, made anew if the ranks or CACHE_SIZE changed since it was filled."""
        if self._cache.ranks is not self._ranks or self._cache.limit != CACHE_SIZE:
            self._cache = TokenCache(self._ranks, CACHE_SIZE)
        return self._cache

    def _encode_with_specials(self, text: str, specials: regex.Pattern | None, ids: list[int]) -> None:
        try:
            encode_text(text, self.pretokenize, self._token_cache(), specials, self._specials, ids)
        except UnicodeEncodeError as err:
            raise TokenizerError(surrogate_message(err.object)) from None

    def _encode_ordinary(self, pieces: list[str], ids: list[int]) -> None:
        try:
            encode_pieces(pieces, self._token_cache(), ids)
        except UnicodeEncodeError as err:
            raise TokenizerError(surrogate_message(err.object)) from None

    def _encode_safe_prefix(self, buffer: str, specials: regex.Pattern | None, ids: list[int]) -> int:
        """Encode the part of `buffer` whose ids cannot change whatever text follows it; return
        where that part ends (0 when no such point is known yet)."""
        matches = list(specials.finditer(buffer)) if specials is not None else []
        tail_start = matches[-1].end() if matches else 0
        cut = self._last_cut(buffer, tail_start)
        if cut > 0:  # GPT-2's or GPT-4's pattern: the text before it is encoded as encode does, C path included
            self._encode_with_specials(buffer[:cut], specials, ids)
            return cut
        pieces = self.pretokenize(buffer[tail_start:])
        pos, seen = len(buffer), 0
        for k in range(len(pieces) - 1, -1, -1):
            pos -= len(pieces[k])
            if not pieces[k].isspace():
                seen += 1
                # pieces[:k] are final: two non-space pieces follow, and no special token that
                # starts before `pos` can reach past the end of the buffer
                if seen >= 2 and len(buffer) - pos >= self._max_special_len:
                    self._encode_with_specials(buffer[:tail_start], specials, ids)
                    self._encode_ordinary(pieces[:k], ids)
                    return pos
        # no point in the tail: cut before the last special token, if it cannot grow any longer
        if matches and len(buffer) - matches[-1].start() >= self._max_special_len:
            self._encode_with_specials(buffer[: matches[-1].start()], specials, ids)
            return matches[-1].start()
        return 0

    def _last_cut(self, buffer: str, start: int) -> int:
        """The last place in the final CUT_WINDOW characters of `buffer`, at or after `start`, where
        `find_cut` allows a cut under this tokenizer's pattern and no special token can reach across
        (one could only start within `_max_special_len` of the end); -1 if there is none or the pattern
        has no cut rule."""
        rule = cut_rule(getattr(self.pretokenize, "ascii_pattern", None))
        limit = len(buffer) - self._max_special_len
        if rule is None or limit <= start:
            return -1
        cut, at = -1, find_cut(buffer, max(start, limit - CUT_WINDOW), rule)
        while 0 <= at <= limit:
            cut, at = at, find_cut(buffer, at + 1, rule)
        return cut

    # ---- decode --------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to the raw bytes they stand for (special tokens as their UTF-8 names). A list of ints goes
        to C where the C file runs (`bpe_core.NativeDecoder`), anything else, or a bad id, to Python."""
        if type(ids) is list and len(ids) >= DECODE_IN_C:
            decoded = self._decoder(self._id_bytes, ids)
            if decoded is not None:
                return decoded
        ids = self._check_ids(ids)
        table = self._id_bytes
        try:
            return b"".join([table[i] for i in ids])
        except TypeError:  # a None: an id between the ordinary and the special ones
            unused = next(i for i in ids if table[i] is None)
            raise TokenizerError(f"id {unused} is not assigned to any token in this vocabulary.") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids to text. Ids that end inside a multi-byte character decode to U+FFFD with the
        default `errors="replace"`; "strict" raises instead (see `bytes.decode`)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data: the merges as pairs of readable strings (see `bytes_to_str`), in order."""
        data = {"kind": self.kind, "pattern": self.pattern, "special_tokens": dict(self._specials)}
        if self.vocab[:256] != BYTES:  # GPT-2 numbers the bytes in its own order
            data["byte_order"] = [t[0] for t in self.vocab[:256]]
        data["merges"] = [[bytes_to_str(self.vocab[a]), bytes_to_str(self.vocab[b])] for a, b in self.merges]
        return data

    @classmethod
    def from_dict(cls, data: dict, trust_pattern: bool = False) -> "ByteBPETokenizer":
        """Rebuild from `to_dict()` data; a pattern other than GPT-2's or GPT-4's (or None) is refused
        unless `trust_pattern=True` (see `check_saved_pattern`)."""
        check_kind(data, cls.kind)
        missing = [key for key in ("pattern", "special_tokens", "merges") if key not in data]
        if missing:
            raise TokenizerError(f"the saved bpe tokenizer lacks {missing}; save it again with .save().")
        check_saved_pattern(data["pattern"], trust_pattern)
        if not isinstance(data["special_tokens"], dict):
            raise TokenizerError(f"special_tokens must map names to ids, got {type(data['special_tokens']).__name__}.")
        if not isinstance(data["merges"], list):
            raise TokenizerError(f"merges must be a list of pairs, got {type(data['merges']).__name__}.")
        check_size("the vocabulary of the saved bpe tokenizer", 256 + len(data["merges"]), MAX_VOCAB_SIZE)
        order = data.get("byte_order", list(range(256)))
        if not (isinstance(order, list) and all(isinstance(b, int) for b in order)
                and sorted(order) == list(range(256))):
            raise TokenizerError("byte_order must list each of the 256 byte values once.")
        vocab = [BYTES[b] for b in order]
        ranks = {t: i for i, t in enumerate(vocab)}
        merges = []
        for k, pair in enumerate(data["merges"]):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise TokenizerError(f"merge {k} is {short_repr(pair)}; each merge must be a pair of token strings.")
            left, right = str_to_bytes(pair[0]), str_to_bytes(pair[1])
            if left not in ranks or right not in ranks:
                raise TokenizerError(f"merge {k} {pair!r} joins a token that no earlier merge made.")
            merges.append((ranks[left], ranks[right]))
            vocab.append(left + right)
            ranks.setdefault(left + right, len(vocab) - 1)
        return cls(vocab, data["special_tokens"], data["pattern"], merges)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON, one merge per line."""
        data = self.to_dict()
        merges = data.pop("merges")
        head = json.dumps(data, ensure_ascii=False, indent=1)[:-2]  # without the closing "\n}"
        lines = ",\n".join("  " + json.dumps(m, ensure_ascii=False) for m in merges)
        Path(path).write_text(f'{head},\n "merges": [\n{lines}\n ]\n}}\n', encoding="utf-8")
