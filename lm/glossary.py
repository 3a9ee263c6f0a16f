"""The book's own instruction data: a hand-written glossary of language-model terms, turned into
questions and answers with held-out splits (`lm/assets/glossary/`, package data; its README is the
data card).

    lm.glossary.entries()                 # [{"term", "definition", "topic"}, ...]
    lm.glossary.examples("train")          # conversations: question -> definition, or -> REFUSAL
    lm.glossary.text()                     # "term: definition" lines
    lm.glossary.pretraining_text()         # each entry in several wordings, for pretraining (stage 1)
    lm.CharTokenizer.train(lm.glossary.all_text())   # a vocabulary that covers every split

Seed 000's two stages: first a causal LM reads the glossary as text, then instruction tuning
teaches it to answer questions about it, and to refuse questions the glossary cannot answer.

Splits are fixed by a hash of each term (and of each unanswerable question), so they never move
when entries are added, and no held-out question, term or refusal is ever trained on:

    split        terms                 phrasings          unanswerable questions
    train        80% of terms          TRAIN_FORMS (all)  80%
    val          10% (their own)       one HELD_OUT_FORM  10%       early stopping
    test         10% (their own)       one HELD_OUT_FORM  10%       the score to report
    rephrased    the train terms       one HELD_OUT_FORM  -         known facts, new wording

The held-out terms' definitions do appear in `text()`: that is the knowledge the model gets in
pretraining, and the test asks whether instruction tuning on other terms lets it answer questions
about these.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .instructions import DataFormatError, Examples

REFUSAL = "I don't know; that is not in my glossary."
TRAIN_FORMS = (
    "What is {term}?",
    "Define {term}.",
    "What does {term} mean?",
    "Explain {term} in one sentence.",
    "Give the definition of {term}.",
    "{term}: what is it?",
)
HELD_OUT_FORMS = (
    "Could you tell me what {term} is?",
    "In one sentence, what is {term}?",
    "What is meant by {term}?",
)
SPLITS = ("train", "val", "test", "rephrased")
# Ways to state an entry in pretraining text (none is a question: questions are the fine-tuning's job).
STATEMENT_FORMS = (
    "{term}: {definition}",
    "The term {term} means the following. {definition}",
    "{definition} This is called {term}.",
    "In this book, {term} is defined as follows: {definition}",
    "Glossary entry for {term}, from the topic {topic}. {definition}",
    "{term} (a term about {topic}). {definition}",
)


def directory() -> Path:
    """The glossary's folder: package data (`lm/assets/glossary`), so it is there wherever lm is installed."""
    from . import assets

    return assets.path("glossary")


def _read_jsonl(name: str) -> list[dict]:
    path = directory() / name
    if not path.is_file():
        raise DataFormatError(f"{path} is missing; it ships with the lm package (lm/assets/glossary): reinstall lm.")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def entries() -> list[dict]:
    """Every glossary entry: {"term", "definition", "topic"}, in file order."""
    return _read_jsonl("glossary.jsonl")


def unanswerable() -> list[str]:
    """Questions the glossary cannot answer (they get REFUSAL)."""
    return [r["question"] for r in _read_jsonl("unanswerable.jsonl")]


def split_of(key: str) -> str:
    """"train" (8 in 10), "val" or "test" (1 in 10 each), from a hash of `key` (stable across runs,
    machines and Python versions, unlike hash())."""
    bucket = int(hashlib.sha1(key.strip().lower().encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _held_out_form(term: str) -> str:
    return HELD_OUT_FORMS[int(hashlib.sha1(term.lower().encode("utf-8")).hexdigest(), 16) % len(HELD_OUT_FORMS)]


def _pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def examples(split: str = "train", refusals: bool = True) -> Examples:
    """Question/answer conversations of one split (see the module docstring)."""
    if split not in SPLITS:
        raise DataFormatError(f"split={split!r} is not one of {SPLITS}.")
    out = []
    term_split = "train" if split == "rephrased" else split
    for e in entries():
        if split_of(e["term"]) != term_split:
            continue
        forms = TRAIN_FORMS if split == "train" else (_held_out_form(e["term"]),)
        out += [_pair(form.format(term=e["term"]), e["definition"]) for form in forms]
    if refusals and split != "rephrased":
        out += [_pair(q, REFUSAL) for q in unanswerable() if split_of(q) == split]
    return Examples(out, formats={"qa": len(out)})


def text(terms: str = "all") -> str:
    """The glossary as plain text, one "term: definition" line per entry, for pretraining.
    `terms`: "all", or a split name to keep only that split's terms."""
    lines = [f"{e['term']}: {e['definition']}" for e in entries()
             if terms == "all" or split_of(e["term"]) == terms]
    return "\n".join(lines) + "\n"


def pretraining_text(repeats: int = 10, forms: tuple[str, ...] = STATEMENT_FORMS, seed: int = 0) -> str:
    """The glossary stated `repeats` times over, the entries shuffled each time and each stated in a
    form drawn from `forms`: every fact in several wordings, which is what lets instruction tuning
    later pull it out by question (one wording, learned by heart, is much harder to query)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise DataFormatError(f"repeats={repeats!r} must be a positive integer.")
    rng = random.Random(seed)
    lines = []
    for _ in range(repeats):
        order = entries()
        rng.shuffle(order)
        lines += [rng.choice(forms).format(**e) for e in order]
    return "\n".join(lines) + "\n"


def all_text() -> str:
    """Every string the glossary's examples are made of, all splits together (definitions, question
    forms, unanswerable questions, the refusal, both chat templates' words): what a character
    tokenizer needs to cover. It fixes a vocabulary; it is not training data."""
    forms = " ".join(TRAIN_FORMS + HELD_OUT_FORMS + STATEMENT_FORMS).format(term="", definition="", topic="")
    return "\n".join([text(), forms, *unanswerable(), REFUSAL, "Human: Assistant:"]) + "\n"


def write_jsonl(conversations, path: str | Path, format: str = "qa") -> Path:
    """Write conversations as JSONL: "qa" ({"question", "answer"}, single turns only) or "messages"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations:
            if format == "qa":
                if len(c) != 2:
                    raise DataFormatError("the 'qa' format holds one question and one answer; use format='messages'.")
                record = {"question": c[0]["content"], "answer": c[1]["content"]}
            else:
                record = {"messages": c}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


__all__ = ["HELD_OUT_FORMS", "REFUSAL", "SPLITS", "TRAIN_FORMS", "all_text", "directory", "entries", "examples", "split_of",
           "text", "unanswerable", "write_jsonl"]
