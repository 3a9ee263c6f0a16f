"""Classification fine-tuning: a GPT reads a text, and a linear head on its last token names a class.

    idx (B, T) -> GPT.hidden_states -> (B, T, C) -> the last real token of each row (B, C) -> head -> (B, n_classes)

The last token is the one to read because attention is causal: it is the only position that has
seen the whole text (rasbt's "LLMs from scratch", chapter 6). Padding goes on the right, so the
real tokens never see it and a padded text gets exactly the logits it gets alone.

    task = lm.classification_task("which_play", n_per_class=100, length=200)
    classifier = lm.SequenceClassifier(model, task.classes, trainable="last_block")
    history = lm.train_classifier(classifier, task.train, task.val, steps=200, batch_size=16, lr=1e-3)
    lm.classify.accuracy(classifier, task.test)        # against lm.classify.BagOfWords().fit(...).accuracy(task.test)
    classifier.predict(["To be, or not to be"])        # -> ["hamlet"]

Examples everywhere are `(text, label)` pairs whose label is a class name. The parts:
- tasks: `classification_task` cuts the offline corpora (`lm.corpora`) into labelled passages;
- `SequenceClassifier`: backbone + head, with what to train ("head", "last_block", "all");
- `train_classifier` (AdamW from `lm.optim`), `accuracy`;
- `BagOfWords`: multinomial naive Bayes on word counts, the baseline a GPT has to beat;
- `save_classifier` / `load_classifier`: an `lm` checkpoint of the backbone with the head beside it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .corpora import load_documents
from .device import resolve_device
from .model import GPT
from .optim import configure_optimizer, lr_at

TRAINABLE = ("head", "last_block", "all")  # what fine-tuning changes; everything else is frozen


class ClassificationError(ValueError):
    """Bad classification input (task, classes, labels, texts); the message names the value and the fix."""


# ---- tasks ---------------------------------------------------------------------------------------------
@dataclass
class ClassificationTask:
    """Labelled passages in three splits; every example is `(text, label)` with label in `classes`.
    Each split holds the same number of passages of every class, shuffled."""

    name: str
    classes: list[str]
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def __repr__(self) -> str:
        return (f"ClassificationTask({self.name!r}, classes={self.classes}, train={len(self.train)}, "
                f"val={len(self.val)}, test={len(self.test)})")


# which_play's plays: class name -> the play's title, the first line of its text
PLAYS = {"hamlet": "HAMLET, PRINCE OF DENMARK", "macbeth": "MACBETH", "midsummer": "A MIDSUMMER NIGHT'S DREAM",
         "romeo_and_juliet": "ROMEO AND JULIET"}
REGION_PASSAGES = 16  # consecutive passages per region; a region goes to one split whole
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of each class's passages: train, val, test
_ACT = re.compile(r"^\s*ACT\b", re.MULTILINE)


def play_body(play: str) -> str:
    """A play from its first act on: the title and list of persons before it would name the play."""
    match = _ACT.search(play)
    return play[match.start():] if match else play


def _shakespeare_vs_python() -> dict[str, list[str]]:
    return {"shakespeare": [play_body(play) for play in load_documents("shakespeare")],
            "python": load_documents("pydoc")}


def _which_play() -> dict[str, list[str]]:
    by_title = {play.split("\n", 1)[0].strip(): play for play in load_documents("shakespeare")}
    return {name: [play_body(by_title[title])] for name, title in PLAYS.items()}


TASKS: dict[str, Callable[[], dict[str, list[str]]]] = {
    "shakespeare_vs_python": _shakespeare_vs_python,  # any of the 42 texts vs Python's help topics
    "which_play": _which_play,  # which of four plays (PLAYS) a passage comes from
}


def passages(text: str, length: int) -> list[str]:
    """Cut a text into consecutive, non-overlapping passages of at most `length` characters that
    start and end at whitespace (a word longer than `length` is cut). Whitespace runs become one
    space first, so a passage's class shows in its words, not in its line breaks or indentation.
    A last piece shorter than half a passage is dropped."""
    text = " ".join(text.split())
    pieces, start = [], 0
    while start < len(text):
        end = start + length
        if end < len(text):
            space = text.rfind(" ", start, end + 1)
            end = space if space > start else end
        pieces.append(text[start:end].strip())
        start = end + 1 if end < len(text) and text[end] == " " else end
    return [p for p in pieces if len(p) >= length // 2]


def classification_task(name: str, n_per_class: int = 100, length: int = 200, seed: int = 0,
                        eval_per_class: int | None = None) -> ClassificationTask:
    """Labelled passages of at most `length` characters from the offline corpora, in train/val/test
    splits.

    - "shakespeare_vs_python": Shakespeare (any of the 42 texts) vs Python's documentation (the
      `pydoc` help topics);
    - "which_play": which of four plays (`PLAYS`: Hamlet, Macbeth, A Midsummer Night's Dream,
      Romeo and Juliet) a passage comes from.

    Each document is cut into passages (`passages`), consecutive passages are grouped into regions
    of `REGION_PASSAGES`, and each class's regions are shuffled and dealt to train, val and test
    (`SPLIT_FRACTIONS` of its passages): the test passages come from stretches of text that
    training never reads, so no window overlaps another across splits. Each split then draws
    `n_per_class` (train) or `eval_per_class` (val, test; default `n_per_class // 2`) passages of
    every class. The same arguments always give the same task (on one Python version: the `pydoc`
    topics change a little between versions).
    """
    if name not in TASKS:
        raise ClassificationError(f"unknown task {name!r}; use one of {sorted(TASKS)}.")
    eval_per_class = max(1, n_per_class // 2) if eval_per_class is None else eval_per_class
    for key, value in (("n_per_class", n_per_class), ("eval_per_class", eval_per_class), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ClassificationError(f"{key}={value!r} must be a positive integer.")
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    wanted = {"train": n_per_class, "val": eval_per_class, "test": eval_per_class}
    documents = TASKS[name]()
    for label, docs in documents.items():
        regions = []
        for doc in docs:
            pieces = passages(doc, length)
            regions += [pieces[i:i + REGION_PASSAGES] for i in range(0, len(pieces), REGION_PASSAGES)]
        rng.shuffle(regions)
        total = sum(len(region) for region in regions)
        dealt: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        bounds = (SPLIT_FRACTIONS[0] * total, (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * total)
        seen = 0
        for region in regions:
            split = "train" if seen < bounds[0] else "val" if seen < bounds[1] else "test"
            dealt[split].extend(region)
            seen += len(region)
        for split, n in wanted.items():
            if len(dealt[split]) < n:
                raise ClassificationError(
                    f"task {name!r} has only {len(dealt[split])} {split} passages of class {label!r} at "
                    f"length={length}; ask for fewer (n_per_class, eval_per_class) or shorter passages.")
            splits[split].extend((text, label) for text in rng.sample(dealt[split], n))
    for examples in splits.values():
        rng.shuffle(examples)
    return ClassificationTask(name, list(documents), splits["train"], splits["val"], splits["test"])


# ---- the classifier ------------------------------------------------------------------------------------
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask, True for real tokens -> (B,) position of each row's last real token.
    Right padding gives the length minus one, left padding T - 1."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).argmax(dim=-1)


class SequenceClassifier(nn.Module):
    """A GPT backbone with a linear head `d_model -> n_classes` on the hidden state of each text's
    last real token. `forward(idx, labels=None, attention_mask=None)` returns `(logits, loss)`;
    `predict(texts)` returns class names.

    trainable: what `train_classifier` updates; the rest is frozen (`requires_grad=False`):
    - "head": the head alone (the GPT is a fixed feature extractor);
    - "last_block": the head, the last transformer block and the final norm (rasbt's choice: the
      top of the network adapts to the task, the rest keeps what pretraining learned);
    - "all": everything.
    bias: whether the head has a bias (Hugging Face's `GPT2ForSequenceClassification.score` has none).
    """

    def __init__(self, backbone: GPT, classes: Sequence[str], trainable: str = "last_block", bias: bool = True):
        super().__init__()
        if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
            raise ClassificationError(f"classes must be a list of non-empty class names, got {classes!r}.")
        classes = list(classes)
        if len(classes) < 2:
            raise ClassificationError(f"a classifier needs at least 2 classes, got {classes!r}.")
        if len(set(classes)) != len(classes):
            raise ClassificationError(f"class names must differ, got {classes!r}.")
        self.backbone = backbone
        self.classes = classes
        self.head = nn.Linear(backbone.config.d_model, len(classes), bias=bias)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)  # as GPT.reset_parameters does
        if bias:
            nn.init.zeros_(self.head.bias)
        self.head.to(device=backbone.device, dtype=backbone.tok_emb.weight.dtype)
        self.set_trainable(trainable)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def set_trainable(self, trainable: str) -> None:
        """Freeze everything but what `trainable` names ("head", "last_block" or "all")."""
        if trainable not in TRAINABLE:
            raise ClassificationError(f"trainable={trainable!r} is not a choice; use one of {TRAINABLE}.")
        self.requires_grad_(trainable == "all")
        self.head.requires_grad_(True)
        if trainable == "last_block":
            self.backbone.blocks[-1].requires_grad_(True)
            self.backbone.norm_f.requires_grad_(True)
        self.trainable = trainable

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids; labels: (B,) class indices; attention_mask: (B, T), True for real
        tokens (right or left padding). Returns logits (B, n_classes) and the mean cross-entropy
        (None without labels)."""
        if attention_mask is not None:
            if attention_mask.shape != idx.shape:
                raise ClassificationError(f"attention_mask has shape {tuple(attention_mask.shape)}; give (B, T) = "
                                          f"{tuple(idx.shape)}, True for real tokens.")
            if not attention_mask.any(dim=-1).all():
                raise ClassificationError("a row of attention_mask has no real token; every text needs one.")
        hidden = self.backbone.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        if attention_mask is None:
            pooled = hidden[:, -1]
        else:
            pooled = hidden[torch.arange(idx.size(0), device=idx.device), last_token_index(attention_mask)]
        logits = self.head(pooled)  # (B, n_classes)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss

    # ---- texts ---------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to the backbone's block_size. The start is kept (as rasbt
        does): the head reads the last kept token, which has seen everything kept, and a text's
        opening usually says what it is about."""
        tokenizer = self.backbone.tokenizer
        if tokenizer is None:
            raise ClassificationError("the backbone has no tokenizer to read texts with; attach one "
                                      "(model.tokenizer = tok) or pass token ids to forward.")
        if isinstance(texts, str):
            raise ClassificationError("give a list of texts, not a single string (wrap it: [text]).")
        block_size = self.backbone.config.block_size
        encoded = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ClassificationError(f"text {i} is a {type(text).__name__}, not a str.")
            ids = tokenizer.encode(text) if text.strip() else []
            if not ids:
                raise ClassificationError(f"text {i} is empty ({text!r}); every text needs at least one token.")
            encoded.append(ids[:block_size])
        if not encoded:
            raise ClassificationError("no texts given; pass a non-empty list of texts.")
        return encoded

    def collate(self, encoded: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into idx (B, T) and attention_mask (B, T) on the backbone's device."""
        T = max(len(ids) for ids in encoded)
        idx = torch.zeros(len(encoded), T, dtype=torch.long)  # pad id 0: the mask hides it, any id would do
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for i, ids in enumerate(encoded):
            idx[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = True
        return idx.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, n_classes) class probabilities of each text, computed in eval mode."""
        encoded = self.encode(texts)
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for i in range(0, len(encoded), batch_size):
                idx, mask = self.collate(encoded[i:i + batch_size])
                logits, _ = self(idx, attention_mask=mask)
                chunks.append(logits.float().softmax(dim=-1).cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        """The most likely class name of each text."""
        return [self.classes[i] for i in self.probabilities(texts, batch_size).argmax(-1).tolist()]

    def label_ids(self, labels: Sequence[str]) -> torch.Tensor:
        """Class names -> (N,) class indices, with an error that names any unknown label."""
        index = {name: i for i, name in enumerate(self.classes)}
        for i, label in enumerate(labels):
            if label not in index:
                raise ClassificationError(f"label {label!r} of example {i} is not one of the classes {self.classes}.")
        return torch.tensor([index[label] for label in labels], dtype=torch.long)

    def extra_repr(self) -> str:
        return f"classes={self.classes}, trainable={self.trainable!r}"


# ---- training --------------------------------------------------------------------------------------------
@dataclass
class ClassifierHistory:
    """What `train_classifier` measured: the loss of every step, and val loss and accuracy at each
    evaluation (every `eval_interval` steps and after the last)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


