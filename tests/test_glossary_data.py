"""The hand-written glossary data (lm/assets/glossary, package data): format, rules and the data card's counts."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "lm" / "assets" / "glossary"
TOPICS = (
    "tokenization", "embeddings and positions", "attention", "architecture", "training", "optimization",
    "fine-tuning", "sampling and decoding", "evaluation", "data", "hardware and performance",
    "math and probability", "python and pytorch",
)


def _lines(name):
    text = (DATA / name).read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{name} must end with a newline"
    return text.splitlines()


def _records(name, keys):
    records = []
    for number, line in enumerate(_lines(name), 1):
        assert line.strip(), f"{name}:{number} is blank"
        assert line.isascii(), f"{name}:{number} is not plain ASCII"
        record = json.loads(line)
        assert isinstance(record, dict) and set(record) == set(keys), f"{name}:{number} keys {sorted(record)}"
        for key in keys:
            value = record[key]
            assert isinstance(value, str) and value == value.strip() and value, f"{name}:{number} {key}={value!r}"
            assert value.isascii() and "\n" not in value and "\r" not in value and "\t" not in value
        records.append(record)
    return records


@pytest.fixture(scope="module")
def entries():
    return _records("glossary.jsonl", ("term", "definition", "topic"))


@pytest.fixture(scope="module")
def questions():
    return [r["question"] for r in _records("unanswerable.jsonl", ("question",))]


def test_enough_entries(entries):
    assert len(entries) >= 300


def test_terms_unique_and_well_formed(entries):
    terms = [e["term"] for e in entries]
    duplicates = [t for t, n in Counter(t.lower() for t in terms).items() if n > 1]
    assert not duplicates
    for term in terms:
        assert 1 <= len(term.split()) <= 5, term
        assert term[-1] not in ".,;:!?", term
        assert "  " not in term, term


def test_definitions_unique(entries):
    duplicates = [d for d, n in Counter(e["definition"] for e in entries).items() if n > 1]
    assert not duplicates


def test_topics(entries):
    counts = Counter(e["topic"] for e in entries)
    assert set(counts) <= set(TOPICS), set(counts) - set(TOPICS)
    for topic in TOPICS:
        assert counts[topic] >= 20, (topic, counts[topic])


def test_definition_rules(entries):
    for e in entries:
        term, definition = e["term"], e["definition"]
        assert 40 <= len(definition) <= 170, (term, len(definition))
        assert definition.endswith("."), term
        assert definition[0].isupper(), term
        assert not definition.lower().startswith(term.lower()), term
        assert not any(s in definition for s in ("e.g.", "i.e.", "etc.")), term


def _mentions(text, term):
    return re.search(r"(?<![a-z0-9])" + re.escape(term.lower()) + r"(?![a-z0-9])", text.lower()) is not None


def test_unanswerable_questions(questions, entries):
    assert len(questions) >= 100
    assert len(set(q.lower() for q in questions)) == len(questions)
    terms = [e["term"] for e in entries if len(e["term"]) >= 4]
    for q in questions:
        assert 10 <= len(q) <= 90, q
        clashes = [t for t in terms if _mentions(q, t)]
        assert not clashes, (q, clashes)


def test_readme_counts_match(entries, questions):
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    table = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in TOPICS:
            table[cells[0]] = int(cells[1])
    assert table == dict(Counter(e["topic"] for e in entries))
    assert f"{len(entries)} terms and {len(questions)} unanswerable questions" in readme
