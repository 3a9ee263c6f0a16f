"""Generation: the loop that turns a model into text, and the settings it takes.

    prompt ids -> [model over the prompt] -> logits of the last position -> choose a token
               -> append it -> [model over that one token, with the KV cache] -> ...

- `GenerationConfig`: every setting of a generation (sampling, stopping, seed, cache, CUDA graph,
  compile), validated once. `generate`, `stream`, the CLI and every later caller build one.
- `Decoder(model)`: generates with a model and keeps between calls what is costly to build (on
  CUDA the static cache and the captured graph of the decoding step). `model.generate(...)` is a
  `Decoder` used once.
- `Generation`: the state of one call: the token buffer (grown as tokens come, so a huge
  max_new_tokens reserves nothing up front), the padding mask of batched prompts, the KV cache
  (never more positions than the prompt and new tokens need, nor than block_size), which rows have
  stopped, and the log-probabilities of the chosen tokens. `steps()` advances one token at a time,
  so `generate` runs it to the end and `stream` yields text as it goes.
- `TextStream`: the text of tokens arriving one at a time, decoded and searched for stop strings
  at a constant cost per token; `stream`, `lm.chat` and `lm.serving` all use it.

On CUDA the one-token steps replay a CUDA graph (`lm.cuda_graph`) unless `cuda_graph=False`, and
so does the prompt's forward from the second prompt of a length bucket on; the
loop itself never waits for the GPU unless something must be read back (stop tokens or strings,
streaming), so Python can queue the next step while the GPU runs this one. On a CPU the Linear
weights are laid out for decoding first (`lm.quantize.for_decoding`: same values, faster reads),
and the one-token steps run as `lm.decode_step.LeanStep`, whose float32 products and attention go
through lm's compiled kernels where they run (`lm.cpu_kernels`), else through oneDNN where that is
faster (two threads or more, 32 MiB of weights and more: `lm.decode_step.onednn_pays`).
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import threading
from dataclasses import dataclass

import torch

from . import fused_sampling
from .cuda_graph import STOP_SLOTS, GraphedStep, graph_unsupported, use_graph
from .fused_sampling import Draw
from .decode_step import LeanStep
from .kv_cache import KVCache
from .quantize import for_decoding
from .sampling import SamplingConfig, SamplingError, choose_next, chosen_logprobs


FIRST_ROOM = 1024  # new tokens the buffers of a generation hold before they first grow


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
    stop_tokens: tuple[int | str, ...] = ()  # token ids, or names of the tokenizer's special tokens ("<EOS>")
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
        stop_tokens = (self.stop_tokens,) if isinstance(self.stop_tokens, str) else tuple(self.stop_tokens or ())
        if not all((_is_int(t) and t >= 0) or (isinstance(t, str) and t) for t in stop_tokens):
            raise SamplingError(f"stop_tokens={self.stop_tokens!r} must be a list of token ids (integers >= 0) or "
                                f"names of special tokens, such as '<EOS>'.")
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


def stop_token_ids(stop_tokens, tokenizer) -> list[int]:
    """The ids of `stop_tokens`: ids stay as they are, names ("<EOS>") are looked up among the
    special tokens of `tokenizer`. An unknown name raises SamplingError, listing the known ones."""
    ids = []
    for token in stop_tokens:
        if not isinstance(token, str):
            ids.append(token)
            continue
        specials = getattr(tokenizer, "special_tokens", None) or {}
        if token not in specials:
            known = ", ".join(specials) if specials else "none (the model has no tokenizer)"
            raise SamplingError(f"stop_tokens: {token!r} is not a special token of this model's tokenizer; its "
                                f"special tokens are: {known}. Give one of those or a token id; to stop at "
                                f"ordinary text, use stop=[{token!r}].")
        ids.append(specials[token])
    return ids


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


class TextStream:
    """The text of tokens that arrive one at a time, in pieces that are safe to show: whole
    characters, cut before the first `stop` string. Each token costs the same however long the
    text already is (re-decoding or re-searching everything would cost O(n) per token, O(n^2) per
    generation):

    - decoding: a tokenizer with `decode_bytes` (byte-level BPE and tiktoken, whose `decode(ids)` is
      `decode_bytes(ids).decode("utf-8", errors="replace")`) hands each token's bytes to an
      incremental UTF-8 decoder, which keeps back only the bytes of an unfinished character. Any
      other tokenizer decodes a short window of tokens: the new text is decode(window) minus
      decode(window without the tokens since the last piece). The window starts a little before
      the new tokens because tokenizers treat the start of a text specially (SentencePiece drops a
      leading space); a window whose text ends in U+FFFD (an unfinished character) waits for more
      tokens.
    - stop strings: `showable` keeps back any ending that could start a stop string, so a stop
      string not yet seen can only start in the text still pending: that (at most the longest stop
      string less one character, plus the new piece) is all that is searched.

    `add(token)` returns the text that may be shown now; `shown` counts the characters returned so
    far; `done` becomes True at a stop string (and the owner sets it at a stop token)."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.pending = ""  # decoded but not shown: it may be the start of a stop string
        self.shown = 0
        self.done = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if hasattr(tokenizer, "decode_bytes") else None
        self._window: list[int] = []  # tokens decoded together (tokenizers without decode_bytes)
        self._read = 0  # how many of them the text returned so far covers

    def add(self, token: int) -> str:
        """Take the next token; return the text it makes safe to show ("" when none)."""
        if self.done:
            return ""
        piece = self._decode(token)
        if not piece:
            return ""
        pending = self.pending + piece
        ready = showable(pending, self.stop)
        if ready < len(pending) and any(s in pending for s in self.stop):
            self.done = True
        self.pending = pending[ready:]
        self.shown += ready
        return pending[:ready]

    def _decode(self, token: int) -> str:
        if self._utf8 is not None:
            return self._utf8.decode(self.tokenizer.decode_bytes([token]))
        window = self._window
        window.append(token)
        before = self.tokenizer.decode(window[:self._read])
        now = self.tokenizer.decode(window)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        del window[:self._read]  # the next window starts at this piece's first token
        self._read = len(window)
        return now[len(before):]


