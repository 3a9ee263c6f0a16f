"""Supervised fine-tuning: from a pretrained model to one that answers, trained only on answers.

    model = lm.load_model("runs/base/best.pt")
    history = lm.finetune(model, "chat.jsonl", lm.FinetuneConfig(max_steps=300, out_dir="runs/chat"))
    history = lm.finetune(model, lm.glossary.examples("train"), lm.FinetuneConfig(lora_rank=8))

What happens:

    examples (any format of lm.instructions) -> conversations
      -> chat template -> ids, and which ids are the assistant's        (lm.instructions)
      -> x = ids[:-1], y = ids[1:] with -100 on every prompt token      (prompt masking: the loss
                                                                         counts answer tokens only)
      -> batches: right-padded to the longest example of the micro-batch with a (B, T) mask, or
         packed several to a row with a (B, T, T) document mask (`packing=True`)
      -> lm.Trainer: a fresh AdamW and warmup + cosine schedule, evaluation on held-out examples,
         early stopping (seed 001: patience 5 evaluations, min_delta 0.001), checkpoints, resume

With `lora_rank`, low-rank adapters (lm.lora) are put on the chosen layers first and only they are
trained; `out_dir/adapters.safetensors` then holds just them. Fewer than 10 examples gets a warning (seed
001's threshold); examples that do not fit in `seq_len + 1` tokens, or have no answer tokens, are
skipped and counted.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .attention.masks import document_mask
from .data import Batches, to_device
from .instructions import TEMPLATES, Encoded, Examples, chat_template, load_examples
from .model import GPT
from .trainer import TrainConfig, Trainer, TrainHistory, TrainingError
from .training import resolve_batch_size

FEW_EXAMPLES = 10  # below this, seed 001 warns that fine-tuning will barely adapt the model


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig with fine-tuning's defaults (seed 001: lr 3e-4, evaluation every 50 steps,
    early stopping after 5 evaluations without an improvement of 0.001) and its own settings."""

    DEFAULT_MAX_STEPS: ClassVar[int] = 300  # when neither max_steps nor epochs is given
    max_steps: int | None = None
    batch_size: int | str = 8
    lr: float = 3e-4
    warmup_steps: int = 20
    eval_interval: int = 50
    eval_iters: int = 10
    patience: int | None = 5
    min_delta: float = 0.001
    sampling: str = "epoch"  # every example once per epoch, in a new order each epoch
    template: str = "human"  # chat template: "human" (seed 001) or "special" (seed 000's tokens)
    packing: bool = False  # several examples per row, kept apart by a document mask
    train_on_prompt: bool = False  # also learn to predict the prompt's tokens (off: the loss sees answers only)
    val_fraction: float = 0.1  # held out for evaluation when no val_examples are given
    lora_rank: int | None = None  # train low-rank adapters of this rank instead of every weight
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("qkv", "proj")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.template not in TEMPLATES:
            raise TrainingError(f"template={self.template!r} is not one of {TEMPLATES.names()}.")
        if not 0 <= self.val_fraction < 1:
            raise TrainingError(f"val_fraction={self.val_fraction!r} must be in [0, 1).")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise TrainingError(f"lora_rank={self.lora_rank!r} must be a positive integer (e.g. 8), or None to "
                                f"fine-tune every weight.")
        self.lora_targets = tuple(self.lora_targets)

    def lora(self):
        """The LoRAConfig these settings describe (None without lora_rank)."""
        if self.lora_rank is None:
            return None
        from .lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)


