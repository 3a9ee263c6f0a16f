"""RAG-lite: find the passages of a small corpus that answer a question, and put them in the prompt.

    retriever = lm.retrieval.Retriever.from_file("notes.txt")    # or .jsonl, or Retriever.glossary()
    retriever.search("what is a kv cache?", k=3)                  # [Hit(score, index, text), ...]
    examples = lm.retrieval.with_context(examples, retriever, tokenizer=tok, budget=200)

Retrieval is Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", 2009) over words. For a query of words q and a passage d:

    score(q, d) = sum over q of idf(q) * f(q, d) * (k1 + 1) / (f(q, d) + k1 * (1 - b + b * |d| / avgdl))

where f(q, d) counts q in d, |d| is d's length in words and avgdl the mean length. The idf is
log((N - n(q) + 0.5) / (n(q) + 0.5)) for N passages of which n(q) contain q; a word in more than
half of the passages would get a negative idf, which is raised to `epsilon` times the mean idf
(the choice of the `rank-bm25` package's BM25Okapi, whose scores the tests compare with ours). A
word repeated in the query counts each time. k1 (1.5) sets how fast repeated words saturate, b
(0.75) how much long passages are discounted.

Words: NFKC, lower case, runs of letters and digits; a short list of English function words
(`STOPWORDS`) is dropped, since "what", "is" and "the" say nothing about which passage is meant.

`with_context` puts the best passages, as many as fit in `budget` tokens, into a system message
before each conversation: the chat templates lay a system message out before the first turn, so
training, evaluation and chat see retrieved text the same way.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .instructions import DataFormatError, Examples, encode_plain, load_examples

WORD = re.compile(r"[^\W_]+")
STOPWORDS = frozenset(
    "a an and are as at be by can could do does for from how i in is it its me meant mean of on one or "
    "sentence tell that the this to what which who why with you your".split())
MAX_FILE_BYTES = 64 << 20  # a retrieval corpus is small; a larger file is refused, not read whole
CONTEXT_HEADER = "Context:"


def words(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """The words BM25 indexes: NFKC, lower case, letters and digits, without stopwords."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [w for w in WORD.findall(text) if w not in stopwords]


