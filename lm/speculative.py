"""Speculative decoding: a small draft model guesses, the large target model checks several guesses
in one forward, and the text is the one the target alone would write.

At batch size 1 a decoding step reads every weight of the model to produce one token, so its time
hardly depends on how many positions it processes: scoring 5 positions costs little more than
scoring 1. Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) turns that into speed:

    1. the draft proposes k tokens d1 .. dk, one cheap forward each (greedy, or sampled);
    2. the target runs ONE forward over [last token, d1 .. dk] and so scores k+1 positions: what it
       would choose after the text, after d1, after d1 d2, ... after d1 .. dk;
    3. the longest prefix d1 .. dn that agrees with the target is kept, and the target's own token
       at position n+1 is appended (the correction at the first disagreement, or a bonus token when
       all k agreed): every step gains between 1 and k+1 tokens for one target forward;
    4. both KV caches step back (`KVCache.crop`) to the tokens kept.

Greedy (temperature 0), every kept token is the target's argmax given the text before it, so the
text is token for token what `target.generate(..., temperature=0)` writes; the draft only changes
how many target forwards that takes. With temperature > 0 a draft token d is kept with probability
min(1, p(d) / q(d)) (p the target's distribution, q the draft's), and at a rejection the token is
drawn from max(0, p - q), renormalised: the tokens are then distributed exactly as sampling from
the target, though not the same draws as `target.generate` with the same seed.

Float rounding: the target's logits for k+1 positions computed in one forward can differ in their
last bits from the same logits computed one position at a time, as `generate` does. The argmax can
only change where two tokens' logits are within that rounding of each other (about 1e-6 relative
in float32), which a trained model practically never produces; in reduced precision (bfloat16 on a
GPU) such near-ties are commoner, and an exact match with `generate` is not guaranteed there.

Past block_size the target follows `generate`'s schedule exactly: when the text outgrows the
context, it starts again from the last 3/4 of block_size tokens, so each token is chosen from the
same window as in plain greedy decoding. Needs attention whose cache keeps every key (sdpa,
manual, block_sparse): sliding-window and linear attention caches cannot step back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cuda_graph import GraphedStep, graph_unsupported, use_graph
from .decode_step import LeanStep
from .generation import refill_length, tensor_addresses
from .kv_cache import KVCache
from .quantize import for_decoding
from .sampling import SamplingConfig, process_logits


@dataclass
class SpeculativeStats:
    """What one speculative generation did.

    steps: target forwards that chose tokens (plain greedy decoding needs one per token).
    drafted / accepted: draft tokens proposed and kept. rounds: per step (the draft's tokens, how
    many of them were kept, the token the target added), to show what happened."""

    new_tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_forwards: int = 0
    rounds: list[tuple[list[int], int, int]] = field(default_factory=list, repr=False)

    @property
    def acceptance_rate(self) -> float:
        """The share of draft tokens that the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per target forward: 1 for plain decoding, up to num_draft + 1."""
        return self.new_tokens / self.steps if self.steps else 0.0


def _check_models(target, draft) -> None:
    from .model import GPT

    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, GPT):
            raise TypeError(f"{name} must be an lm.GPT, got {type(model).__name__}; load one with lm.load_model(path).")
        kinds = {block.attn.cache_kind for block in model.blocks}
        if kinds != {"keys"}:
            raise ValueError(f"the {name} model uses attention={model.config.attention!r}, whose KV cache cannot step "
                             f"back over rejected tokens; speculative decoding needs attention that caches every key "
                             f"(sdpa, manual, block_sparse).")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"the draft's vocabulary has {dv:,} tokens and the target's {tv:,}: the draft must propose "
                         f"token ids of the target's tokenizer. Use a draft trained with the same tokenizer.")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None and tt.to_dict() != dt.to_dict():
        raise ValueError(f"the draft's tokenizer ({type(dt).__name__}) is not the target's ({type(tt).__name__}), "
                         f"although both have {tv:,} tokens: the same id would mean different text. Use a draft "
                         f"trained with the target's tokenizer.")
    if target.device != draft.device:
        raise ValueError(f"the target is on {target.device} and the draft on {draft.device}; move both to the same "
                         f"device (draft.to(target.device)).")


def _prompt_ids(target, prompt) -> tuple[list[int], bool]:
    """The prompt as a list of ids, and whether it was text."""
    if isinstance(prompt, str):
        tok = target.tokenizer
        if tok is None:
            raise ValueError("the prompt is text but the target model has no tokenizer; attach one "
                             "(target.tokenizer = ...) or pass a (1, T) tensor of token ids.")
        start = next((i for i in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)) if i is not None), None)
        ids = tok.encode(prompt) or ([start] if start is not None else [])
        if not ids:
            raise ValueError("the prompt is empty and the tokenizer has no BOS or EOS token to start from; "
                             "give a non-empty prompt.")
        return ids, True
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a str or a (1, T) tensor of token ids, got {type(prompt).__name__}.")
    if prompt.dim() != 2 or prompt.size(1) == 0 or prompt.is_floating_point():
        raise ValueError(f"prompt must be a non-empty (1, T) tensor of integer token ids, got shape "
                         f"{tuple(prompt.shape)} and dtype {prompt.dtype}.")
    if prompt.size(0) != 1:
        raise ValueError(f"speculative decoding here handles one sequence at a time, got a batch of "
                         f"{prompt.size(0)}; call it once per row, or use target.generate for batches.")
    return prompt[0].tolist(), False


def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def _scores(model, ids: torch.Tensor, cache: KVCache, last: int) -> torch.Tensor:
    """Logits (last, V) of the last `last` positions of ids (1, T) fed after the cached ones.

    `model(ids, cache=cache)` sends only the final position through the head (all that plain
    decoding needs); verifying k draft tokens needs the scores after each of them (`all_logits`)."""
    return model(ids, cache=cache, all_logits=True)[0][0, -last:]


class _Window:
    """One model's KV cache and the tokens in it: positions start .. fed-1 of the text.

    Past block_size it starts afresh from the last 3/4 of block_size tokens, as `generate` does.
    `graphed`: a static cache with CUDA graphs (`lm.cuda_graph`): the draft's greedy guesses are
    `GraphedStep.run` (k replays, nothing read back), and the target's check of k+1 positions is a
    graph too (`GraphedPrefill(all_logits=True)`, captured when the same k comes a second time)."""

    def __init__(self, model, max_len: int, graphed: bool = False, greedy: bool = False):
        self.model, self.block = model, model.config.block_size
        self.cache = KVCache(model, batch_size=1, max_len=max_len, static=graphed)
        self.graph = GraphedStep(model, self.cache, greedy=greedy) if graphed else None
        self.start = self.fed = 0
        # forwards without the module machinery (`lm.decode_step`): the draft's guesses, the target's check
        self.lean = LeanStep(model) if not graphed and LeanStep.unsupported(model) is None else None

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) after feeding ids (1, T) to the cache."""
        if self.graph is not None:
            if ids.size(1) == 1:
                return self.graph(ids)[:, -1]
            return self.graph.prefill(ids, start=self.fed - self.start)[:, -1]
        if self.lean is not None and LeanStep.usable(self.cache, ids.size(1)):
            return self.lean(ids, self.cache, last=1)[:, -1]
        return self.model(ids, cache=self.cache)[0][:, -1]

    def scores(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        """Logits (last, V) of the last `last` positions of ids (1, T) fed after the cached ones."""
        if self.graph is not None:
            return self.graph.prefill(ids, start=self.fed - self.start, all_logits=True)[0, -last:]
        if self.lean is not None and LeanStep.usable(self.cache, ids.size(1)):
            return self.lean(ids, self.cache, last=last)[0]
        return _scores(self.model, ids, self.cache, last)

    def reset(self) -> None:
        """Empty, for a new text (the cache's tensors, and so its graphs, stay)."""
        self.cache.reset()
        self.start = self.fed = 0

    def make_room(self, length: int, more: int) -> None:
        """Before feeding tokens fed .. length-1 and `more` after them: start afresh if they do not fit."""
        if length + more - self.start > self.block:
            self.start = length - refill_length(self.block)
            self.fed = self.start
            self.cache.reset()

    def keep(self, fed: int) -> None:
        """Keep the cached positions up to (not including) `fed`; forget those after."""
        self.cache.crop(fed - self.start)
        self.fed = fed


def _choose(logits: torch.Tensor, config: SamplingConfig | None, generator, draw: bool = True):
    """(N, V) logits -> (ids (N,) or None without `draw`, probabilities (N, V) or None when greedy)."""
    if config is None:
        return logits.argmax(-1), None
    probs = process_logits(logits, logits.new_empty(logits.size(0), 0, dtype=torch.long), config).softmax(-1)
    return (torch.multinomial(probs, 1, generator=generator)[:, 0] if draw else None), probs


def _verify_sampled(drafts, q, p, generator) -> tuple[int, int]:
    """Rejection sampling over k drafts: (how many are kept, the token after them).

    d_i (drawn from q_i) is kept with probability min(1, p_i(d_i) / q_i(d_i)). At the first rejection
    the token comes from max(0, p_i - q_i), renormalised; if all k are kept, from p_k. Either way
    each token is distributed as p (Leviathan et al. 2023, appendix A)."""
    k = drafts.numel()
    if k == 0:
        return 0, int(torch.multinomial(p[0], 1, generator=generator))
    rows = torch.arange(k, device=drafts.device)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    u = torch.rand(k, device=drafts.device, generator=generator)
    kept = int((u * q_d < p_d).to(torch.long).cumprod(0).sum())
    if kept == k:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    residual = (p[kept] - q[kept]).clamp(min=0)
    residual = residual if float(residual.sum()) > 0 else p[kept]  # p == q to the last bit: never rejects
    return kept, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@torch.no_grad()
def speculative_generate(target, draft, prompt, max_new_tokens: int = 100, *, num_draft: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, seed: int | None = None, return_stats: bool = False,
                         cuda_graph: bool | None = None):
    """Generate with `target`, `draft` proposing `num_draft` tokens per target forward.

    prompt: text (needs the target's tokenizer; returns the new text, cut at the end-of-text token as
    `generate` does) or a (1, T) tensor of ids (returns (1, T + max_new_tokens) ids). Batch size 1.
    temperature 0 (the default) is greedy: the same tokens as `target.generate(prompt,
    max_new_tokens, temperature=0)`, whatever the draft (see the module's note on float rounding).
    temperature > 0, with top_k / top_p / min_p: speculative sampling, distributed as sampling from
    the target with those settings; `seed` makes it reproducible. The history penalties
    (repetition_penalty, no_repeat_ngram_size) are not supported.
    return_stats: also return a `SpeculativeStats` (acceptance rate, tokens per target forward).
    cuda_graph: on CUDA (None: whenever both models allow it) both models decode on static caches
    through CUDA graphs, as `generate` does: the draft's guesses and the target's check replay graphs,
    kept with the target for the next call with the same draft.

    Both models need the same tokenizer (vocab_size, and the same tokens where both have one
    attached) and the same device. On a CPU their Linear weights are laid out for decoding first,
    as `generate` does (`lm.quantize.for_decoding`: same values).
    """
    _check_models(target, draft)
    _positive_int("max_new_tokens", max_new_tokens, 0)
    _positive_int("num_draft", num_draft, 1)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    config = sampling if temperature > 0 else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer or None.")
    tokens, is_text = _prompt_ids(target, prompt)
    device = target.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None and config else None
    eos = getattr(target.tokenizer, "eos_id", None) if is_text else None
    # A window never holds more than a block, nor more than the whole text: short texts take small caches.
    total = len(tokens) + max_new_tokens + num_draft
    graphed = use_graph(cuda_graph, graph_unsupported(target) or graph_unsupported(draft))
    busy = target.decoder.busy  # the target's kept decoding state: one user at a time
    mine = graphed and busy.acquire(blocking=False)
    try:
        target_window, draft_window = _windows(target, draft, total, graphed, config is None, keep=mine)
    except BaseException:
        if mine:
            busy.release()
        raise
    # At most a quarter of the draft's context per step, so its window always fits the guesses.
    num_draft = min(num_draft, max(1, draft.config.block_size // 4))
    stats = SpeculativeStats()
    modes = [(m, m.training) for m in (target, draft)]
    if device.type == "cpu":
        for m in (target, draft):
            for_decoding(m)
    try:
        target.eval()
        draft.eval()
        start = len(tokens)
        # as generate: a prompt longer than the context is read from its last block_size tokens
        target_window.start = target_window.fed = max(0, start - target_window.block)
        while len(tokens) - start < max_new_tokens:
            length = len(tokens)
            target_window.make_room(length, 0)
            k = min(num_draft, target_window.block - (length - target_window.start),
                    max_new_tokens - (length - start) - 1)
            drafts, q = _propose(draft_window, tokens, k, config, generator, stats)
            new = torch.tensor([tokens[target_window.fed:length]], device=device)
            logits = target_window.scores(torch.cat([new, drafts[None]], 1), k + 1)
            if config is None:  # the guesses and the target's choices read back together: one wait
                both = torch.cat([drafts, logits.argmax(-1)]).tolist()
                proposed, choices = both[:k], both[k:]
                kept = next((i for i in range(k) if proposed[i] != choices[i]), k)
                token = choices[kept]
            else:
                proposed = drafts.tolist()
                kept, token = _verify_sampled(drafts, q, _choose(logits, config, None, draw=False)[1], generator)
            tokens += proposed[:kept] + [token]
            target_window.keep(length + kept)
            if k:
                draft_window.keep(min(draft_window.fed, length + kept))
            stats.steps += 1
            stats.drafted += k
            stats.accepted += kept
            stats.rounds.append((proposed, kept, token))
            if eos is not None and eos in tokens[length:]:
                del tokens[tokens.index(eos, length):]
                break
    finally:
        for m, mode in modes:
            m.train(mode)
        if mine:
            busy.release()
    stats.new_tokens = len(tokens) - start
    out = target.tokenizer.decode(tokens[start:]) if is_text else torch.tensor([tokens], device=device)
    return (out, stats) if return_stats else out


def _windows(target, draft, total: int, graphed: bool, greedy: bool, keep: bool) -> list[_Window]:
    """The target's and the draft's windows for a text of `total` positions: new ones, or with CUDA
    graphs and `keep`, the pair the target's `decoder` keeps from the last call with this draft (their graphs
    then replay at once instead of being captured again), while the weights stay where they are and
    the caches are long enough. A new pair gets the next power of two of positions (at least 64, at
    most each model's block_size), as `lm.Decoder` sizes its cache."""
    models = (target, draft)
    if not graphed or not keep:
        return [_Window(m, min(m.config.block_size, total), graphed, greedy) for m in models]
    key = (id(draft), greedy, tensor_addresses(*models))  # the kept windows hold the draft, so its id stays its own
    holder = target.decoder  # model.decoder.release() frees them with the rest
    kept = holder.speculative
    if kept is None or kept[0] != key or any(w.cache.max_len < min(w.block, total) for w in kept[1]):
        holder.speculative = None  # free the old caches before taking new ones
        size = max(64, 1 << (total - 1).bit_length())
        kept = holder.speculative = (key, [_Window(m, min(m.config.block_size, size), True, greedy) for m in models])
    for window in kept[1]:
        window.reset()
    return kept[1]


def _propose(window: _Window, tokens: list[int], k: int, config, generator, stats) -> tuple:
    """The draft's k guesses after `tokens` (a (k,) tensor on the device), and their distributions
    (k, V) when sampling. Feeds the draft what it has not seen yet, then one guess at a time; the
    last guess is never fed (if it is kept, the next step feeds it)."""
    model, length = window.model, len(tokens)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=model.device), None
    window.make_room(length, k - 1)
    ids = torch.tensor([tokens[window.fed:length]], device=model.device)
    graph = window.graph
    if graph is not None and graph.greedy:  # feed all but the last new token, then k greedy replays
        if ids.size(1) > 1:
            window.step(ids[:, :-1])
        guesses = graph.run(ids[:, -1:], k, position=length - 1 - window.start)[0].clone()
        stats.draft_forwards += k
        window.fed = length + k - 1
        return guesses, None
    guesses, dists = [], []
    for i in range(k):
        logits = window.step(ids)
        guess, probs = _choose(logits, config, generator)
        guesses.append(guess)
        dists.append(probs)
        ids = guess[None]
    stats.draft_forwards += k
    window.fed = length + k - 1
    return torch.cat(guesses), None if config is None else torch.cat(dists)


__all__ = ["SpeculativeStats", "speculative_generate"]
