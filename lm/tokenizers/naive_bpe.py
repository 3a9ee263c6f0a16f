"""Byte-pair encoding written the plain way: the reference that `ByteBPETokenizer` is tested against.

Training repeats one step: count every adjacent pair of ids, give the most frequent pair a new id,
and replace it everywhere. Nothing is cached, so each merge costs a pass over the whole text;
`bpe.train_merges` learns the same merges in the same order by updating the counts in place, and
the tests check that the two agree (chapter 2 derives this file).

    merges = train_naive("low lower lowest", vocab_size=256 + 3)   # [(108, 111), (256, 119), (32, 257)]
    encode_naive("lowest", merges)                                 # [257, 101, 115, 116]: "low" e s t

Ids follow `ByteBPETokenizer`: the bytes are 0..255, merge k makes id 256 + k. Among pairs with
equal counts the smallest (left id, then right id) wins, so the result is deterministic.
"""

from __future__ import annotations

from collections import Counter

import regex


def pair_counts(ids: list[int], counts: Counter | None = None) -> Counter:
    """How often each adjacent pair (a, b) occurs in `ids`, added to `counts` when it is given."""
    counts = Counter() if counts is None else counts
    counts.update(zip(ids, ids[1:]))
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with every occurrence of `pair` replaced by `new_id`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def split_bytes(text: str | bytes, pattern: str | None = None) -> list[list[int]]:
    """The byte ids of each pre-token: the pieces that `pattern` (a regex) finds in the text, or
    the whole text as one piece when `pattern` is None. Merges never cross two pieces."""
    if pattern is None:
        pieces = [text]
    else:
        pieces = regex.findall(pattern, text)
    return [list(piece.encode("utf-8") if isinstance(piece, str) else piece) for piece in pieces]


def train_naive(text: str | bytes, vocab_size: int, pattern: str | None = None) -> list[tuple[int, int]]:
    """The merges that grow the 256 bytes to `vocab_size` tokens, in the order they were learned.

    Stops early when no pair is left to merge. With a `pattern` (e.g. `GPT2_PATTERN`) the text is
    first cut into pre-tokens and only pairs inside one pre-token are counted.
    """
    chunks = split_bytes(text, pattern)
    merges = []
    for new_id in range(256, vocab_size):
        counts = Counter()
        for ids in chunks:
            pair_counts(ids, counts)
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent; ties: smallest ids
        chunks = [merge(ids, pair, new_id) for ids in chunks]
        merges.append(pair)
    return merges


def encode_naive(text: str | bytes, merges: list[tuple[int, int]], pattern: str | None = None) -> list[int]:
    """Encode by applying every merge, in training order, to each pre-token."""
    out = []
    for ids in split_bytes(text, pattern):
        for k, pair in enumerate(merges):
            ids = merge(ids, pair, 256 + k)
        out += ids
    return out