class BM25:
    """Okapi BM25 over passages already split into words (see the module docstring)."""

    def __init__(self, passages: list[list[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        if not passages:
            raise DataFormatError("BM25 needs at least one passage to index.")
        if not k1 >= 0 or not 0 <= b <= 1:
            raise DataFormatError(f"k1={k1!r} must be >= 0 and b={b!r} between 0 and 1.")
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.lengths = [len(p) for p in passages]
        self.avgdl = sum(self.lengths) / len(passages) or 1.0
        self.postings: dict[str, list[tuple[int, int]]] = {}  # word -> [(passage, count), ...]
        for i, passage in enumerate(passages):
            for word, count in Counter(passage).items():
                self.postings.setdefault(word, []).append((i, count))
        n = len(passages)
        idf = {w: math.log(n - len(p) + 0.5) - math.log(len(p) + 0.5) for w, p in self.postings.items()}
        floor = epsilon * sum(idf.values()) / max(len(idf), 1)
        self.idf = {w: (value if value >= 0 else floor) for w, value in idf.items()}

    def __len__(self) -> int:
        return len(self.lengths)

    def scores(self, query: list[str]) -> list[float]:
        """The score of every passage for the query words."""
        out = [0.0] * len(self.lengths)
        k1, b, avgdl = self.k1, self.b, self.avgdl
        for word in query:
            idf = self.idf.get(word)
            if idf is None:
                continue
            for i, f in self.postings[word]:
                out[i] += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * self.lengths[i] / avgdl))
        return out

    def top(self, query: list[str], k: int) -> list[tuple[int, float]]:
        """The k best (passage index, score) pairs with a positive score, best first (ties: earlier passage)."""
        scored = [(i, s) for i, s in enumerate(self.scores(query)) if s > 0]
        scored.sort(key=lambda pair: (-pair[1], pair[0]))
        return scored[:k]


@dataclass(frozen=True)
class Hit:
    score: float
    index: int
    text: str


class Retriever:
    """A BM25 index over passages of text, searched with a question."""

    def __init__(self, passages: Iterable[str], k1: float = 1.5, b: float = 0.75,
                 tokenize: Callable[[str], list[str]] = words):
        self.passages = [p.strip() for p in passages if p and p.strip()]
        if not self.passages:
            raise DataFormatError("a retriever needs at least one non-empty passage.")
        self.tokenize = tokenize
        self.index = BM25([tokenize(p) for p in self.passages], k1=k1, b=b)

    def __len__(self) -> int:
        return len(self.passages)

    def __repr__(self) -> str:
        return f"Retriever({len(self)} passages)"

    @classmethod
    def glossary(cls, **options) -> "Retriever":
        """The book's glossary, one "term: definition" passage per entry."""
        from . import glossary

        return cls(glossary.text().splitlines(), **options)

    @classmethod
    def from_file(cls, path: str | Path, **options) -> "Retriever":
        """Passages from a text file (paragraphs split at blank lines, or lines when there are no
        blank lines) or a JSONL file (each object's "text", or "term" + "definition", or the
        question and answer of an example in any `lm.load_examples` format)."""
        path = Path(path)
        if not path.is_file():
            raise DataFormatError(f"{str(path)!r} does not exist; give a .txt or .jsonl file of passages.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataFormatError(f"{path} is over {MAX_FILE_BYTES >> 20} MiB; a RAG-lite corpus is meant to be small.")
        if path.suffix == ".jsonl":
            return cls(_jsonl_passages(path), **options)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path} is not UTF-8 text ({e}).") from None
        parts = re.split(r"\n\s*\n", text)
        return cls(parts if len(parts) > 1 else text.splitlines(), **options)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The k passages that score best for `query` (fewer when fewer share a word with it)."""
        if not isinstance(k, int) or k < 1:
            raise DataFormatError(f"k={k!r} must be a positive integer.")
        return [Hit(score, i, self.passages[i]) for i, score in self.index.top(self.tokenize(query), k)]

    def context(self, query: str, k: int = 3, tokenizer=None, budget: int | None = None) -> str:
        """The best passages, one per line under a "Context:" header, as many of the k as fit in
        `budget` tokens of `tokenizer` (characters without one); "" when nothing matches."""
        lines, used = [], len(CONTEXT_HEADER)
        for hit in self.search(query, k):
            cost = len(encode_plain(tokenizer, "\n" + hit.text)) if tokenizer is not None else len(hit.text) + 1
            if budget is not None and used + cost > budget:
                break
            lines.append(hit.text)
            used += cost
        return "\n".join([CONTEXT_HEADER, *lines]) if lines else ""


def _jsonl_passages(path: Path) -> list[str]:
    passages = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not valid JSON ({e}).") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                passages.append(record["text"])
            elif isinstance(record, dict) and {"term", "definition"} <= set(record):
                passages.append(f"{record['term']}: {record['definition']}")
            else:  # an example in any format: its messages, joined
                try:
                    found = load_examples([record])
                except DataFormatError as e:
                    raise DataFormatError(f"{path}:{n}: expected 'text', 'term' and 'definition', or an example; "
                                          f"{e}") from None
                passages += [" ".join(m["content"] for m in conversation) for conversation in found]
    return passages


def with_context(examples, retriever: Retriever, k: int = 3, tokenizer=None, budget: int | None = None) -> Examples:
    """Each conversation with a system message holding the passages retrieved for its first user
    message (see `Retriever.context`); a conversation that has a system message already keeps it,
    after the context. Conversations for which nothing is retrieved are left as they are."""
    source = examples if isinstance(examples, Examples) else load_examples(examples)
    out = []
    for conversation in source:
        question = next(m["content"] for m in conversation if m["role"] == "user")
        context = retriever.context(question, k, tokenizer, budget)
        if not context:
            out.append(conversation)
            continue
        rest = conversation
        if conversation[0]["role"] == "system":
            context, rest = context + "\n\n" + conversation[0]["content"], conversation[1:]
        out.append([{"role": "system", "content": context}, *rest])
    return Examples(out, skipped=getattr(source, "skipped", {}), formats=getattr(source, "formats", {}))


__all__ = ["BM25", "CONTEXT_HEADER", "Hit", "Retriever", "STOPWORDS", "with_context", "words"]
