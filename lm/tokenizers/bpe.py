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
    tok.encode("To be, or not to be")          # -> ids
    tok.merges[:3]                             # the first merges, as (left id, right id)
    gpt2 = ByteBPETokenizer.gpt2()             # GPT-2's 50,257 tokens, same ids as tiktoken
"""

from __future__ import annotations

import heapq
import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import AbstractSet, Iterable, Iterator, Mapping, Sequence

import regex

from .base import (ENDOFTEXT, MAX_SPECIAL_LENGTH, MAX_SPECIAL_TOKENS, MAX_VOCAB_SIZE, TOKENIZERS,
                   EndOfTextSpecials, Tokenizer, TokenizerError, check_kind, check_size, short_repr)
from .gpt2_ranks import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, load_gpt2_ranks

# GPT-4's pre-tokenizer (tiktoken's cl100k_base): case-insensitive contractions, numbers in groups
# of at most 3 digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
CACHE_SIZE = 100_000  # pre-tokens remembered by encode; the cache is emptied when it is full
BYTES = [bytes([b]) for b in range(256)]
NO_RANK = 2**63  # the rank of a pair that is not a token
LONG_PRETOKEN = 64  # bytes; longer pre-tokens are split by `bpe_heap`, whose cost grows as n log n, not n²


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
    """Cuts text into pre-tokens with a regex (or not at all when the pattern is None)."""

    def __init__(self, pattern: str | None):
        self.pattern = resolve_pattern(pattern)
        self._findall = regex.compile(self.pattern).findall if self.pattern is not None else None
        # GPT-2's and GPT-4's patterns match every character; a custom one might skip some, which
        # would silently drop text, so its pieces are checked.
        self._check = self.pattern is not None and self.pattern not in PATTERNS.values()

    def __call__(self, text: str) -> list[str]:
        if self._findall is None:
            return [text] if text else []
        pieces = self._findall(text)
        if self._check and sum(map(len, pieces)) != len(text):
            raise TokenizerError(f"pattern {self.pattern!r} skips some characters of the text, which would be "
                                 f"lost; end it with an alternative that matches anything, e.g. |\\s+|.")
        return pieces


def special_regex(names: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds the special tokens, longest first where one is a prefix of another."""
    names = sorted(names, key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in names)) if names else None


