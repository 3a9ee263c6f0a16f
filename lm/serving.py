"""Serving many requests at once: an engine with continuous batching.

A server that answers one request at a time leaves most of the machine idle: at batch size 1 a
decoding step reads every weight of the model to produce a single token. Decoding B requests in one
step reads the weights once for B tokens, so the step costs little more and yields B times as much.
But requests arrive at any moment, with prompts of different lengths, and finish at different
times. Waiting to fill a batch delays everyone; running a batch until its longest request ends
wastes the rows that finished early. Continuous batching does neither. The engine keeps `max_batch`
slots, and between two tokens

  1. waiting requests take free slots: each prompt runs through the model alone (the prefill) and
     leaves its keys and values in its slot of a shared `SlotCache`;
  2. one decoding step runs every occupied slot at once, each row at its own position;
  3. each row's token is chosen with that request's own sampling settings and sent to its client;
     a request that finished (or whose client went away) leaves, and its slot is free at once.

    engine = lm.serving.Engine(model, max_batch=16)      # a background thread runs the steps
    request = engine.submit(prompt_ids, lm.GenerationConfig(max_new_tokens=50, temperature=0.8))
    for piece in request:                                # text as it is generated (thread-safe)
        print(piece, end="")
    request.result                                       # text, finish_reason, token counts
    engine.close()

Rows never share state: each slot has its own keys and values, position, sampling settings and
random draws (a seeded request draws exactly what `model.generate(..., seed=...)` draws from the
same logits: on a GPU from its own `lm.fused_sampling.Draw`, elsewhere from its own generator).
With `max_batch=1`, or for a model whose attention keeps a running state instead of keys (linear
attention), the engine serves one request at a time through `lm.Decoder` (CUDA graph and all): the
baseline `bench/serve_load.py` compares against.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass

import torch

from . import fused_sampling
from .cuda_graph import capture, graph_unsupported
from .fused_sampling import Draw
from .generation import Decoder, Generation, GenerationConfig, TextStream, stop_token_ids
from .sampling import choose_next


class EngineBusy(RuntimeError):
    """The engine's waiting line is full; try again later (a server answers 503)."""


