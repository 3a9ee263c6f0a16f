"""RAG-lite retrieval (lm/retrieval.py): BM25 against the rank-bm25 package, passages, context."""

import json

import pytest

import lm
from lm import glossary
from lm.retrieval import BM25, CONTEXT_HEADER, Retriever, with_context, words


@pytest.fixture(scope="module")
def retriever():
    return Retriever.glossary()


def queries():
    """Questions of every glossary split, and questions it cannot answer."""
    asked = [c[0]["content"] for name in ("test", "rephrased") for c in glossary.examples(name)]
    return asked[:150] + glossary.unanswerable()[:50]


def test_scores_and_rankings_match_rank_bm25(retriever):
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = [words(p) for p in retriever.passages]
    theirs = rank_bm25.BM25Okapi(corpus)  # k1=1.5, b=0.75, epsilon=0.25, as ours
    for query in queries():
        q = words(query)
        ours = retriever.index.scores(q)
        reference = theirs.get_scores(q)
        assert ours == pytest.approx(list(reference), rel=1e-9, abs=1e-9), query
        top = [i for i, _ in retriever.index.top(q, 5)]
        expected = sorted((i for i in range(len(corpus)) if reference[i] > 0), key=lambda i: (-reference[i], i))[:5]
        assert top == expected, query


def test_negative_idf_is_floored_as_rank_bm25_does():
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = [["common", "x"], ["common", "y"], ["common", "z"], ["w"]]  # "common" is in 3 of 4: negative idf
    ours = BM25(corpus)
    theirs = rank_bm25.BM25Okapi(corpus)
    assert ours.idf["common"] > 0 and ours.idf["common"] == pytest.approx(theirs.idf["common"])
    for query in (["common"], ["common", "common", "x"], ["nothing"]):
        assert ours.scores(query) == pytest.approx(list(theirs.get_scores(query)))


def test_the_term_asked_about_is_found(retriever):
    found = 0
    tests = glossary.examples("test")
    answerable = [c for c in tests if c[1]["content"] != glossary.REFUSAL]
    for c in answerable:
        hits = retriever.search(c[0]["content"], k=3)
        found += any(c[1]["content"] in h.text for h in hits)
    assert found >= 0.9 * len(answerable)


def test_words_drop_stopwords_and_punctuation():
    assert words("What is the KV-cache, in one sentence?") == ["kv", "cache"]
    assert words("Ｆｕｌｌ width") == ["full", "width"]  # NFKC


def test_search_orders_by_score_and_skips_non_matches():
    r = Retriever(["apples and pears", "pears pears pears", "bananas"])
    hits = r.search("pears", k=5)
    assert [h.index for h in hits] == [1, 0]
    assert hits[0].score > hits[1].score > 0
    assert r.search("kiwi") == []
    with pytest.raises(lm.DataFormatError, match="k=0"):
        r.search("pears", k=0)


def test_context_respects_the_token_budget(retriever):
    tok = lm.CharTokenizer.train(glossary.all_text())
    full = retriever.context("What is a KV cache?", k=3, tokenizer=tok)
    assert full.startswith(CONTEXT_HEADER + "\n") and full.count("\n") == 3
    small = retriever.context("What is a KV cache?", k=3, tokenizer=tok, budget=200)
    assert len(tok.encode(small)) <= 200 and small.count("\n") >= 1
    assert retriever.context("What is a KV cache?", k=3, tokenizer=tok, budget=5) == ""
    assert retriever.context("zzzz qqqq") == ""


def test_with_context_adds_a_system_message_the_templates_lay_out(retriever):
    examples = [[{"role": "user", "content": "What is a KV cache?"}, {"role": "assistant", "content": "x"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is RoPE?"},
                 {"role": "assistant", "content": "y"}],
                [{"role": "user", "content": "zzzz"}, {"role": "assistant", "content": "z"}]]
    out = with_context(examples, retriever, k=2)
    assert out[0][0]["role"] == "system" and "KV cache" in out[0][0]["content"]
    assert out[1][0]["content"].endswith("\n\nBe brief.") and len(out[1]) == 3
    assert out[2] == examples[2]
    text = lm.chat_template("human").render(out[0])
    assert text.startswith(CONTEXT_HEADER) and "\n\nHuman: What is a KV cache?\nAssistant:" in text


def test_files_of_passages(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph\nstill first.\n\nSecond paragraph.\n")
    assert Retriever.from_file(text).passages == ["First paragraph\nstill first.", "Second paragraph."]
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\nanother line\n")
    assert len(Retriever.from_file(lines)) == 2
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"text": "a passage"}, {"term": "rope", "definition": "Rotary positions."},
        {"question": "What is x?", "answer": "X is y."}]) + "\n")
    assert Retriever.from_file(jsonl).passages == ["a passage", "rope: Rotary positions.", "What is x? X is y."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(lm.DataFormatError, match="bad.jsonl:2"):
        Retriever.from_file(bad)
    with pytest.raises(lm.DataFormatError, match="does not exist"):
        Retriever.from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(lm.DataFormatError, match="at least one"):
        Retriever.from_file(empty)