def count_pretokens(texts: str | Iterable[str], pretokenize: PreTokenizer,
                    special_tokens: Sequence[str] = ()) -> Counter:
    """How often each pre-token occurs. Special tokens written in the text are cut out first, so
    that they are never learned as ordinary text. Pre-tokens never span two strings of an iterable."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TokenizerError(f"training text must be str or an iterable of str, got {type(texts).__name__}.")
    specials = special_regex(special_tokens)
    counts: Counter = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"training text must be str or an iterable of str, got an item of type "
                                 f"{type(text).__name__}.")
        for segment in (specials.split(text) if specials is not None else [text]):
            counts.update(pretokenize(segment))
    return counts


# ---- training ------------------------------------------------------------------------------------
def train_merges(word_counts: Mapping[bytes, int], num_merges: int, verbose: bool = False) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from words (bytes) and their counts.

    Each step merges the most frequent adjacent pair; among equal counts the smallest pair
    (left id, then right id) wins, so the result is deterministic. Instead of recounting every
    pair after each merge, the counts are updated where the merge happened:
      pair_counts  pair -> how often it occurs (weighted by word counts)
      where        pair -> ids of the words that contain (or once contained) it
      heap         (-count, pair), with stale entries fixed when they reach the top.
    A merge only touches the words in `where[pair]`, and in each of them only the neighbours of
    the merged pair change: (left, a) and (b, right) disappear, (left, new) and (new, right) appear.
    `naive_bpe.train_naive` recounts everything instead; the tests check that both agree.
    """
    words = [list(w) for w in word_counts if len(w) > 1]
    counts = [word_counts[w] for w in word_counts if len(w) > 1]
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    vocab = list(BYTES)  # for the progress report
    report_every = max(1, num_merges // 10)
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale: counts only ever fall, so re-queue with the true count
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        new = 256 + len(merges)
        merges.append(pair)
        del pair_counts[pair]
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        if verbose and (len(merges) % report_every == 0 or len(merges) == 1):
            shown = " + ".join(repr(bytes_to_str(vocab[i])) for i in pair)
            print(f"merge {len(merges)}/{num_merges}: {shown} -> {new} {bytes_to_str(vocab[new])!r} ({count:,} times)")

        a, b = pair
        new_pairs = set()
        for i in where.pop(pair):
            word, n = words[i], counts[i]
            if a not in word:  # `where` keeps stale entries; this word no longer holds the pair
                continue
            merged = []
            j, length = 0, len(word)
            while j < length:
                if j + 1 < length and word[j] == a and word[j + 1] == b:
                    if merged:  # the left neighbour (already merged, if it was a match too)
                        left = merged[-1]
                        pair_counts[(left, a)] -= n
                        pair_counts[(left, new)] += n
                        new_pairs.add((left, new))
                        where[(left, new)].add(i)
                    if j + 2 < length:
                        right = word[j + 2]
                        pair_counts[(b, right)] -= n
                        pair_counts[(new, right)] += n
                        new_pairs.add((new, right))
                        where[(new, right)].add(i)
                    merged.append(new)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
        pair_counts.pop(pair, None)  # (a, a) merges decrement their own pair above
        for p in new_pairs:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


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
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i < len(pair_ranks):  # only the new token's two neighbouring pairs change
            pair_ranks[i] = get(parts[i] + parts[i + 1], NO_RANK)
        if i > 0:
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
        self._max_special_len = max(map(len, special_tokens), default=0)
        self._cache: dict[str, list[int]] = {}

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (ENDOFTEXT,),
              pattern: str | None = "gpt2", verbose: bool = False) -> "ByteBPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text` (a str, or an iterable
        of str such as documents or lines; pre-tokens never span two of them).

        Each merge joins the most frequent adjacent pair; equal counts go to the smallest pair of
        ids (left id first), so the same text always gives the same merges. Special tokens written
        in the text are cut out and never learned. Training stops early, with a warning, when no
        pair is left to merge: the vocabulary is then smaller than asked.

        `pattern`: "gpt2" (default), "gpt4", None (no split: each text is one sequence, fine for
        short demos, slow on a large corpus) or a regex of your own.
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
        counts = count_pretokens(text, pretokenize, special_tokens)
        if not counts:
            raise TokenizerError("the training text is empty (or holds only special tokens); pass the corpus "
                                 "to learn the merges from.")
        word_counts = Counter()
        for piece, n in counts.items():
            word_counts[piece.encode("utf-8")] += n
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
        self._encode_with_specials(text, allowed, ids)
        return ids

    def encode_iter(self, lines: Iterable[str], allowed_special: str | AbstractSet[str] = "all",
                    disallowed_special: str | AbstractSet[str] = (), chunk_chars: int = 1 << 16) -> Iterator[int]:
        """Encode a stream of strings (e.g. the lines of a big file) in bounded memory.

        The ids are exactly those of `encode("".join(lines))`: text is gathered until about
        `chunk_chars` characters, then encoded up to a point where the pre-tokenizer is sure to cut
        whatever follows. For GPT-2's and GPT-4's patterns such a point lies before the last two
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
        """The regex of the allowed special tokens; raises if `text` holds a disallowed one."""
        allowed = self._special_names(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = set(self._specials) - allowed
        else:
            disallowed = self._special_names(disallowed_special, "disallowed_special") - allowed
        if disallowed:
            found = self._special_regex(disallowed).search(text)
            if found:
                raise TokenizerError(f"the text contains the special token {found.group()!r}, which is disallowed; "
                                     f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as a "
                                     f"special token, or leave it out of disallowed_special to encode it as text.")
        return self._special_regex(allowed)

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

    def _encode_with_specials(self, text: str, specials: regex.Pattern | None, ids: list[int]) -> None:
        start = 0
        if specials is not None:
            for match in specials.finditer(text):
                self._encode_ordinary(self.pretokenize(text[start : match.start()]), ids)
                ids.append(self._specials[match.group()])
                start = match.end()
        self._encode_ordinary(self.pretokenize(text[start:]), ids)

    def _encode_ordinary(self, pieces: list[str], ids: list[int]) -> None:
        cache, ranks = self._cache, self._ranks
        for piece in pieces:
            tokens = cache.get(piece)
            if tokens is None:
                try:
                    data = piece.encode("utf-8")
                except UnicodeEncodeError:
                    raise TokenizerError(f"the text holds a lone surrogate in {piece!r}, which is not valid Unicode; "
                                         f"clean it first, e.g. text.encode('utf-8', 'replace').decode().") from None
                whole = ranks.get(data)  # a whole word that is one token (as tiktoken also checks first)
                if whole is not None:
                    tokens = [whole]
                else:
                    merge = bpe if len(data) <= LONG_PRETOKEN else bpe_heap
                    tokens = [ranks[part] for part in merge(data, ranks)]
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[piece] = tokens
            ids += tokens

    def _encode_safe_prefix(self, buffer: str, specials: regex.Pattern | None, ids: list[int]) -> int:
        """Encode the part of `buffer` whose ids cannot change whatever text follows it; return
        where that part ends (0 when no such point is known yet)."""
        matches = list(specials.finditer(buffer)) if specials is not None else []
        tail_start = matches[-1].end() if matches else 0
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

    # ---- decode --------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to the raw bytes they stand for (special tokens as their UTF-8 names)."""
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
