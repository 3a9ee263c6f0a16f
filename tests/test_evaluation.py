"""Evaluation (lm/evaluation.py): the metrics as defined, checked against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import lm
from lm.evaluation import evaluate, normalize_answer
from lm.finetuning import FinetuneConfig, finetune
from lm.instructions import chat_template

WORDS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion", "bear", "wolf", "fox", "owl"]
QA = [{"question": f"What is {w}?", "answer": f"{w} has {len(w)} letters."} for w in WORDS]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    text = "".join(q["question"] + q["answer"] for q in QA) + "HumanAssistant:\n0123456789"
    tok = lm.CharTokenizer.train(text)
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=48,
                                  pos="rope"), tokenizer=tok)
    finetune(model, QA, FinetuneConfig(max_steps=150, lr=3e-3, patience=None, progress=False, eval_interval=50,
                                       eval_iters=1), val_examples=QA)
    return model


@pytest.mark.parametrize("a, b", [("A cat.", "a cat"), ("  a\n cat!  ", "A CAT"), ("Cafe\u0301", "caf\u00e9"),
                                  ("x?", "x")])
def test_normalization_makes_these_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [("a cat", "a dog"), ("a.cat", "acat"), ("1.5", "15")])
def test_normalization_keeps_these_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_teacher_forced_metrics_match_a_direct_computation(trained):
    result = evaluate(trained, QA, batch_size=5)
    total, count, hits = 0.0, 0, 0
    template = chat_template("human")
    with torch.no_grad():
        for q in QA:
            e = template.encode([{"role": "user", "content": q["question"]},
                                 {"role": "assistant", "content": q["answer"]}], trained.tokenizer)
            x, y = e.inputs_and_targets()
            logits = trained(x[None])[0][0]
            keep = y != -100
            total += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            hits += int((logits[keep].argmax(-1) == y[keep]).sum())
            count += int(keep.sum())
    assert result.answer_tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    assert result.token_accuracy == pytest.approx(hits / count)


def test_exact_match_is_the_share_of_normalized_equal_answers(trained):
    result = evaluate(trained, QA, batch_size=4)
    assert len(result.predictions) == len(QA) == result.examples
    for p, q in zip(result.predictions, QA):
        assert p["reference"] == q["answer"] and p["prompt"] == q["question"]
        assert p["correct"] == (normalize_answer(p["answer"]) == normalize_answer(q["answer"]))
        assert "\n\n" not in p["answer"] and not p["answer"].startswith(" ")  # cut at the template's stop
    assert result.exact_match == pytest.approx(sum(p["correct"] for p in result.predictions) / len(QA))
    assert result.exact_match >= 0.5  # the model learned most answers by heart
    assert result.generated_tokens > 0 and result.tokens_per_second > 0 and result.ms_per_token > 0


def test_batching_does_not_change_the_answers(trained):
    one = evaluate(trained, QA[:6], batch_size=1)
    many = evaluate(trained, QA[:6], batch_size=6)
    assert [p["answer"] for p in one.predictions] == [p["answer"] for p in many.predictions]
    assert one.loss == pytest.approx(many.loss, rel=1e-5)


def test_greedy_answers_equal_model_generate(trained):
    result = evaluate(trained, QA[:3], batch_size=3)
    template = chat_template("human")
    for p in result.predictions:
        prompt = template.prompt([{"role": "user", "content": p["prompt"]}])
        text = trained.generate(prompt, max_new_tokens=40, temperature=0, stop=list(template.stop))
        assert template.cut(text) == p["answer"]


def test_untrained_model_scores_low_and_results_serialize():
    tok = lm.CharTokenizer.train("".join(q["question"] + q["answer"] for q in QA) + "HumanAssistant:\n")
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=16),
                   tokenizer=tok)
    result = evaluate(model, QA, batch_size=8, max_new_tokens=5, limit=4)
    assert result.examples == 4 and result.exact_match == 0.0 and result.token_accuracy < 0.5
    data = result.to_dict()
    assert "predictions" not in data and data["examples"] == 4
    assert len(result.to_dict(predictions=True)["predictions"]) == 4
    table = result.table()
    for name in ("exact match", "token accuracy", "perplexity", "ms/token"):
        assert name in table


def test_too_long_examples_are_skipped_and_errors_are_clear():
    tok = lm.CharTokenizer.train("".join(q["question"] + q["answer"] for q in QA) + "HumanAssistant:\nx")
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=16),
                   tokenizer=tok)
    result = evaluate(model, QA[:2] + [{"question": "x" * 100, "answer": "no"}], max_new_tokens=2)
    assert result.skipped == 1 and result.examples == 2
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(model, QA, batch_size=0)
    model.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, QA)