# ---- the cache: one row per slot, each at its own position --------------------------------------
class SlotLayer:
    """One layer's keys and values for every slot, k and v (slots, H_kv, room, D); the
    `SlotCache` it belongs to decides which rows a forward reads and writes, and how much room."""

    def __init__(self, owner: "SlotCache", n_kv_heads: int, head_dim: int, device, dtype):
        self.owner = owner
        shape = (owner.slots, n_kv_heads, owner.room, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def grow(self, room: int) -> None:
        """Room for `room` positions per slot, keeping what is stored."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), old.size(1), room, old.size(3))
            new[:, :, :old.size(2)] = old
            setattr(self, name, new)

    @property
    def offset(self):
        return self.owner.offset

    def update(self, k: torch.Tensor, v: torch.Tensor, pattern=None):
        return self.owner.store(self, k, v, pattern)


class SlotCache:
    """Keys and values of `slots` independent sequences, each with its own length.

    Before each forward, `use(start, count)` picks the rows it covers: either `count` rows decoding
    one token each (each token at its row's own position: the offset given to the model is a
    (count,) tensor), or one row taking several tokens (a prefill). `GPT.forward` drives it like a
    `KVCache` (`begin`, `layers[i].update`, `end`). Every layer's attention must keep keys
    (`cache_kind` "keys" or "window": a sliding window reads its window out of the full row).

    A row may hold up to `max_len` positions (block_size), but the buffers start with `room`
    positions per row (256 by default) and double when the longest row needs more: an engine for a
    model with a long context, serving short requests, does not reserve slots x block_size up front.

    With `static = True` a decoding forward takes no shape from the host: each row's position comes
    from the device buffer `positions`, and every row's keys are read over the whole room under a
    mask. Such a step can be captured as a CUDA graph (see `Engine`); the caller then keeps the
    host's `lengths` in step (`advance`)."""

    def __init__(self, model, slots: int, max_len: int | None = None, device=None, dtype=None,
                 room: int = 256):
        kinds = {block.attn.cache_kind for block in model.blocks}
        if not kinds <= {"keys", "window"}:
            raise ValueError(f"a slot cache stores keys and values; attention with cache_kind {sorted(kinds)} "
                             f"keeps a running state instead. Serve it one request at a time (max_batch=1).")
        self.slots, self.max_len = slots, max_len or model.config.block_size
        self.room = min(room, self.max_len)
        self.device = device or model.device
        dtype = dtype or next(model.parameters()).dtype
        self.lengths = [0] * slots  # positions filled in each row (kept on the host)
        self.rows = (0, slots)
        self.offset = 0
        self.masks: dict = {}
        self.static = False
        self.grown = 0  # times the buffers were replaced: a CUDA graph captured before reads the old ones
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # read by static steps
        self.layers = [SlotLayer(self, b.attn.n_kv_heads, b.attn.head_dim, self.device, dtype) for b in model.blocks]

    def use(self, start: int, count: int) -> None:
        """The next forward covers rows start .. start+count-1."""
        self.rows = (start, count)

    def begin(self, T: int, attention_mask=None):
        if attention_mask is not None:
            raise ValueError("a slot cache holds unpadded rows; give no attention_mask.")
        start, count = self.rows
        if self.static:  # a step being captured: positions come from the device, the room is fixed
            self.masks = {}
            self.offset = self.positions[start:start + count]
            return self.offset
        lengths = self.lengths[start:start + count]
        if T > 1 and count != 1:
            raise ValueError(f"several tokens at once go into one row (a prefill); got {T} tokens for {count} rows.")
        if max(lengths) + T > self.max_len:
            raise RuntimeError(f"a slot holds {self.max_len} positions; {max(lengths)} are filled and {T} more do "
                               f"not fit.")
        self.reserve(max(lengths) + T)
        self.masks = {}
        self.offset = lengths[0] if T > 1 else torch.tensor(lengths, device=self.device)
        return self.offset

    def reserve(self, length: int) -> bool:
        """Make room for `length` positions per row (doubling); True when the buffers were replaced."""
        if length <= self.room:
            return False
        self.room = min(self.max_len, max(2 * self.room, length))
        for layer in self.layers:
            layer.grow(self.room)
        self.grown += 1
        return True

    def end(self, T: int) -> None:
        if not self.static:  # a static step's host lengths are the caller's to advance
            self.advance(*self.rows, T)

    def advance(self, start: int, count: int, T: int = 1) -> None:
        for row in range(start, start + count):
            self.lengths[row] += T

    def store(self, layer: SlotLayer, k: torch.Tensor, v: torch.Tensor, pattern=None):
        """Write the new keys and values (count, H_kv, T, D) at each row's position; return the
        rows' keys and values up to the longest and the mask of what each query may see."""
        start, count = self.rows
        T = k.size(2)
        key = getattr(pattern, "__func__", pattern)
        if T == 1:  # one token per row, each at its own position
            positions = self.offset
            rows = torch.arange(start, start + count, device=k.device)
            layer.k[rows, :, positions] = k[:, :, 0]
            layer.v[rows, :, positions] = v[:, :, 0]
            S = self.room if self.static else max(self.lengths[start:start + count]) + 1
            if key not in self.masks:
                self.masks[key] = self._mask(positions[:, None], S, pattern)[:, None, None, :]  # (count, 1, 1, S)
        else:  # a prefill: T tokens into one row, after the `offset` already there
            p = self.offset
            layer.k[start, :, p:p + T] = k[0]
            layer.v[start, :, p:p + T] = v[0]
            S = p + T
            if key not in self.masks:
                self.masks[key] = self._mask(torch.arange(p, S, device=k.device)[:, None], S, pattern)  # (T, S)
        return layer.k[start:start + count, :, :S], layer.v[start:start + count, :, :S], self.masks[key]

    def _mask(self, query_pos: torch.Tensor, S: int, pattern) -> torch.Tensor:
        key_pos = torch.arange(S, device=query_pos.device)[None, :]
        mask = key_pos <= query_pos
        restricted = None if pattern is None else pattern(query_pos, key_pos)
        return mask if restricted is None else mask & restricted

    def move(self, source: int, target: int) -> None:
        """Copy row `source` into row `target` (keeping the batch's rows contiguous); free `source`."""
        n = self.lengths[source]
        for layer in self.layers:
            layer.k[target, :, :n] = layer.k[source, :, :n]
            layer.v[target, :, :n] = layer.v[source, :, :n]
        self.lengths[target], self.lengths[source] = n, 0

    def clear(self, row: int | None = None) -> None:
        """Forget row `row` (every row when None); the buffers are reused as they are."""
        for r in range(self.slots) if row is None else [row]:
            self.lengths[r] = 0

    def nbytes(self) -> int:
        """Bytes of the keys and values held (they grow with the longest row, see above)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v))


# ---- one request ---------------------------------------------------------------------------------
@dataclass
class Result:
    """What a finished request produced. finish_reason: "stop" (end of turn, a stop token or
    string), "length" (max_new_tokens, or the context is full), "cancelled" or "error"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    queued_s: float = 0.0  # from submit to its first token
    total_s: float = 0.0   # from submit to the end


class Request:
    """One generation in an engine. Iterate it (from any thread) for the text as it comes; the
    end of iteration means it finished, and `result` says how. `cancel()` frees its slot."""

    def __init__(self, engine: "Engine", ids: list[int], config: GenerationConfig, notify=None):
        self.ids, self.config = list(ids), config
        self.max_new = min(config.max_new_tokens, engine.max_len - len(self.ids))
        tokenizer = engine.model.tokenizer
        self.tokenizer = tokenizer
        stops = set(stop_token_ids(config.stop_tokens, tokenizer))  # ids, or names such as "<EOS>"
        eos = getattr(tokenizer, "eos_id", None)
        if config.stop_at_eos and eos is not None:
            stops.add(eos)
        self.stop_ids, self.stop_strings = stops, list(config.stop)
        self.sampling = config.sampling
        # A seeded request draws as `model.generate(..., seed=...)` does: on a GPU with the Gumbel-max
        # kernels (lm.fused_sampling) from its own Draw, elsewhere torch.multinomial from its generator.
        self.generator: torch.Generator | None = None
        self.draw: Draw | None = None
        device = engine.model.device
        if config.seed is not None and self.sampling.temperature > 0 and fused_sampling.usable(device):
            self.draw = Draw(1, device)
            self.draw.reseed(config.seed)
        elif config.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.new_ids: list[int] = []
        self.text = TextStream(tokenizer, self.stop_strings) if tokenizer is not None else None
        self.cancelled = False
        self.result: Result | None = None
        self.submitted, self.first_token = time.perf_counter(), None
        self._events = queue.Queue() if notify is None else None
        self._report = notify or self._events.put

    def _notify(self, event) -> None:
        try:
            self._report(event)
        except Exception:  # the client's side is gone (e.g. its event loop closed): stop this request only
            self.cancelled = True

    # -- read by the client's side --
    def __iter__(self):
        if self._events is None:
            raise RuntimeError("this request reports through its notify callback; it cannot be iterated.")
        while True:
            kind, value = self._events.get()
            if kind == "text":
                yield value
            else:
                return

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the slot before its next step."""
        self.cancelled = True

    @property
    def needs_history(self) -> bool:
        return self.sampling.repetition_penalty != 1.0 or self.sampling.no_repeat_ngram_size > 0

    # -- called by the engine's thread --
    def add(self, token: int) -> bool:
        """Take the next token; True when the request is done."""
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if token in self.stop_ids:
            return self.finish("stop")
        self.new_ids.append(token)
        if self.text is not None:
            piece = self.text.add(token)
            if piece:
                self._notify(("text", piece))
            if self.text.done:  # a stop string
                return self.finish("stop")
        if len(self.new_ids) >= self.max_new:
            return self.finish("length")
        return False

    def finish(self, reason: str, error: str | None = None) -> bool:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.new_ids)
            hits = [text.index(s) for s in self.stop_strings if s in text]
            text = text[:min(hits)] if hits else text
            shown = self.text.shown
            if reason != "error" and len(text) > shown:
                self._notify(("text", text[shown:]))
        now = time.perf_counter()
        self.result = Result(text, reason, len(self.ids), len(self.new_ids), error,
                             queued_s=(self.first_token or now) - self.submitted, total_s=now - self.submitted)
        self._notify(("done", self.result))
        return True


# ---- the engine ----------------------------------------------------------------------------------
class Engine:
    """Runs generation requests in a background thread, `max_batch` of them decoding together.

    `submit` is thread-safe and returns at once; the request's text arrives through iteration (or
    the `notify` callback, e.g. into an asyncio queue). `stats()` reports what it is doing.

    On a CUDA GPU each decoding step is replayed as a CUDA graph, one per bucket of batch sizes
    (1, 2, 4, ... up to max_batch): at a few rows a step costs the launches of its kernels, which a
    graph makes one (about 3x the tokens/s at 8 clients on an H200). `cuda_graph=None` (the default)
    does so wherever it can (a CUDA model whose attention supports it), True insists (ValueError
    where it cannot), False never does."""

    def __init__(self, model, max_batch: int = 16, max_waiting: int = 1024, cuda_graph: bool | None = None):
        if model.tokenizer is None:
            raise ValueError("the engine decodes text: load the model with its tokenizer (lm.load_model).")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch={max_batch!r} must be an integer >= 1.")
        self.model = model.eval()
        self.max_len = model.config.block_size
        self.max_batch, self.max_waiting = max_batch, max_waiting
        kinds = {block.attn.cache_kind for block in model.blocks}
        self.batched = max_batch > 1 and kinds <= {"keys", "window"}
        self.cache = SlotCache(model, max_batch) if self.batched else None
        if cuda_graph is None:
            cuda_graph = graph_unsupported(model) is None
        if cuda_graph and graph_unsupported(model):
            raise ValueError(f"cannot decode with CUDA graphs: {graph_unsupported(model)}; pass cuda_graph=False.")
        # On a GPU a decoding step of a few rows costs the launches of its kernels, not their work:
        # with cuda_graph=True the step is replayed as a CUDA graph, one per batch bucket (1, 2, 4, ...).
        self.graphs: dict | None = None
        if self.batched and cuda_graph:
            self.graphs, self.graphs_of, self.graph_pool = {}, 0, torch.cuda.graph_pool_handle()
            self.graph_tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=model.device)
        self.decoder = Decoder(model)
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.counts = {"requests": 0, "tokens": 0, "steps": 0, "rows": 0}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side ----
    def submit(self, ids, config: GenerationConfig | None = None, notify=None) -> Request:
        """Queue a generation from prompt `ids` (a list of token ids). Raises ValueError for a prompt
        that leaves no room in the context, EngineBusy when the waiting line is full."""
        config = config or GenerationConfig()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token.")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens and the model's context holds {self.max_len}; "
                             f"shorten it to at most {self.max_len - 1} tokens so that one can be generated.")
        vocab = self.model.config.vocab_size
        if max(ids) >= vocab or min(ids) < 0:
            raise ValueError(f"token ids must be in 0..{vocab - 1}; got {min(ids)}..{max(ids)}.")
        request = Request(self, ids, config, notify)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed.")
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting already (max_waiting={self.max_waiting}).")
            self.waiting.append(request)
        self._wake.set()
        return request

    def generate(self, ids, config: GenerationConfig | None = None) -> Result:
        """Submit and wait: the finished request's `Result`."""
        request = self.submit(ids, config)
        for _ in request:
            pass
        return request.result

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self.waiting)
        steps = self.counts["steps"]
        active = sum(r.result is None for r in list(self.active))  # one that finished may not have left yet
        return {"active": active, "waiting": waiting, "max_batch": self.max_batch,
                "batched": self.batched, "requests": self.counts["requests"], "tokens": self.counts["tokens"],
                "mean_batch": round(self.counts["rows"] / steps, 2) if steps else 0.0}

    def close(self) -> None:
        """Stop the thread; requests still waiting or running end as cancelled."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- the engine's thread ----
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                if not self.active and not self.waiting:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as err:  # a failed step fails the requests in it, never the engine
                    for request in self.active:
                        request.finish("error", f"{type(err).__name__}: {err}")
                    self.active = []
                    if self.cache is not None:
                        self.cache.clear()
        for request in self.active + list(self.waiting):
            request.finish("cancelled")

    def _next_waiting(self) -> Request | None:
        with self._lock:
            return self.waiting.popleft() if self.waiting else None

    def _step(self) -> None:
        if not self.batched:
            request = self._next_waiting()
            if request is not None:
                self._run_alone(request)
            return
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled:
                self.active[row].finish("cancelled")
                self._free(row)
        while len(self.active) < self.max_batch:
            request = self._next_waiting()
            if request is None:
                break
            self._prefill(request)
        if self.active:
            self._decode()

    def _prefill(self, request: Request) -> None:
        if self._ended_early(request):
            return
        row = len(self.active)
        self.cache.clear(row)
        self.cache.use(row, 1)
        prompt = torch.tensor([request.ids], dtype=torch.long, device=self.model.device)
        try:
            logits = self.model(prompt, cache=self.cache)[0][:, -1]
            token = self._choose(logits, [request])[0]
        except Exception as err:  # a prefill that fails fails its own request (not yet in the batch) alone
            self.cache.clear(row)
            request.finish("error", f"{type(err).__name__}: {err}")
            return
        self.active.append(request)
        self.counts["tokens"] += 1
        if request.add(token):
            self._free(row)

    def _ended_early(self, request: Request) -> bool:
        """Count the request in; finish it at once if it was cancelled while waiting or asks for nothing."""
        self.counts["requests"] += 1
        if request.cancelled or request.max_new <= 0:
            request.finish("cancelled" if request.cancelled else "length")
            return True
        return False

    def _decode(self) -> None:
        rows = self.active
        last = [r.new_ids[-1] if r.new_ids else r.ids[-1] for r in rows]
        if self.graphs is not None:
            logits = self._graphed_step(last)
        else:
            self.cache.use(0, len(rows))
            tokens = torch.tensor(last, dtype=torch.long, device=self.model.device)[:, None]
            logits = self.model(tokens, cache=self.cache)[0][:, -1]
        chosen = self._choose(logits, rows)
        self.counts["steps"] += 1
        self.counts["rows"] += len(rows)
        self.counts["tokens"] += len(rows)
        done = [i for i, (request, token) in enumerate(zip(rows, chosen)) if request.add(token)]
        for row in reversed(done):
            self._free(row)

    def _graphed_step(self, last: list[int]) -> torch.Tensor:
        """The decoding step of rows 0..n-1 through the CUDA graph of the smallest bucket (a power of
        two) that holds them; the bucket's spare rows are free slots, fed token 0 at position 0."""
        n, cache = len(last), self.cache
        bucket = min(self.max_batch, 1 << (n - 1).bit_length())
        cache.reserve(max(cache.lengths[:n]) + 1)
        if self.graphs_of != cache.grown:  # the buffers grew (here or in a prefill): the graphs read the old ones
            self.graphs.clear()
            # and a new memory pool: once its last graph is gone, torch's allocator forgets a pool, and
            # capturing into the forgotten handle fails an internal assert (seen on an H200, torch 2.11)
            self.graph_pool = torch.cuda.graph_pool_handle()
            self.graphs_of = cache.grown
        spare = [0] * (bucket - n)
        cache.positions[:bucket].copy_(torch.tensor(cache.lengths[:n] + spare))
        self.graph_tokens[:bucket, 0].copy_(torch.tensor(last + spare))
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        cache.advance(0, n)
        return logits[:n]

    def _capture(self, bucket: int):
        cache = self.cache

        def step():
            cache.use(0, bucket)
            cache.static = True
            try:
                return self.model(self.graph_tokens[:bucket], cache=cache)[0][:, -1]
            finally:
                cache.static = False

        # The warm-up runs write each row's keys at its current position, as the step will: nothing to restore.
        return capture(step, warmup=1, pool=self.graph_pool)

    def _free(self, row: int) -> None:
        """Drop the request in `row`; the last row moves into its place so rows stay contiguous."""
        last = len(self.active) - 1
        if row != last:
            self.cache.move(last, row)
            self.active[row] = self.active[last]
        else:
            self.cache.clear(row)
        self.active.pop()

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """The next token of each row, each with its request's settings. Rows that share settings
        and need no generator nor history are drawn together."""
        chosen = [0] * len(requests)
        groups: dict = {}
        for i, request in enumerate(requests):
            shared = request.config.seed is None and not request.needs_history  # a seed: its own draws
            groups.setdefault(request.sampling if shared else ("alone", i), []).append(i)
        for key, rows in groups.items():
            request = requests[rows[0]]
            if request.needs_history:
                history = torch.tensor([request.ids + request.new_ids], dtype=torch.long, device=logits.device)
            else:
                history = torch.empty(len(rows), 0, dtype=torch.long, device=logits.device)
            if len(rows) < len(requests):
                logits_of = logits.index_select(0, torch.tensor(rows, device=logits.device))
            else:  # every row shares the settings (the usual case): no gather
                logits_of = logits
            if request.draw is not None:  # a seeded draw on a GPU, as Generation's eager steps make it
                picked = request.draw.choose(logits_of, request.sampling, history)
            else:
                picked = choose_next(logits_of, history, request.sampling, request.generator)[0]
            for i, token in zip(rows, picked.view(-1).tolist()):
                chosen[i] = token
        return chosen

    def _run_alone(self, request: Request) -> None:
        """One request through `lm.Decoder` (CUDA graph and all): the one-at-a-time baseline."""
        if self._ended_early(request):
            return
        self.active = [request]
        # the request's own seed: its draws are generate's, on a GPU (Draw) as on a CPU (a generator)
        config = dataclasses.replace(request.config, max_new_tokens=request.max_new, stop=(), stop_tokens=(),
                                     stop_at_eos=False)
        prompt = torch.tensor([request.ids], dtype=torch.long, device=self.model.device)
        run = Generation(self.decoder, prompt, config, None)
        for _ in run.steps():
            self.counts["tokens"] += 1
            self.counts["steps"] += 1
            self.counts["rows"] += 1
            if request.cancelled or self._closed:
                request.finish("cancelled")
                break
            if request.add(int(run.ids[0, run.length - 1])):
                break
        self.active = []


__all__ = ["Engine", "EngineBusy", "Request", "Result", "SlotCache"]
