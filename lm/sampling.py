"""Choosing the next token from a model's logits.

Each step is a small function of a (B, V) logits tensor that returns new logits (the caller's tensor
is never changed), so the pieces can be tested, plotted and combined. `process_logits` applies them
in Hugging Face's order:

    repetition_penalty -> no_repeat_ngram -> apply_temperature -> top_k_filter -> top_p_filter -> min_p_filter

and `choose_next` draws from the softmax of the result (or takes the argmax when temperature is 0).
A filtered-out token gets a logit of -inf, so its probability is exactly 0. Each row of the batch
is processed on its own: its own history for the penalties, its own threshold for the filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fused_topk


class SamplingError(ValueError):
    """A generation argument is invalid; the message names it and the valid range."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """How to turn logits into the next token. The defaults switch every step off: plain sampling."""

    temperature: float = 1.0           # 0 = greedy: the most likely token after the penalties
    top_k: int | None = None           # keep the k most likely tokens
    top_p: float | None = None         # keep the fewest most likely tokens whose probability sums to >= top_p
    min_p: float | None = None         # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0    # > 1 discourages tokens that already occurred, < 1 encourages them
    no_repeat_ngram_size: int = 0      # n > 0: never repeat an n-gram

    def __post_init__(self):
        # Written as "not (valid)" so that NaN fails too.
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise SamplingError(f"temperature={self.temperature!r} must be a finite number >= 0 "
                                f"(0 means greedy: always the most likely token).")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise SamplingError(f"top_k={self.top_k!r} must be a positive integer or None (no filtering).")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1] or None (no filtering).")
        if self.min_p is not None and not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise SamplingError(f"min_p={self.min_p!r} must be in [0, 1] or None (no filtering).")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise SamplingError(f"repetition_penalty={self.repetition_penalty!r} must be a number > 0 "
                                f"(1.0 means no penalty).")
        if not (_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0):
            raise SamplingError(f"no_repeat_ngram_size={self.no_repeat_ngram_size!r} must be an integer >= 0 "
                                f"(0 means off).")

    @property
    def needs_history(self) -> bool:
        """Whether a penalty is on: they read the tokens each row has made so far."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size != 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: the next token is the argmax of the raw logits."""
        return self.temperature == 0 and not self.needs_history

    @property
    def graphable(self) -> bool:
        """A draw (temperature > 0) with no penalty: fixed kernels on the logits alone, which a CUDA
        graph can record (`lm.cuda_graph.GraphedStep(sampling=...)`)."""
        return self.temperature > 0 and not self.needs_history


# --- Penalties: they look at the tokens each row has produced so far, previous_ids (B, t). ------------
# `mask` (B, t) marks the real tokens; padding positions (False) are ignored.


def _occurred(previous_ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, V) bool: which tokens occur (at an unmasked position) in each row of previous_ids."""
    if mask is not None:  # send padding to a spare column V, dropped below
        previous_ids = previous_ids.masked_fill(~mask, vocab_size)
    seen = torch.zeros(previous_ids.size(0), vocab_size + 1, dtype=torch.bool, device=previous_ids.device)
    return seen.scatter_(1, previous_ids, True)[:, :vocab_size]


def repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Make tokens that already occurred less likely (CTRL, Keskar et al. 2019): a positive logit is
    divided by `penalty`, a negative one multiplied, so penalty > 1 always lowers it. Each token is
    penalised once, however often it occurred."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(_occurred(previous_ids, logits.size(-1), mask), penalised, logits)


def no_repeat_ngram(
    logits: torch.Tensor, previous_ids: torch.Tensor, n: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Ban (-inf) every token that would complete an n-gram already present in the row's history.

    The last n-1 tokens are the start of the next n-gram; every earlier n-gram that starts the same
    way bans its last token. n=1 bans every token seen; n=0 bans nothing.
    """
    out = logits.clone()
    if n == 0:
        return out
    for row, ids in enumerate(previous_ids):  # rows differ in length once padding is dropped
        if mask is not None:
            ids = ids[mask[row]]
        if len(ids) < n:
            continue
        ngrams = ids.unfold(0, n, 1)                     # (t - n + 1, n): every n-gram of the row
        prefix = ids[len(ids) - n + 1 :]                 # (n - 1,): what the next token would extend
        banned = ngrams[(ngrams[:, :-1] == prefix).all(dim=1), -1]
        out[row, banned] = float("-inf")
    return out


# --- Reshaping the distribution. ----------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature`: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


