"""Generation: the loop that turns a model into text, and the settings it takes.

    prompt ids -> [model over the prompt] -> logits of the last position -> choose a token
               -> append it -> [model over that one token, with the KV cache] -> ...

- `GenerationConfig`: every setting of a generation (sampling, stopping, seed, cache, CUDA graph,
  compile), validated once. `generate`, `stream`, the CLI and every later caller build one.
- `Decoder(model)`: generates with a model and keeps between calls what is costly to build (on
  CUDA the static cache and the captured graph of the decoding step). `model.generate(...)` is a
  `Decoder` used once.
- `Generation`: the state of one call: the token buffer (preallocated for prompt plus
  max_new_tokens), the padding mask of batched prompts, the KV cache, which rows have stopped, and
  the log-probabilities of the chosen tokens. `steps()` advances one token at a time, so
  `generate` runs it to the end and `stream` yields text as it goes.

On CUDA the one-token steps replay a CUDA graph (`lm.cuda_graph`) unless `cuda_graph=False`; the
loop itself never waits for the GPU unless something must be read back (stop tokens or strings,
streaming), so Python can queue the next step while the GPU runs this one. On a CPU the Linear
weights are laid out for decoding first (`lm.quantize.for_decoding`: same values, faster reads).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from .cuda_graph import GraphedStep, graph_unsupported
from .kv_cache import KVCache
from .quantize import for_decoding
from .sampling import SamplingConfig, SamplingError, choose_next


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """Every setting of one generation. The defaults: plain sampling at temperature 1 for 100 tokens,
    stopping early at the tokenizer's end-of-text token, with the KV cache (and on CUDA a graph)."""

    max_new_tokens: int = 100
    # sampling (see lm.sampling): temperature 0 is greedy
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None  # makes the draws reproducible
    # stopping, besides max_new_tokens
    stop: tuple[str, ...] = ()  # strings: the text is cut before the first one
    stop_tokens: tuple[int, ...] = ()  # token ids
    stop_at_eos: bool = True  # at the tokenizer's end-of-text token (text prompts)
    # how: a KV cache; on CUDA a CUDA graph of the decoding step (None: whenever the model
    # allows it), compiled first with `compile`
    use_cache: bool = True
    cuda_graph: bool | None = None
    compile: bool = False

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be a non-negative integer.")
        self.sampling  # noqa: B018  (SamplingConfig checks the sampling settings)
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingError(f"seed={self.seed!r} must be an integer or None.")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop={self.stop!r} must be a non-empty string or a list of them.")
        stop_tokens = tuple(self.stop_tokens or ())
        if not all(_is_int(t) and t >= 0 for t in stop_tokens):
            raise SamplingError(f"stop_tokens={self.stop_tokens!r} must be a list of token ids (integers >= 0).")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_tokens", stop_tokens)
        for name in ("stop_at_eos", "use_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.cuda_graph not in (None, True, False):
            raise SamplingError(f"cuda_graph={self.cuda_graph!r} must be True, False or None (automatic).")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)

    @classmethod
    def build(cls, config: "GenerationConfig | None" = None, **options) -> "GenerationConfig":
        """`config` (or the defaults) with `options` changed; an unknown option names the known ones."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise SamplingError(f"config={config!r} must be a GenerationConfig; pass settings by name, e.g. "
                                f"generate(prompt, max_new_tokens={config!r}).")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SamplingError(f"unknown generation option(s) {unknown}; known: {', '.join(known)}.")
        return dataclasses.replace(config or cls(), **options)


class IncrementalText:
    """The text of a growing list of token ids, decoding only the last few tokens per update.

    Re-decoding all ids at every step costs O(n) per token, O(n^2) per generation. Instead keep two
    marks: `prefix` (where the last decoded piece started) and `read` (how far text was taken). The
    new text is decode(ids[prefix:]) minus decode(ids[prefix:read]): decoding from a token boundary
    a little before the new ids keeps what tokenizers do at the start of a text (SentencePiece drops
    a leading space) out of the difference. A piece that ends in U+FFFD is an incomplete UTF-8
    character (its remaining bytes are in tokens still to come) and waits."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text, self.prefix, self.read = tokenizer, "", 0, 0

    def update(self, ids: list[int]) -> str:
        """`ids`: all ids so far (the earlier ones unchanged); returns the text they add."""
        before = self.tokenizer.decode(ids[self.prefix:self.read])
        now = self.tokenizer.decode(ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before):]
        self.text += piece
        self.prefix, self.read = self.read, len(ids)
        return piece