def stream_text(run: "Generation"):
    """Yield the text of row 0 of `run` piece by piece as its steps run (see `GPT.stream`)."""
    stream = run.text_stream(0)
    for _ in run.steps():
        if run.pieces[0]:
            yield run.pieces[0]
    final = run.texts()[0]  # decoded whole and cut at a stop string, as generate returns it
    if len(final) > stream.shown:
        yield final[stream.shown:]


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
        self._kept: tuple | None = None  # (cache key, static cache, step key, graphed step)
        self.speculative: tuple | None = None  # (key, windows): lm.speculative's graphed caches, on CUDA
        self.busy = threading.Lock()  # held by `model.generate` while it uses the model's own decoder

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
        `stop_at_eos`); at any token in `stop_tokens` (ids, or special tokens by name: "<EOS>"); at any
        string in `stop` (cut off before it).
        `return_logprobs`: also return each new token's log-probability under the model.

        With `use_cache` (default) a KV cache makes each new token cost one position; the ids are
        the same as without it while the sequence fits in block_size. Beyond block_size, the
        uncached loop feeds the last block_size tokens at every step, and the cached one starts a
        fresh cache from the last 3/4 of block_size tokens whenever it is full (so it re-reads the
        context once every block_size/4 tokens). Either way a prompt longer than block_size is read
        from its last block_size tokens, and the returned ids still hold all of it.
        """
        run = Generation(self, prompt, GenerationConfig.build(config, **options), attention_mask,
                         logprobs=return_logprobs)
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
        run = Generation(self, prompt, GenerationConfig.build(config, **options), None, logprobs=False)
        return stream_text(run)

    def cache(self, batch_size: int, positions: int, graph: bool, compile: bool, choice=None, stops: bool = False):
        """An empty KV cache for `positions` positions (at most block_size), and the graphed step
        that decodes with it (None without a graph): one that chooses the tokens itself when `choice`
        is "greedy" or a `SamplingConfig` it can draw from, and watches for stop ids with `stops`
        (see `GraphedStep`).

        A graph's static cache is kept for the next call, and reused as long as it is long enough:
        a new one gets the next power of two (at least 64, at most block_size) positions, so calls
        of growing lengths capture a new graph only a few times, and a short generation with a
        large block_size does not reserve the whole context. A call that chooses otherwise (another
        temperature, say) gets a new step over the same cache."""
        if not graph:
            return KVCache(self.model, batch_size, max_len=positions), None
        model = self.model
        cache_key = (batch_size, tensor_addresses(model))
        step_key = (compile, choice, stops)
        kept = self._kept
        if kept is None or kept[0] != cache_key or kept[1].max_len < positions:
            self._kept = kept = None  # free the old buffers before taking new ones
            size = min(model.config.block_size, max(64, 1 << (positions - 1).bit_length()))
            cache = KVCache(model, batch_size, max_len=max(size, positions), static=True)
        else:
            cache = kept[1]
        if kept is None or kept[2] != step_key:
            self._kept = None
            greedy, sampling = choice == "greedy", None if choice in (None, "greedy") else choice
            step = GraphedStep(model, cache, compile=compile, greedy=greedy, sampling=sampling, stops=stops)
            self._kept = (cache_key, cache, step_key, step)
        _, cache, _, step = self._kept
        cache.reset()
        return cache, step

    def release(self) -> None:
        """Drop the static caches and CUDA graphs kept for the next call (speculative decoding's too)."""
        self._kept = self.speculative = None


class HeldStream:
    """The pieces of a stream, holding `lock` until they run out, the stream is closed, or it is
    dropped (`model.stream` holds the model's decoder this way, so no other call uses it meanwhile)."""

    def __init__(self, pieces, lock):
        self.pieces, self.lock = pieces, lock

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self.pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            try:
                self.pieces.close()
            finally:
                lock.release()

    def __del__(self):
        self.close()


def tensor_addresses(*models) -> tuple[int, ...]:
    """Where the models' parameters and buffers live: CUDA graphs kept for them replay only while these
    stay the same (moving a model, or loading weights into new tensors, changes them)."""
    return tuple(t.data_ptr() for m in models for t in itertools.chain(m.parameters(), m.buffers()))


def refill_length(block_size: int) -> int:
    """How many of the latest tokens a cached generation keeps when its context is full: it starts
    a fresh cache from the last 3/4 of block_size, so it re-reads the context once every
    block_size/4 tokens (speculative decoding follows the same schedule, to choose the same tokens)."""
    return (3 * block_size) // 4


class Generation:
    """One call of `Decoder.generate` / `Decoder.stream`: its token buffer, cache and stopped rows.

    `logprobs=False` does not compute the chosen tokens' log-probabilities (`result` cannot return
    them then): on a GPU each step is a handful of small kernel launches from Python besides the
    replayed graph, and those took about a fifth of a step at batch 1."""

    def __init__(self, decoder: Decoder, prompt, config: GenerationConfig, attention_mask: torch.Tensor | None,
                 logprobs: bool = True):
        model = decoder.model
        self.decoder, self.model, self.config = decoder, model, config
        self.sampling = config.sampling
        self.tokenizer = model.tokenizer
        self.kind = "ids" if isinstance(prompt, torch.Tensor) else "texts" if isinstance(prompt, (list, tuple)) else "text"
        rows, mask = self._prompt_ids(prompt, attention_mask)
        B, T0 = rows.shape
        device = model.device
        # Room for the first tokens only; `_make_room` doubles it when full. Reserving prompt plus
        # max_new_tokens up front would take gigabytes for a huge max_new_tokens before any token.
        room = T0 + min(config.max_new_tokens, FIRST_ROOM)
        self.ids = torch.full((B, room), self._pad_id(), dtype=torch.long, device=device)
        self.ids[:, :T0] = rows.to(device)
        self.mask = None
        if mask is not None and not bool(mask.all()):
            self.mask = torch.ones(B, room, dtype=torch.bool, device=device)
            self.mask[:, :T0] = mask.to(device).bool()
        self.logprobs = torch.zeros(B, room - T0, device=device) if logprobs else None  # of the new tokens
        self.start = self.length = T0
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        seed = config.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.draw_seed: int | None = None  # the draws' seed on a GPU (`_draw_seed`)
        # On a GPU, draws run as Triton's Gumbel-max kernels (lm.fused_sampling), the same with a graph
        # or without: the graph's own `Draw` (see `_prepare_graph`), else one made on the first draw.
        self.draw: Draw | None = None
        self.gpu_draws = self.sampling.temperature > 0 and fused_sampling.usable(device)
        stop_ids = set(stop_token_ids(config.stop_tokens, self.tokenizer))
        eos = getattr(self.tokenizer, "eos_id", None)
        if self.kind != "ids" and config.stop_at_eos and eos is not None:
            stop_ids.add(eos)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.stop_id_set = stop_ids
        self.stop_strings = list(config.stop)
        self.can_finish = bool(stop_ids) or bool(self.stop_strings)  # can a row stop before the others?
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the text; pass stop_tokens (ids) instead.")
        self.cache, self.graph, self.cached = None, None, 0  # cached: positions in the cache
        # What a CUDA graph can choose itself (then `chosen` is its token after a graph step): the argmax
        # (plain greedy), or a draw that needs no history. With stop ids (few enough) it also pads
        # finished rows and keeps `finished`, so that whole runs of steps need no host read.
        sampling = self.sampling
        self.choice = "greedy" if sampling.plain_greedy else sampling if sampling.graphable else None
        self.graph_stops = self.choice is not None and bool(stop_ids) and len(stop_ids) <= STOP_SLOTS
        self.chosen: torch.Tensor | None = None
        self.stopped = False  # every row finished within a run of graph steps
        self.was_finished: torch.Tensor | None = None  # `finished` before a graph step that updates it
        self.cuda_graph = self._use_graph(config.cuda_graph, config.compile)
        # Each row's text as it grows, when something reads it: stop strings, or `stream_text`.
        self.streams: list[TextStream] | None = None
        self.pieces: list[str] = [""] * B  # the text each row's last token made ready to show
        if self.stop_strings:
            self.text_stream(0)
        if device.type == "cpu":
            for_decoding(model)  # the layout a CPU reads fastest at batch 1; same values, same results
        # One-token steps without the module machinery where the model allows it (same floats).
        self.lean = None
        if config.use_cache and not self.cuda_graph and LeanStep.unsupported(model) is None:
            self.lean = LeanStep(model)

    def _use_graph(self, cuda_graph, compile) -> bool:
        """None: on CUDA whenever the model allows it. True: always (a clear error where it cannot)."""
        reason = graph_unsupported(self.model) if self.config.use_cache else "use_cache=False decodes without a cache"
        graphed = use_graph(cuda_graph, reason)
        if compile and not graphed:
            raise ValueError(f"compile=True compiles the CUDA-graph decoding step, which is off here "
                             f"({reason or 'cuda_graph=False'}).")
        return graphed

    def _prepare_graph(self) -> None:
        """Hand the kept graph this generation's stops and seed. Its `finished` becomes this
        generation's (the eager steps, the prompt's and refills', update the same tensor), and its
        draws start from `seed`, or without one from a seed drawn from torch's default (CPU)
        generator, so torch.manual_seed makes them repeatable; the prompt's token is drawn from the
        same generator, so the draws equal the eager path's with the same seed."""
        graph = self.graph
        if graph is None:
            return
        if graph.finished is not None:
            self.finished = graph.watch(self.stop_id_set, self._pad_id())
        if graph.sampling is not None:
            graph.ready()  # the capture's warm-up draws come before the seed
            graph.seed(self._draw_seed())
            self.generator, self.draw = graph.generator, graph.draw

    def _draw_seed(self) -> int:
        """The seed of this generation's draws on a GPU: `seed`, or without one a seed drawn once from
        torch's default CPU generator (so torch.manual_seed makes the draws repeatable)."""
        if self.draw_seed is None:
            seed = self.config.seed
            self.draw_seed = seed if seed is not None else int(torch.randint(0, 2**62, ()))
        return self.draw_seed

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

    def text_stream(self, row: int) -> TextStream:
        """The `TextStream` of `row`: from now on each step feeds it and sets `pieces[row]`."""
        if self.streams is None:
            self.streams = [TextStream(self.tokenizer, self.stop_strings) for _ in range(self.ids.size(0))]
        return self.streams[row]

    # ---- the loop ------------------------------------------------------------------------------
    def _make_room(self, n: int = 1) -> None:
        """Make room for n tokens from `length`: the buffers double (up to prompt + max_new_tokens)
        when full, so n tokens cost O(n) copying in all."""
        full = self.ids.size(1)
        if self.length + n <= full:
            return
        room = min(max(2 * full, self.length + n), self.start + self.config.max_new_tokens)
        grow = room - full
        self.ids = torch.cat([self.ids, self.ids.new_full((self.ids.size(0), grow), self._pad_id())], dim=1)
        if self.logprobs is not None:
            self.logprobs = torch.cat([self.logprobs, self.logprobs.new_zeros(self.ids.size(0), grow)], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.ids.size(0), grow)], dim=1)

    def _free_run(self, left: int) -> int:
        """Greedy tokens made back to back by the graph (`GraphedStep.run`), up to `left` of them, when
        nothing needs to look at a token before the end: no stop tokens or strings, no text stream,
        no log-probabilities. Returns how many were made; 0 means: take an ordinary step (the prompt,
        a refill, or a generation that watches its tokens). On the host each token is one graph
        launch, so the host never holds the GPU back."""
        graph = self.graph
        if (graph is None or not graph.chooses or self.streams is not None or self.logprobs is not None
                or (self.can_finish and graph.finished is None)):
            return 0
        block = self.model.config.block_size
        n = min(left, block - self.cached)  # up to a full cache; the ordinary step then refills it
        if self.cached == 0 or n <= 0:
            return 0
        L = self.length
        self._make_room(n)
        if graph.finished is None:
            made = graph.run(self.ids[:, L - 1:L], n, position=self.cached)
        else:  # stops soon after every row has finished, reading back a flag some steps behind
            made = graph.run_until(self.ids[:, L - 1:L], n, position=self.cached)
        n = made.size(1)
        self.ids[:, L:L + n] = made
        self.cached += n
        if graph.finished is not None and bool(self.finished.all()):
            n = self._until_last_stop(made)
            self.stopped = True
        self.length = L + n
        return n

    def _until_last_stop(self, made: torch.Tensor) -> int:
        """How many of the steps `made` (B, m) count, once every row has finished within them: up to
        the one where the last row made its stop token (the later ones only padded every row)."""
        stops = self.stop_id_set
        return max(next((j + 1 for j, t in enumerate(row) if t in stops), 0) for row in made.tolist())

    def _logits(self) -> torch.Tensor:
        """Logits (B, 1 or T, V) whose last position scores the next token."""
        model, L, block = self.model, self.length, self.model.config.block_size
        mask = self.mask
        if not self.config.use_cache:
            lo = max(0, L - block)
            return model(self.ids[:, lo:L], attention_mask=None if mask is None else mask[:, lo:L])[0]
        if self.cache is None:  # positions needed: prompt and new tokens, never more than the context
            positions = min(block, self.start + self.config.max_new_tokens)
            self.cache, self.graph = self.decoder.cache(self.ids.size(0), positions, self.cuda_graph,
                                                        self.config.compile, self.choice, self.graph_stops)
            self._prepare_graph()
        if self.cached == 0 or self.cached + 1 > block:  # prefill, or the cache is full: start afresh
            keep = min(L, block) if self.cached == 0 else refill_length(block)
            self.cache.reset()
            self.cached = keep
            ids, mask = self.ids[:, L - keep:L], None if mask is None else mask[:, L - keep:L]
            if self.graph is not None:  # graphed too, from the second prompt of a length bucket on
                return self.graph.prefill(ids, mask, start=0)
            return model(ids, attention_mask=mask, cache=self.cache)[0]
        self.cached += 1
        if self.graph is not None:  # the prompt's padding is in the cache's mask already; new tokens are real
            if self.logprobs is not None and self.graph.finished is not None:
                self.was_finished = self.finished.clone()  # the graph updates `finished` within the step
            logits = self.graph(self.ids[:, L - 1:L])
            self.chosen = self.graph.next
            return logits
        if self.lean is not None and LeanStep.usable(self.cache, 1):
            return self.lean(self.ids[:, L - 1:L], self.cache)
        return model(self.ids[:, L - 1:L], attention_mask=None if mask is None else mask[:, :L], cache=self.cache)[0]

    @torch.no_grad()
    def steps(self):
        """Generate one token per iteration (all rows at once) until done; yields the step number."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            step = 0
            while step < self.config.max_new_tokens:
                made = self._free_run(self.config.max_new_tokens - step)
                if made:
                    for _ in range(made):
                        yield step
                        step += 1
                    if self.stopped:
                        break
                    continue
                logits = self._logits()[:, -1, :]
                L = self.length
                graph_masked = False  # did the graph pad finished rows and note the stops itself?
                if self.chosen is not None:  # the graph chose already
                    next_ids, self.chosen = self.chosen, None
                    logp = None if self.logprobs is None else chosen_logprobs(logits, next_ids)
                    graph_masked = self.graph.finished is not None
                else:
                    history_mask = None if self.mask is None else self.mask[:, :L]
                    if self.gpu_draws:  # the Gumbel-max kernels, as the graph draws
                        if self.draw is None:
                            self.draw = Draw(self.ids.size(0), self.ids.device)
                            self.draw.reseed(self._draw_seed())
                        next_ids = self.draw.choose(logits, self.sampling, self.ids[:, :L], history_mask)
                        logp = None if self.logprobs is None else chosen_logprobs(logits, next_ids)
                    else:
                        next_ids, logp = choose_next(logits, self.ids[:, :L], self.sampling, self.generator,
                                                     mask=history_mask, logprobs=self.logprobs is not None)
                next_ids = next_ids.squeeze(1)
                if self.can_finish and not graph_masked:  # finished rows get padding (one more kernel launch)
                    next_ids = next_ids.masked_fill(self.finished, self._pad_id())
                self._make_room()
                self.ids[:, L] = next_ids
                if logp is not None:
                    logp = logp.squeeze(1)
                    if self.can_finish:  # 0 for rows finished before this step
                        logp = logp.masked_fill(self.was_finished if graph_masked else self.finished, 0.0)
                    self.logprobs[:, L - self.start] = logp
                self.length = L + 1
                if self.stop_ids.numel() and not graph_masked:
                    self.finished |= torch.isin(next_ids, self.stop_ids)
                if self.streams is not None:
                    self._follow_text(next_ids)
                yield step
                step += 1
                # reading `finished` waits for the GPU: only when something can stop a row early
                if self.can_finish and bool(self.finished.all()):
                    break
        finally:
            model.train(was_training)

    def _follow_text(self, next_ids: torch.Tensor) -> None:
        """Feed each row's new token to its text stream (reading the step's tokens back from the
        device); a row whose text now holds a stop string is finished. A row's text ends at its
        first stop token."""
        for row, (stream, token) in enumerate(zip(self.streams, next_ids.tolist())):
            if stream.done or token in self.stop_id_set:
                stream.done, self.pieces[row] = True, ""
                continue
            self.pieces[row] = stream.add(token)
            if stream.done:
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
        if return_logprobs and self.logprobs is None:
            raise ValueError("this generation ran with logprobs=False, so it has no log-probabilities to return; "
                             "make it with Generation(..., logprobs=True) (generate(return_logprobs=True) does).")
        logprobs = None if self.logprobs is None else self.logprobs[:, :self.length - self.start]
        if self.kind == "ids":
            out = self.ids[:, :self.length]
            return (out, logprobs) if return_logprobs else out
        texts = self.texts()
        if not return_logprobs:
            return texts[0] if self.kind == "text" else texts
        per_row = [logprobs[row, : len(self.new_ids(row))].tolist() for row in range(len(texts))]
        return (texts[0], per_row[0]) if self.kind == "text" else (texts, per_row)


__all__ = ["Decoder", "Generation", "GenerationConfig", "TextStream", "refill_length", "showable", "stop_token_ids",
           "stream_text"]