# --- Filters: each keeps the most likely token, sets the others it drops to -inf. ---------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row and set the rest to -inf (ties at the k-th value are kept).
    On a GPU the k-th largest comes from two Triton kernels (`lm.fused_topk`), the same value as
    torch.topk's (the whole filter of one row of 50,304 at k = 50 on an H200: 15 us, 55 with torch.topk)."""
    k = min(k, logits.size(-1))
    kth = fused_topk.kth_largest(logits, k) if k < logits.size(-1) else None
    if kth is not None:
        kth = kth[:, None]
    else:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the fewest most likely tokens whose probabilities
    sum to >= p, and set the rest to -inf. The most likely token is always kept. Ties with the least
    likely kept token are kept too (as in top_k_filter), so the result does not depend on sort order.
    p=1 keeps every token.
    """
    if p >= 1:
        return logits.clone()
    # Equivalently, drop the least likely tokens while their total is <= 1 - p. Summing from the
    # least likely end is what Hugging Face does, so float rounding at the cut agrees with it too.
    sorted_logits = logits.sort(dim=-1).values  # ascending
    mass_from_bottom = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    n_drop = (mass_from_bottom[..., :-1] <= 1 - p).sum(dim=-1, keepdim=True)  # never the most likely
    smallest_kept = sorted_logits.gather(-1, n_drop)
    return logits.masked_fill(logits < smallest_kept, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens whose probability is at least min_p times
    that of the most likely token, and set the rest to -inf. The cut follows the model's confidence:
    a sharp distribution keeps few tokens, a flat one many. min_p=0 keeps all, min_p=1 only the top."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


# --- Putting it together. -----------------------------------------------------------------------------


def process_logits(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    config: SamplingConfig,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every step that `config` switches on to (B, V) logits, in Hugging Face's order; returns
    new float32 logits. previous_ids (B, t) is each row's history (prompt and generated tokens) for
    the penalties, `mask` (B, t) its real (non-padding) positions.

    With temperature 0 (greedy) only the penalties apply: the filters all keep the most likely token,
    so they could not change the argmax.
    """
    logits = logits.to(torch.float32, copy=True)  # a copy, so returning it never aliases the input
    if config.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, previous_ids, config.repetition_penalty, mask)
    if config.no_repeat_ngram_size > 0:
        logits = no_repeat_ngram(logits, previous_ids, config.no_repeat_ngram_size, mask)
    if config.temperature == 0:
        return logits
    logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p is not None:
        logits = min_p_filter(logits, config.min_p)
    return logits


def check_a_token_is_left(processed: torch.Tensor, config: SamplingConfig) -> None:
    """Raise a SamplingError if some row of the processed (B, V) logits bans every token (all -inf).

    Such a row has no distribution to draw from (its softmax is NaN) and no meaningful argmax.
    Of the steps, only no_repeat_ngram sets finite logits to -inf whatever their size: the
    penalty is finite and every filter keeps the row's most likely token. So the check runs only
    when no_repeat_ngram is on, and the usual path pays no host sync for it (no_repeat_ngram
    itself already syncs for every row).
    """
    n = config.no_repeat_ngram_size
    if n == 0:
        return
    nothing_left = torch.isneginf(processed).all(dim=-1)
    if bool(nothing_left.any()):
        row = int(nothing_left.nonzero()[0])
        raise SamplingError(
            f"no_repeat_ngram_size={n} banned every token of row {row}: each of the {processed.size(-1)} "
            f"tokens would repeat a {n}-gram already in that row's history. Lower no_repeat_ngram_size "
            f"(0 turns it off) or generate fewer tokens (max_new_tokens).")


def choose_next(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row of (B, V) logits; returns (next_ids (B, 1) long, logprobs (B, 1) float).

    Greedy (argmax) when config.temperature is 0, otherwise a draw from the processed distribution
    using `generator` (seed it for reproducible draws). `logprobs` are the chosen tokens'
    log-probabilities under the model's own, unprocessed distribution (log_softmax of the raw
    logits): the model's score for the text, which does not change with the sampling settings.
    These are the `scores` the generation API reports. (Hugging Face's `output_scores` gives the
    processed logits instead; its `output_logits` the raw ones.) `logprobs=False` skips them
    (None): generation asks only when they will be returned.

    Raises a SamplingError when no_repeat_ngram_size leaves a row no token to choose.
    """
    if config.plain_greedy:
        # plain greedy: nothing to process, and the argmax of the raw logits is that of their
        # float32 copy (widening is exact), without making the copy
        next_ids = logits.argmax(dim=-1, keepdim=True)
    else:
        processed = process_logits(logits, previous_ids, config, mask)
        check_a_token_is_left(processed, config)
        if config.temperature == 0:
            next_ids = processed.argmax(dim=-1, keepdim=True)
        else:
            next_ids = torch.multinomial(processed.softmax(dim=-1), num_samples=1, generator=generator)
    if not logprobs:
        return next_ids, None
    return next_ids, chosen_logprobs(logits, next_ids)


def chosen_logprobs(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1): the log-probabilities of next_ids (B, 1) under the raw (B, V) logits, in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, next_ids)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Pick one token id per row of (B, V) logits; returns (B, 1). temperature=0 is greedy.

    The history-free shortcut for choose_next: no penalties, no log-probabilities.
    """
    config = SamplingConfig(temperature, top_k, top_p, min_p)
    no_history = torch.empty(logits.size(0), 0, dtype=torch.long, device=logits.device)
    return choose_next(logits, no_history, config, generator)[0]
