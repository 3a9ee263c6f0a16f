"""Evaluating a model on question/answer (or chat) examples: loss, perplexity, exact match, token
accuracy and decoding speed.

    result = lm.evaluate(model, lm.glossary.examples("test"))
    print(result.table())            # or result.to_dict() for JSON

Definitions (the last assistant message of each example is the reference answer; the messages
before it, laid out by the chat template, are the prompt):

- loss: mean cross-entropy per answer token, teacher-forced (the model reads the reference answer
  token by token, as in training); over every assistant turn of the example. perplexity = exp(loss).
- token accuracy: the fraction of those answer tokens that the model's most likely next token
  (argmax) gets right, teacher-forced. It is what the loss measures, counted as hits.
- exact match: the fraction of examples whose answer, generated greedily from the prompt and cut
  at the template's stop, equals the reference after `normalize_answer` (Unicode NFC, lowercase,
  runs of whitespace made one space, surrounding whitespace and final . ! ? removed).
- speed: generation runs `batch_size` prompts at a time. tokens/s = answer tokens generated per
  second of generation; ms/token = milliseconds per decoding step (one new token for every
  sequence of the batch): the wait per token of one reader. With batch_size=1 they are the usual
  single-stream figures.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .generation import Decoder, Generation, GenerationConfig
from .instructions import Examples, chat_template, load_examples

FINAL_PUNCTUATION = ".!?"


def normalize_answer(text: str) -> str:
    """The form in which answers are compared for exact match (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(FINAL_PUNCTUATION).rstrip()


@dataclass
class EvalResult:
    """What `evaluate` measured; `predictions` holds every prompt, reference and generated answer."""

    examples: int
    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float
    answer_tokens: int
    generated_tokens: int
    tokens_per_second: float
    ms_per_token: float
    generation_seconds: float
    skipped: int = 0  # examples longer than the model's block_size
    predictions: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, predictions: bool = False) -> dict:
        out = asdict(self)
        if not predictions:
            out.pop("predictions")
        return out

    def table(self) -> str:
        """The figures as an aligned two-column table."""
        rows = [
            ("examples", f"{self.examples}" + (f" ({self.skipped} skipped: too long)" if self.skipped else "")),
            ("loss (answer tokens)", f"{self.loss:.4f}"),
            ("perplexity", f"{self.perplexity:.3f}"),
            ("token accuracy", f"{100 * self.token_accuracy:.1f}%  of {self.answer_tokens} answer tokens"),
            ("exact match", f"{100 * self.exact_match:.1f}%"),
            ("tokens/s", f"{self.tokens_per_second:,.0f}  ({self.generated_tokens} generated)"),
            ("ms/token", f"{self.ms_per_token:.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@torch.no_grad()
def teacher_forced(model, encoded: list, batch_size: int) -> tuple[float, int, int]:
    """(summed answer-token loss, answer tokens, answer tokens predicted right) over `encoded`."""
    total, count, hits = 0.0, 0, 0
    device = model.device
    for start in range(0, len(encoded), batch_size):
        pairs = [e.inputs_and_targets() for e in encoded[start : start + batch_size]]
        T = max(len(x) for x, _ in pairs)
        x = torch.zeros(len(pairs), T, dtype=torch.long)
        y = torch.full((len(pairs), T), -100, dtype=torch.long)
        for b, (xi, yi) in enumerate(pairs):  # right padding: causal attention never looks past a real token
            x[b, : len(xi)], y[b, : len(yi)] = xi, yi
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        keep = y != -100
        total += F.cross_entropy(logits[keep].float(), y[keep], reduction="sum").item()
        count += int(keep.sum())
        hits += int((logits.argmax(-1)[keep] == y[keep]).sum())
    return total, count, hits


def evaluate(model, examples, *, template="human", batch_size: int = 16, max_new_tokens: int | None = None,
             config: GenerationConfig | None = None, decoder: Decoder | None = None, limit: int | None = None
             ) -> EvalResult:
    """Score `model` on `examples` (a JSONL path, `lm.Examples`, or a list of records or message
    lists): loss, perplexity and token accuracy teacher-forced; exact match and speed from greedy
    generation with the chat `template`. `max_new_tokens` defaults to the longest reference answer
    plus 8 tokens; `config` changes other generation settings (greedy by default); `limit` scores
    only the first examples."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("evaluate needs the model's tokenizer; load the model with lm.load_model.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    template = chat_template(template)
    template.check(tokenizer)
    conversations = list(examples if isinstance(examples, Examples) else load_examples(examples))
    if limit is not None:
        conversations = conversations[:limit]
    block = model.config.block_size
    kept, encoded = [], []
    for c in conversations:
        e = template.encode(c, tokenizer)
        if len(e) <= block + 1:
            kept.append(c)
            encoded.append(e)
    if not kept:
        raise ValueError(f"no example fits in the model's block_size={block} tokens; nothing to evaluate.")
    was_training = model.training
    model.eval()
    try:
        total, count, hits = teacher_forced(model, encoded, batch_size)
        predictions, generated, steps, seconds = _generate_answers(model, kept, template, batch_size,
                                                                   max_new_tokens, config, decoder)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    exact = sum(p["correct"] for p in predictions) / len(predictions)
    return EvalResult(
        examples=len(kept), loss=loss, perplexity=math.exp(min(loss, 700.0)), token_accuracy=hits / max(count, 1),
        exact_match=exact, answer_tokens=count, generated_tokens=generated,
        tokens_per_second=generated / seconds if seconds > 0 else 0.0,
        ms_per_token=1000 * seconds / steps if steps else 0.0, generation_seconds=seconds,
        skipped=len(conversations) - len(kept), predictions=predictions)


def _generate_answers(model, conversations, template, batch_size, max_new_tokens, config, decoder):
    tokenizer, device = model.tokenizer, model.device
    decoder = decoder or Decoder(model)
    references = [c[-1]["content"] for c in conversations]
    if max_new_tokens is None:
        max_new_tokens = max(len(template.encode([{"role": "user", "content": ""}, {"role": "assistant",
                                                                                       "content": r}],
                                                 tokenizer).ids) for r in references) + 8
    config = GenerationConfig.build(config or GenerationConfig(temperature=0.0), max_new_tokens=max_new_tokens,
                                    **template.generation_options(tokenizer))
    predictions, generated, steps, seconds = [], 0, 0, 0.0
    block = model.config.block_size
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [template.encode_prompt(c, tokenizer)[-block:] for c in batch]
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = True
        t0 = time.perf_counter()
        run = Generation(decoder, ids.to(device), config, mask.to(device))
        for _ in run.steps():
            pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        steps += run.length - run.start
        texts = run.texts()
        for row, (c, text) in enumerate(zip(batch, texts)):
            answer = template.cut(text)
            generated += len(run.new_ids(row))
            predictions.append({"prompt": c[-2]["content"] if len(c) >= 2 else "", "reference": c[-1]["content"],
                                "answer": answer,
                                "correct": normalize_answer(answer) == normalize_answer(c[-1]["content"])})
    return predictions, generated, steps, seconds


__all__ = ["EvalResult", "evaluate", "normalize_answer", "teacher_forced"]