def _check_examples(examples, what: str) -> tuple[list[str], list[str]]:
    """(text, label) pairs -> texts, labels, with an error that names a malformed pair."""
    if isinstance(examples, (str, tuple)) or not examples:
        raise ClassificationError(f"{what} must be a non-empty list of (text, label) pairs.")
    for i, example in enumerate(examples):
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise ClassificationError(f"{what}[{i}] is {example!r}; each example is a (text, label) pair.")
    texts, labels = zip(*examples)
    return list(texts), list(labels)


def evaluate_classifier(classifier: SequenceClassifier, examples, batch_size: int = 64) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `classifier` on (text, label) examples, in eval mode."""
    texts, labels = _check_examples(examples, "examples")
    return _evaluate(classifier, classifier.encode(texts), classifier.label_ids(labels), batch_size)


def _evaluate(classifier: SequenceClassifier, encoded: list[list[int]], targets: torch.Tensor,
              batch_size: int = 64) -> tuple[float, float]:
    targets = targets.to(classifier.device)
    was_training = classifier.training
    classifier.eval()
    total_loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(encoded), batch_size):
                idx, mask = classifier.collate(encoded[i:i + batch_size])
                y = targets[i:i + batch_size]
                logits, loss = classifier(idx, y, attention_mask=mask)
                total_loss += loss.item() * len(y)
                correct += (logits.argmax(-1) == y).sum().item()
    finally:
        classifier.train(was_training)
    return total_loss / len(encoded), correct / len(encoded)


def accuracy(model, examples) -> float:
    """Fraction of (text, label) examples whose label `model.predict` gets right; `model` is a
    `SequenceClassifier`, a `BagOfWords`, or anything else with `predict(texts) -> labels`."""
    texts, labels = _check_examples(examples, "examples")
    predicted = model.predict(texts)
    return sum(p == label for p, label in zip(predicted, labels)) / len(labels)


def train_classifier(classifier: SequenceClassifier, train, val=None, *, steps: int = 200, batch_size: int = 16,
                     lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 0, grad_clip: float = 1.0,
                     eval_interval: int = 50, seed: int = 0,
                     callback: Callable[[ClassifierHistory], None] | None = None) -> ClassifierHistory:
    """Fine-tune `classifier` on (text, label) examples; returns its history, leaves it in eval mode.

    Each step takes `batch_size` examples (every example once per epoch, in an order drawn from
    `seed`), right-padded; AdamW (`lm.optim.configure_optimizer`) updates the parameters that
    `classifier.trainable` leaves unfrozen, with `lr` warmed up over `warmup_steps` and then
    decayed along a half cosine to lr / 10 (1e-3 suits a small model; rasbt fine-tunes GPT-2 124M
    with 5e-5). With `val`, loss and accuracy on it are measured every `eval_interval` steps and
    after the last, and `callback(history)` runs after each.
    """
    for key, value in (("steps", steps), ("batch_size", batch_size), ("eval_interval", eval_interval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ClassificationError(f"{key}={value!r} must be a positive integer.")
    texts, labels = _check_examples(train, "train")
    encoded, targets = classifier.encode(texts), classifier.label_ids(labels)
    if val is not None:  # checked and encoded once, before any step
        val_texts, val_labels = _check_examples(val, "val")
        val_encoded, val_targets = classifier.encode(val_texts), classifier.label_ids(val_labels)
    optimizer = configure_optimizer(classifier, lr, weight_decay)
    trained = [p for p in classifier.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = ClassifierHistory()
    classifier.train()
    for step in range(steps):
        while len(order) < batch_size:  # a new epoch, after what is left of the last one
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        idx, mask = classifier.collate([encoded[i] for i in batch])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, lr / 10, warmup_steps, steps)
        _, loss = classifier(idx, targets[batch].to(classifier.device), attention_mask=mask)
        history.step.append(step)
        history.loss.append(loss.item())
        if not math.isfinite(history.loss[-1]):  # stop before a bad step can spoil the weights
            raise ClassificationError(f"the loss became {history.loss[-1]} at step {step}; lower lr (now {lr:.2e}).")
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if val is not None and ((step + 1) % eval_interval == 0 or step + 1 == steps):
            val_loss, val_accuracy = _evaluate(classifier, val_encoded, val_targets)
            history.eval_step.append(step)
            history.val_loss.append(val_loss)
            history.val_accuracy.append(val_accuracy)
            if callback is not None:
                callback(history)
    classifier.eval()
    return history


# ---- the baseline: naive Bayes on word counts ------------------------------------------------------------
_WORDS = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")  # lowercase words and numbers, and each other mark alone


def words(text: str) -> list[str]:
    """The tokens a bag of words counts: lowercased words (with apostrophes) and punctuation marks."""
    return _WORDS.findall(text.lower())


class BagOfWords:
    """Multinomial naive Bayes on word counts with Laplace (add-`alpha`) smoothing: the baseline.

    It scores class c as log P(c) + sum over the text's words w of log P(w | c), where
    P(w | c) = (count of w in class c + alpha) / (words in class c + alpha * vocabulary size).
    Word order is ignored; words never seen in training are skipped.
    """

    def __init__(self, alpha: float = 1.0):
        if not alpha > 0:
            raise ClassificationError(f"alpha={alpha!r} must be positive (1.0 is Laplace smoothing).")
        self.alpha = alpha
        self.classes: list[str] = []
        self.vocab: dict[str, int] = {}
        self.log_prior: torch.Tensor | None = None  # (K,)
        self.log_likelihood: torch.Tensor | None = None  # (K, V)
        self.counts: torch.Tensor | None = None  # (K, V) word counts per class

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "BagOfWords":
        """Count the words of each class; returns self."""
        texts, labels = list(texts), list(labels)
        if not texts or len(texts) != len(labels):
            raise ClassificationError(f"fit needs as many labels as texts, at least one each; got {len(texts)} texts "
                                      f"and {len(labels)} labels.")
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ClassificationError(f"the labels hold {len(self.classes)} class(es), {self.classes}; a classifier "
                                      f"needs at least 2.")
        tokenized = [words(text) for text in texts]
        self.vocab = {w: i for i, w in enumerate(sorted({w for ws in tokenized for w in ws}))}
        class_of = {c: k for k, c in enumerate(self.classes)}
        self.counts = torch.zeros(len(self.classes), len(self.vocab), dtype=torch.float64)
        for ws, label in zip(tokenized, labels):
            for w, n in Counter(ws).items():
                self.counts[class_of[label], self.vocab[w]] += n
        per_class = torch.tensor([labels.count(c) for c in self.classes], dtype=torch.float64)
        self.log_prior = (per_class / per_class.sum()).log()
        smoothed = self.counts + self.alpha
        self.log_likelihood = (smoothed / smoothed.sum(dim=1, keepdim=True)).log()
        return self

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, K) log P(c) + log P(words | c) of each text (a log posterior up to a constant)."""
        if self.log_likelihood is None:
            raise ClassificationError("this BagOfWords is not fitted yet; call fit(texts, labels) first.")
        if isinstance(texts, str):
            raise ClassificationError("give a list of texts, not a single string (wrap it: [text]).")
        rows = []
        for text in texts:
            ids = [self.vocab[w] for w in words(text) if w in self.vocab]
            rows.append(self.log_prior + self.log_likelihood[:, ids].sum(dim=1))
        return torch.stack(rows) if rows else torch.zeros(0, len(self.classes), dtype=torch.float64)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely class of each text."""
        return [self.classes[k] for k in self.scores(texts).argmax(dim=1).tolist()]

    def accuracy(self, examples) -> float:
        """Fraction of (text, label) examples predicted right."""
        return accuracy(self, examples)

    def top_words(self, n: int = 10) -> dict[str, list[str]]:
        """The n words most telling of each class: largest log P(w | c) - log P(w | other classes)."""
        if self.counts is None:
            raise ClassificationError("this BagOfWords is not fitted yet; call fit(texts, labels) first.")
        itos = sorted(self.vocab, key=self.vocab.get)
        result = {}
        for k, c in enumerate(self.classes):
            inside = self.counts[k] + self.alpha
            outside = self.counts.sum(dim=0) - self.counts[k] + self.alpha
            ratio = (inside / inside.sum()).log() - (outside / outside.sum()).log()
            result[c] = [itos[i] for i in ratio.argsort(descending=True)[:n].tolist()]
        return result


# ---- save / load ---------------------------------------------------------------------------------------
def save_classifier(path: str | Path, classifier: SequenceClassifier) -> Path:
    """Write `classifier` atomically as an `lm` checkpoint (`lm.save_checkpoint`) of its backbone,
    with the head, the class names and `trainable` under "classifier". It loads with
    `weights_only=True`, and `lm.load_model` reads its (fine-tuned) backbone alone."""
    head = {name: tensor.detach().cpu() for name, tensor in classifier.head.state_dict().items()}
    info = {"classes": list(classifier.classes), "head": head, "bias": classifier.head.bias is not None,
            "trainable": classifier.trainable}
    return save_checkpoint(path, classifier.backbone, extra={"classifier": info})


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> SequenceClassifier:
    """Load a classifier written by `save_classifier`, in eval mode. `device=None` picks cuda, then
    mps, then cpu."""
    ckpt = load_checkpoint(path)
    info = ckpt.get("classifier")
    if not isinstance(info, dict):
        raise CheckpointError(f"{str(path)!r} holds a language model, not a classifier; load it with lm.load_model "
                              f"and build one: lm.SequenceClassifier(model, classes).")
    backbone = model_from_checkpoint(ckpt, device="cpu")
    classifier = SequenceClassifier(backbone, info["classes"], trainable=info["trainable"], bias=info["bias"])
    classifier.head.load_state_dict(info["head"])
    return classifier.to(resolve_device(device)).eval()


__all__ = [
    "PLAYS", "TASKS", "TRAINABLE", "BagOfWords", "ClassificationError", "ClassificationTask", "ClassifierHistory",
    "SequenceClassifier", "accuracy", "classification_task", "evaluate_classifier", "last_token_index",
    "load_classifier", "passages", "play_body", "save_classifier", "train_classifier", "words",
]
