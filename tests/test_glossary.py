"""lm.glossary: the instruction pairs built from lm/assets/glossary, and their held-out splits."""

import pytest

import lm
from lm import glossary


@pytest.fixture(scope="module")
def splits():
    return {name: glossary.examples(name) for name in glossary.SPLITS}


def questions_and_answers(examples):
    return [(c[0]["content"], c[1]["content"]) for c in examples]


def test_no_held_out_term_question_or_refusal_is_trained_on(splits):
    train = questions_and_answers(splits["train"])
    train_questions = {q for q, _ in train}
    train_answers = {a for _, a in train if a != glossary.REFUSAL}
    for name in ("val", "test"):
        held = questions_and_answers(splits[name])
        assert held and not train_questions & {q for q, _ in held}
        assert not train_answers & {a for _, a in held if a != glossary.REFUSAL}  # other terms' definitions
        assert any(a == glossary.REFUSAL for _, a in held)  # refusals are held out too
    val = {q for q, _ in questions_and_answers(splits["val"])}
    assert not val & {q for q, _ in questions_and_answers(splits["test"])}


def test_rephrased_asks_trained_facts_in_untrained_words(splits):
    train = questions_and_answers(splits["train"])
    rephrased = questions_and_answers(splits["rephrased"])
    assert {a for _, a in rephrased} <= {a for _, a in train}
    assert not {q for q, _ in rephrased} & {q for q, _ in train}
    assert glossary.REFUSAL not in {a for _, a in rephrased}


def test_split_sizes_follow_the_hash_fractions(splits):
    terms = glossary.entries()
    train_terms = sum(glossary.split_of(e["term"]) == "train" for e in terms)
    assert 0.7 < train_terms / len(terms) < 0.9
    assert len(splits["rephrased"]) == train_terms
    refusals = sum(a == glossary.REFUSAL for _, a in questions_and_answers(splits["train"]))
    assert len(splits["train"]) == train_terms * len(glossary.TRAIN_FORMS) + refusals
    assert glossary.split_of("tokenization") == glossary.split_of("tokenization")  # a hash, not a draw


def test_a_char_tokenizer_of_all_text_covers_every_split_and_pretraining():
    tok = lm.CharTokenizer.train(glossary.all_text())
    text = glossary.pretraining_text(repeats=2) + "".join(
        m["content"] for name in glossary.SPLITS for c in glossary.examples(name) for m in c)
    assert tok.decode(tok.encode(text)) == text


def test_pretraining_text_states_every_entry_in_several_wordings_and_asks_nothing():
    text = glossary.pretraining_text(repeats=3, seed=1)
    lines = text.splitlines()
    entries = glossary.entries()
    assert len(lines) == 3 * len(entries)
    for e in entries[:50]:
        assert sum(e["definition"] in line for line in lines) == 3
    assert not any(line.rstrip().endswith("?") for line in lines)
    wordings = {form for form in glossary.STATEMENT_FORMS for line in lines
                if line.startswith(form.split("{")[0]) and form.split("}")[-1] in line}
    assert len(wordings) >= 4  # not one wording learned by heart
    assert glossary.pretraining_text(repeats=3, seed=1) == text != glossary.pretraining_text(repeats=3, seed=2)
    with pytest.raises(lm.DataFormatError, match="repeats=0"):
        glossary.pretraining_text(repeats=0)


def test_written_jsonl_loads_back(tmp_path, splits):
    path = glossary.write_jsonl(splits["test"], tmp_path / "test.jsonl")
    again = lm.load_examples(path)
    assert questions_and_answers(again) == questions_and_answers(splits["test"])
    assert again.formats == {"qa": len(splits["test"])}