# ---- examples -> ids -------------------------------------------------------------------------
def encode_examples(conversations, tokenizer, template, max_len: int, train_on_prompt: bool = False
                    ) -> tuple[list[Encoded], dict[str, int]]:
    """Encode conversations with the template; skip (and count) those longer than `max_len`
    tokens and those with no answer token to learn from. `train_on_prompt` marks every token as
    trained (plain language modelling on the laid-out text, for comparison)."""
    template = chat_template(template)
    encoded, skipped = [], {}
    for conversation in conversations:
        e = template.encode(conversation, tokenizer)
        if train_on_prompt:
            e = Encoded(e.ids, [True] * len(e.ids))
        reason = (f"longer than {max_len} tokens" if len(e) > max_len
                  else "no answer tokens" if not any(e.trained[1:]) else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            encoded.append(e)
    return encoded, skipped


class SupervisedData:
    """Encoded examples as a source of training batches (what `lm.Trainer` takes instead of token ids).

    Each example becomes x = ids[:-1] and y = ids[1:] with -100 where the target is not an answer
    token. Without packing a batch holds whole examples, right-padded (x with `pad_id`, y with
    -100) to the longest, with a (B, T) mask. With packing, examples are laid end to end in rows of
    at most `seq_len` positions, each position tagged with its example; the (B, T, T) mask lets a
    position see only its own example, so no example reads another's tokens.
    """

    def __init__(self, encoded: list[Encoded], seq_len: int, pad_id: int, packing: bool = False):
        if not encoded:
            raise TrainingError("no examples to train on: every one was skipped or the list is empty.")
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        pairs = [e.inputs_and_targets() for e in encoded]
        self.items = self._pack(pairs, seq_len) if packing else [[pair] for pair in pairs]

    @staticmethod
    def _pack(pairs, seq_len: int) -> list[list]:
        """Rows of examples, each row filled in order until the next example would not fit."""
        rows, row, used = [], [], 0
        for x, y in pairs:
            if row and used + len(x) > seq_len:
                rows.append(row)
                row, used = [], 0
            row.append((x, y))
            used += len(x)
        return rows + [row]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def answer_tokens(self) -> int:
        """How many targets are answer tokens (what the loss is computed on)."""
        return sum(int((y != -100).sum()) for row in self.items for _, y in row)

    def batches(self, batch_size: int, seq_len: int, *, seed: int = 0, mode: str = "epoch",
                grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1) -> "ExampleBatches":
        return ExampleBatches(self, batch_size, seed=seed, mode=mode, grad_accum_steps=grad_accum_steps,
                              rank=rank, world_size=world_size)

    def collate(self, rows: list[list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y (B, T) and the mask of `rows`, padded to the longest row."""
        T = max(sum(len(x) for x, _ in row) for row in rows)
        B = len(rows)
        xs = torch.full((B, T), self.pad_id, dtype=torch.long)
        ys = torch.full((B, T), -100, dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.long)  # padding is document -1
        for b, row in enumerate(rows):
            at = 0
            for d, (x, y) in enumerate(row):
                xs[b, at : at + len(x)], ys[b, at : at + len(x)], doc[b, at : at + len(x)] = x, y, d
                at += len(x)
        mask = document_mask(doc) if self.packing else doc >= 0
        return xs, ys, mask


class ExampleBatches(Batches):
    """The stream of batches of a SupervisedData: whole examples (or packed rows) instead of windows,
    drawn at random or epoch by epoch exactly as `Batches` draws windows, with the same resumable
    state and the same split across processes."""

    def __init__(self, data: SupervisedData, batch_size: int, *, seed: int = 0, mode: str = "epoch",
                 grad_accum_steps: int = 1, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.seq_len, self.seed, self.mode = data, batch_size, data.seq_len, seed, mode
        self.grad_accum_steps, self.rank, self.world_size = grad_accum_steps, rank, world_size
        self._start_drawing(random_range=len(data), n_windows=len(data))
        self._tokens = 0

    @property
    def tokens_per_step(self) -> int:
        """Real (not padding) input tokens of the last step drawn, all processes together."""
        return self._tokens

    def next_step(self, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        drawn = self._draw()
        items = self.data.items
        self._tokens = sum(len(x) for i in drawn for x, _ in items[i])
        micro = []
        for m in range(self.grad_accum_steps):
            x, y, mask = self.data.collate([items[i] for i in self._mine(drawn, m)])
            micro.append((to_device(x, device), to_device(y, device), to_device(mask, device)))
        return micro


# ---- the run ---------------------------------------------------------------------------------
def split_examples(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `val_fraction` (at least one example) held out."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 and len(order) > 1 else 0
    train = [conversations[i] for i in order[: len(order) - n_val]]
    return train, [conversations[i] for i in order[len(order) - n_val :]]


def _as_examples(source) -> Examples:
    return source if isinstance(source, Examples) else load_examples(source)


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's PAD, else its end-of-text, else 0 (never trained on)."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0


def finetune(
    model: GPT,
    examples,
    config: FinetuneConfig | None = None,
    *,
    val_examples=None,
    callback: Callable[[TrainHistory], None] | None = None,
    resume=None,
) -> TrainHistory:
    """Fine-tune `model` in place on instruction or chat `examples` and return the history.

    examples / val_examples: a JSONL path, `lm.Examples`, or a list of records or of message lists
    (see `lm.instructions`). Without val_examples, `config.val_fraction` of the examples is held
    out. The model's own tokenizer encodes them. `resume` as in `lm.train` ("auto" continues the
    run in config.out_dir). With `config.lora_rank`, adapters are added to the model (unless it
    has them already) and only they train; with an out_dir they are also saved alone to
    out_dir/adapters.safetensors. The model is left in eval mode.
    """
    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise TrainingError("finetune takes a FinetuneConfig (a TrainConfig with fine-tuning's defaults and "
                            "settings): lm.FinetuneConfig(max_steps=..., lr=..., ...).")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise TrainingError("the model has no tokenizer to encode the examples with; load it with lm.load_model "
                            "or set model.tokenizer.")
    template = chat_template(config.template)
    template.check(tokenizer)
    train_set = _as_examples(examples)
    if val_examples is None:
        train_set, val_set = split_examples(list(train_set), config.val_fraction, config.seed)
        if not val_set:
            warnings.warn("no examples are held out for evaluation (val_fraction=0 or a single example): the "
                          "validation loss is measured on the training examples.", stacklevel=2)
            val_set = train_set
    else:
        val_set = _as_examples(val_examples)
    if len(train_set) < FEW_EXAMPLES:
        warnings.warn(f"only {len(train_set)} training examples: fine-tuning on fewer than {FEW_EXAMPLES} adapts "
                      f"the model very little and overfits fast; 50 or more work better.", stacklevel=2)
    seq_len = config.seq_len or model.config.block_size
    train_encoded, skipped = encode_examples(train_set, tokenizer, template, seq_len + 1, config.train_on_prompt)
    val_encoded, val_skipped = encode_examples(val_set, tokenizer, template, seq_len + 1)  # scored on answers
    for name, counts in (("training", skipped), ("validation", val_skipped)):
        if counts:
            room = (f"raise seq_len up to the model's block_size={model.config.block_size}, or shorten them"
                    if seq_len < model.config.block_size else "shorten them, or fine-tune a model of a larger block_size")
            warnings.warn(f"skipped {name} examples: {counts} (seq_len={seq_len}; {room}).", stacklevel=2)
    pad_id = pad_id_of(tokenizer)
    train_data = SupervisedData(train_encoded, seq_len, pad_id, config.packing)
    val_data = SupervisedData(val_encoded, seq_len, pad_id, config.packing)
    lora = config.lora()
    if lora is not None and getattr(model, "lora_config", None) is None:
        from .lora import apply_lora

        apply_lora(model, lora)
    config, _ = resolve_batch_size(model, config)
    history = Trainer(model, train_data, val_data, config, callback=callback, resume=resume).fit()
    if lora is not None and config.out_dir:
        from .lora import save_adapters

        save_adapters(model, Path(config.out_dir) / "adapters.safetensors")
    return history


__all__ = ["ExampleBatches", "FEW_EXAMPLES", "FinetuneConfig", "SupervisedData", "encode_examples", "finetune",
           "pad_id_of", "split_examples"]