def showable(pending: str, stops: list[str]) -> int:
    """How many leading characters of `pending` (text not shown yet) a stream may show now:
    everything before a stop string, and never an ending that could still grow into one."""
    hits = [pending.find(s) for s in stops if s in pending]
    if hits:
        return min(hits)
    for k in range(min(len(pending), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(pending[-k:]) for s in stops):
            return len(pending) - k
    return len(pending)


def stream_text(run: "Generation"):
    """Yield the text of row 0 of `run` piece by piece as its steps run (see `GPT.stream`)."""
    text, shown = IncrementalText(run.tokenizer), 0
    for _ in run.steps():
        text.update(run.new_ids(0))
        ready = shown + showable(text.text[shown:], run.stop_strings)
        if ready > shown:
            yield text.text[shown:ready]
            shown = ready
    final = run.texts()[0]  # decoded whole and cut at a stop string, as generate returns it
    if len(final) > shown:
        yield final[shown:]


class Decoder:
    """Generation with one model, keeping between calls what is costly to build.

        decoder = lm.Decoder(model)
        text = decoder.generate("ROMEO:", max_new_tokens=200, temperature=0.8)
        for piece in decoder.stream("ROMEO:", GenerationConfig(max_new_tokens=200)):
            print(piece, end="")

    On CUDA it keeps the static cache and the CUDA graph of the decoding step (captured, or compiled
    and captured, on first use), reused by the next call with the same batch size, length and
    compile setting while the weights stay where they are (moving or casting the model gives new
    addresses, and so a new capture). One generation at a time per decoder.
    """

    def __init__(self, model):
        self.model = model
        self._kept: tuple | None = None  # (key, static cache, graphed step)

    def generate(self, prompt, config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None,
                 return_logprobs: bool = False, **options):
        """Sample a continuation of `prompt`.

        prompt: text (needs an attached tokenizer; returns the new text, without the prompt), a list
        of texts (batched, left-padded; returns a list), or a (B, T) tensor of ids (returns
        (B, T + new) ids, prompt included; `attention_mask` (B, T) marks real tokens if padded).
        config / options: a `GenerationConfig`, and settings to change in it by name.

        Sampling: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
        no_repeat_ngram_size (see `lm.sampling`); `seed` makes the draw reproducible.
        Stopping: after max_new_tokens; at the tokenizer's end-of-text token (text prompts, when
        `stop_at_eos`); at any id in `stop_tokens`; at any string in `stop` (cut off before it).
        `return_logprobs`: also return each new token's log-probability under the model.

        With `use_cache` (default) a KV cache makes each new token cost one position; the ids are
        the same as without it while the sequence fits in block_size. Beyond block_size, the
        uncached loop feeds the last block_size tokens at every step, and the cached one starts a
        fresh cache from the last 3/4 of block_size tokens whenever it is full (so it re-reads the
        context once every block_size/4 tokens). Either way a prompt longer than block_size is read
        from its last block_size tokens, and the returned ids still hold all of it.
        """
        run = Generation(self, prompt, GenerationConfig.build(config, **options), attention_mask)
        for _ in run.steps():
            pass
        return run.result(return_logprobs)

    def stream(self, prompt: str, config: GenerationConfig | None = None, **options):
        """Yield the continuation of a text prompt piece by piece as it is generated.

        Only whole characters are yielded: when a character's UTF-8 bytes span several byte-level
        tokens, it is held back until it is complete; so is an ending that may be the start of a
        `stop` string. Each step decodes only its last few tokens. Same settings as `generate`;
        "".join(decoder.stream(...)) equals decoder.generate(...) with the same seed."""
        if not isinstance(prompt, str):
            raise ValueError("stream() takes a text prompt; use generate() for ids or lists of prompts.")
        run = Generation(self, prompt, GenerationConfig.build(config, **options), None)
        return stream_text(run)

    def cache(self, batch_size: int, max_len: int, graph: bool, compile: bool):
        """An empty KV cache, and the graphed step that decodes with it (None without a graph)."""
        if not graph:
            return KVCache(self.model, batch_size, max_len=max_len), None
        model = self.model
        addresses = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
        key = (batch_size, max_len, compile, addresses)
        if self._kept is None or self._kept[0] != key:
            self.release()  # free the old buffers before taking new ones
            cache = KVCache(model, batch_size, max_len=max_len, static=True)
            self._kept = (key, cache, GraphedStep(model, cache, compile=compile))
        _, cache, step = self._kept
        cache.reset()
        return cache, step

    def release(self) -> None:
        """Drop the static cache and CUDA graph kept for the next call."""
        self._kept = None


class Generation:
    """One call of `Decoder.generate` / `Decoder.stream`: its token buffer, cache and stopped rows."""

    def __init__(self, decoder: Decoder, prompt, config: GenerationConfig, attention_mask: torch.Tensor | None):
        model = decoder.model
        self.decoder, self.model, self.config = decoder, model, config
        self.sampling = config.sampling
        self.tokenizer = model.tokenizer
        self.kind = "ids" if isinstance(prompt, torch.Tensor) else "texts" if isinstance(prompt, (list, tuple)) else "text"
        rows, mask = self._prompt_ids(prompt, attention_mask)
        B, T0 = rows.shape
        device = model.device
        self.ids = torch.full((B, T0 + config.max_new_tokens), self._pad_id(), dtype=torch.long, device=device)
        self.ids[:, :T0] = rows.to(device)
        self.mask = None
        if mask is not None and not bool(mask.all()):
            self.mask = torch.ones(B, T0 + config.max_new_tokens, dtype=torch.bool, device=device)
            self.mask[:, :T0] = mask.to(device).bool()
        self.start = self.length = T0
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.logprobs: list[torch.Tensor] = []
        seed = config.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stop_ids = set(config.stop_tokens)
        eos = getattr(self.tokenizer, "eos_id", None)
        if self.kind != "ids" and config.stop_at_eos and eos is not None:
            stop_ids.add(eos)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.stop_strings = list(config.stop)
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text; pass stop_tokens (ids) instead.")
        self.cache, self.graph, self.cached = None, None, 0  # cached: positions in the cache
        self.cuda_graph = self._use_graph(config.cuda_graph, config.compile)
        self.stop_texts = [IncrementalText(self.tokenizer) for _ in range(B)] if self.stop_strings else None
        if device.type == "cpu":
            for_decoding(model)  # the layout a CPU reads fastest at batch 1; same values, same results

    def _use_graph(self, cuda_graph, compile) -> bool:
        """None: on CUDA whenever the model allows it. True: always (a clear error where it cannot)."""
        reason = graph_unsupported(self.model) if self.config.use_cache else "use_cache=False decodes without a cache"
        if cuda_graph and reason is not None:
            raise ValueError(f"cuda_graph=True: {reason}; pass cuda_graph=None to choose automatically.")
        if compile and not (cuda_graph or cuda_graph is None and reason is None):
            raise ValueError(f"compile=True compiles the CUDA-graph decoding step, which is off here "
                             f"({reason or 'cuda_graph=False'}).")
        return reason is None if cuda_graph is None else bool(cuda_graph)

    # ---- prompt --------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, attention_mask):
        if self.kind == "ids":
            if prompt.dim() != 2 or prompt.size(1) == 0:
                raise ValueError("prompt must be a str, a list of str, or a non-empty (B, T) tensor of token ids.")
            return prompt.long(), attention_mask
        texts = [prompt] if self.kind == "text" else list(prompt)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a str, a non-empty list of str, or a (B, T) tensor of token ids.")
        if self.tokenizer is None:
            raise ValueError("generate() got a text prompt but the model has no tokenizer; "
                             "set model.tokenizer = ... or pass a (B, T) tensor of ids.")
        encoded = [self.tokenizer.encode(t) or [self._start_id()] for t in texts]
        T = max(len(e) for e in encoded)
        rows = torch.full((len(encoded), T), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for i, e in enumerate(encoded):  # left padding: every row's last token is at the same place
            rows[i, T - len(e):] = torch.tensor(e)
            mask[i, T - len(e):] = True
        return rows, mask

    def _start_id(self) -> int:
        """An empty prompt starts from <BOS>, or from GPT-2's <|endoftext|> where there is no BOS."""
        for i in (getattr(self.tokenizer, "bos_id", None), getattr(self.tokenizer, "eos_id", None)):
            if i is not None:
                return i
        raise ValueError("the prompt is empty and the tokenizer has no BOS or EOS token to start from; "
                         "give a non-empty prompt.")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for i in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)):
            if i is not None:
                return i
        return 0

    # ---- the loop ------------------------------------------------------------------------------
    def _logits(self) -> torch.Tensor:
        """Logits (B, 1 or T, V) whose last position scores the next token."""
        model, L, block = self.model, self.length, self.model.config.block_size
        mask = self.mask
        if not self.config.use_cache:
            lo = max(0, L - block)
            return model(self.ids[:, lo:L], attention_mask=None if mask is None else mask[:, lo:L])[0]
        if self.cache is None:
            self.cache, self.graph = self.decoder.cache(self.ids.size(0), block, self.cuda_graph, self.config.compile)
        if self.cached == 0 or self.cached + 1 > block:  # prefill, or the cache is full: start afresh
            keep = min(L, block) if self.cached == 0 else (3 * block) // 4
            self.cache.reset()
            self.cached = keep
            return model(self.ids[:, L - keep:L], attention_mask=None if mask is None else mask[:, L - keep:L],
                         cache=self.cache)[0]
        self.cached += 1
        if self.graph is not None:  # the prompt's padding is in the cache's mask already; new tokens are real
            return self.graph(self.ids[:, L - 1:L])
        return model(self.ids[:, L - 1:L], attention_mask=None if mask is None else mask[:, :L], cache=self.cache)[0]

    @torch.no_grad()
    def steps(self):
        """Generate one token per iteration (all rows at once) until done; yields the step number."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for step in range(self.config.max_new_tokens):
                logits = self._logits()[:, -1, :]
                L = self.length
                history_mask = None if self.mask is None else self.mask[:, :L]
                next_ids, logp = choose_next(logits, self.ids[:, :L], self.sampling, self.generator, mask=history_mask)
                next_ids = next_ids.squeeze(1).masked_fill(self.finished, self._pad_id())
                self.ids[:, L] = next_ids
                self.logprobs.append(logp.squeeze(1).masked_fill(self.finished, 0.0))
                self.length = L + 1
                if self.stop_ids.numel():
                    self.finished |= torch.isin(next_ids, self.stop_ids)
                if self.stop_strings:
                    self._check_stop_strings()
                yield step
                # reading `finished` waits for the GPU: only when something can stop a row early
                if (self.stop_ids.numel() or self.stop_strings) and bool(self.finished.all()):
                    break
        finally:
            model.train(was_training)

    def _check_stop_strings(self) -> None:
        """Stop a row once its text holds a stop string; only the newly decoded end is searched."""
        longest = max(len(s) for s in self.stop_strings)
        for row, text in enumerate(self.stop_texts):
            piece = text.update(self.new_ids(row))
            tail = text.text[-(len(piece) + longest - 1):] if piece else ""
            if any(s in tail for s in self.stop_strings):
                self.finished[row] = True

    # ---- results -------------------------------------------------------------------------------
    def new_ids(self, row: int) -> list[int]:
        """The tokens generated for `row`, up to (not including) a stop token."""
        ids = self.ids[row, self.start:self.length].tolist()
        stops = set(self.stop_ids.tolist())
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids

    def texts(self, cut: bool = True) -> list[str]:
        out = []
        for row in range(self.ids.size(0)):
            text = self.tokenizer.decode(self.new_ids(row))
            if cut:
                hits = [text.index(s) for s in self.stop_strings if s in text]
                text = text[: min(hits)] if hits else text
            out.append(text)
        return out

    def result(self, return_logprobs: bool = False):
        logprobs = torch.stack(self.logprobs, dim=1) if self.logprobs else torch.zeros(self.ids.size(0), 0)
        if self.kind == "ids":
            out = self.ids[:, :self.length]
            return (out, logprobs) if return_logprobs else out
        texts = self.texts()
        per_row = [logprobs[row, : len(self.new_ids(row))].tolist() for row in range(len(texts))]
        if self.kind == "text":
            return (texts[0], per_row[0]) if return_logprobs else texts[0]
        return (texts, per_row) if return_logprobs else texts


__all__ = ["Decoder", "Generation", "GenerationConfig", "IncrementalText", "showable", "stream_text"]
