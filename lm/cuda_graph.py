"""A decoding step replayed as a CUDA graph: the fast path of generation on a GPU.

At batch 1 one decoding step of a small model is a few hundred tiny kernels (norms, matrix-vector
products, attention over the cache). The GPU finishes each faster than Python can launch the
next, so the step costs the launch time, not the arithmetic (bench/gpu_decode.py measures it). A
CUDA graph records the kernels of one step once and replays all of them with a single launch.

A graph replays fixed kernels on fixed addresses, so nothing in the step may change shape or
move: the step is the model's ordinary forward over one token with a static cache
(`KVCache(..., static=True)`), which keeps its position on the device and attends over all of its
slots under a mask. The token goes into a fixed input buffer and the logits come out in a fixed
output buffer:

    cache = KVCache(model, batch_size=1, static=True)
    logits, _ = model(prompt_ids, cache=cache)     # prefill: the ordinary path, any length
    step = GraphedStep(model, cache)
    logits = step(next_ids)                        # (B, 1, V); overwritten by the next call

Once the steps are graphed, the prompt's forward is the largest launch cost left (a 16-token
prompt of GPT-2 124M: about 3 ms of launches, the time of ten graphed steps). `GraphedPrefill`
graphs it too, one graph per bucket of prompt lengths (powers of two): the prompt is padded on the
right up to its bucket, which no real position can see (attention is causal), the logits are read
at its last real position, and the cache's position is moved back to just after it, so the next
step overwrites the padding's slots before anything reads them. Each `GraphedStep` has one, as
`step.prefill`.

`lm.generation.Decoder` does all this for you on CUDA and keeps the graphs between calls.
"""

from __future__ import annotations

import torch

from .kv_cache import StaticCache
from . import fused_sampling
from .fused_sampling import Draw
from .sampling import SamplingConfig, choose_next


def graph_unsupported(model) -> str | None:
    """Why `model` cannot decode through a CUDA graph, or None when it can."""
    if model.device.type != "cuda":
        return f"CUDA graphs need the model on a CUDA device (it is on {model.device.type})"
    if model.config.ffn == "moe":
        return "ffn='moe' routes tokens to experts with data-dependent shapes (a host sync per layer)"
    return None


def use_graph(cuda_graph: bool | None, reason: str | None) -> bool:
    """Whether to decode through CUDA graphs: `cuda_graph` True, False or None (automatic), `reason`
    why they cannot run here (None: they can). True where they cannot is a clear error."""
    if cuda_graph not in (None, True, False):
        raise ValueError(f"cuda_graph={cuda_graph!r} must be True, False or None (automatic).")
    if cuda_graph and reason is not None:
        raise ValueError(f"cuda_graph=True: {reason}; pass cuda_graph=None to choose automatically.")
    return reason is None if cuda_graph is None else cuda_graph


STOP_SLOTS = 16  # stop token ids a graph watching for stops holds (more: generation watches them itself)


class GraphedStep:
    """The decoding step on a static cache, captured as a CUDA graph on the first call and replayed on
    every later one; each replay also moves the cache's device position by one.

    The step is `lm.fused_decode.FusedStep` (a few fused Triton kernels per block) whenever the
    model and cache allow it, else `model(token, cache=cache)`. `compile=True` runs the module step
    through `torch.compile` instead (fused kernels of inductor's choosing; compiling takes a while on
    the first call).

    The graph can also choose the next token, with no kernel launched for it from Python:
    `greedy=True` records the argmax of the logits, `sampling=SamplingConfig(...)` a draw (temperature,
    top_k, top_p, min_p: the settings that need no history), made by `draw`, the Gumbel-max kernels
    of `lm.fused_sampling` (where Triton does not run, `choose_next`'s torch ops drawing from
    `generator`); `seed` starts the draws. `next` (B, 1) then holds the choice after each call; the
    graph also feeds it back as the next step's token and stores it in `history` at its position in
    the cache, so that `run(n)` makes n steps with nothing but n replays (see `run`).

    `stops=True` (with a choice) also keeps, in the graph, which rows have finished: a row's choice
    after it made one of the ids given to `watch` is the padding id, and `finished` (B,) marks the
    rows that made one. `run_until` then stops soon after every row has finished, without the host
    waiting on each step."""

    def __init__(self, model, cache, compile: bool = False, greedy: bool = False,
                 sampling: SamplingConfig | None = None, stops: bool = False):
        reason = graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"cannot decode with a CUDA graph: {reason}; pass cuda_graph=False.")
        if not cache.static:
            raise ValueError("GraphedStep needs KVCache(..., static=True): the graph must read a fixed buffer.")
        if sampling is not None and (greedy or not sampling.graphable):
            raise ValueError(f"sampling={sampling} cannot be drawn in the graph: it needs a temperature > 0 and no "
                             f"penalty (they read each row's history), and not greedy=True as well.")
        chooses = greedy or sampling is not None
        if stops and not chooses:
            raise ValueError("stops=True needs the graph to choose the tokens: pass greedy=True or sampling=...")
        from .fused_decode import FusedStep  # here: fused_decode imports the model's modules

        device, B = model.device, cache.batch_size
        self.cache, self.greedy, self.sampling, self.chooses = cache, greedy, sampling, chooses
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        # the token chosen after each position p, at p + 1 (position max_len is the last)
        self.history = torch.zeros(B, cache.max_len + 1, dtype=torch.long, device=device) if chooses else None
        # the draw: Triton's Gumbel-max kernels where they run (lm.fused_sampling), else choose_next's own
        self.draw = Draw(B, device) if sampling is not None and fused_sampling.usable(device) else None
        self.generator = torch.Generator(device=device) if sampling is not None and self.draw is None else None
        self.finished = torch.zeros(B, dtype=torch.bool, device=device) if stops else None
        self.stop_ids = torch.full((STOP_SLOTS,), -1, dtype=torch.long, device=device) if stops else None
        self.pad = torch.zeros((), dtype=torch.long, device=device) if stops else None
        self.fused = not compile and FusedStep.unsupported(model, cache) is None
        if self.fused:  # greedy: the fused head writes its argmax into token and history, and watches the stops
            watch = (self.finished, self.stop_ids, self.pad) if stops else None
            step = FusedStep(model, cache, greedy=greedy, feed=(self.token, self.history) if greedy else None,
                             watch=watch if greedy else None)
        else:
            def step(token):
                return model(token, cache=cache)[0]

            step = torch.compile(step, fullgraph=True, dynamic=False) if compile else step
        self.step = step
        self.prefill = GraphedPrefill(model, cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.next: torch.Tensor | None = None
        self.all_finished: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of `token` (B, 1) at the cache's next position."""
        self.token.copy_(token)
        self.ready()
        self.graph.replay()
        return self.logits

    def ready(self) -> None:
        """Capture the graph now if it is not captured yet (a capture's warm-up runs draw from the
        generator: seed it after this)."""
        if self.graph is None:
            self._capture()

    def seed(self, seed: int) -> None:
        """Start the sampling graph's draws from `seed`: they then equal those of the same `draw`
        (or `choose_next` with a generator seeded so, where Triton does not run) outside the graph,
        given the same logits."""
        if self.draw is not None:
            self.draw.reseed(seed)
        else:
            self.generator.manual_seed(seed)

    def watch(self, stop_ids, pad: int) -> torch.Tensor:
        """Stop ids (at most STOP_SLOTS) and the padding id for the next generation; every row starts
        unfinished. Returns `finished`, which each replay updates."""
        stop_ids = sorted(set(stop_ids))
        if self.finished is None or len(stop_ids) > STOP_SLOTS:
            raise ValueError(f"this graph watches no stops, or not {len(stop_ids)} (at most {STOP_SLOTS}).")
        self.stop_ids.fill_(-1)
        if stop_ids:
            self.stop_ids[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
        self.pad.fill_(pad)
        self.finished.zero_()
        return self.finished

    def run(self, token: torch.Tensor, n: int, position: int | None = None) -> torch.Tensor:
        """n steps from `token` (B, 1), each choosing the next token in the graph: n replays and nothing
        else, each feeding the next; returns the n tokens chosen, (B, n), read from `history` (the
        cache's positions p+1 .. p+n, p its position before: give it as `position` if you know it,
        else it is read from the device). The host only launches; nothing waits for the GPU."""
        start = self._start(token, n, position)
        for _ in range(n):
            self.graph.replay()
        return self.history[:, start:start + n]

    def run_until(self, token: torch.Tensor, n: int, position: int | None = None, lag: int = 2) -> torch.Tensor:
        """`run(n)`, stopping early once every row has finished (`stops=True`): after each replay the
        host copies "all finished" to pinned memory and reads the copy made `lag` replays earlier,
        so the GPU always has work queued while the host looks, and at most `lag` + 1 steps are made
        after the last row finished (their tokens are the padding). Returns the tokens made, (B, m)."""
        if self.finished is None:
            raise ValueError("run_until needs a graph built with stops=True.")
        start = self._start(token, n, position)
        pinned = self.token.device.type == "cuda"
        flags = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=pinned)
        events = [torch.cuda.Event() if pinned else None for _ in range(lag + 1)]
        made = 0
        while made < n:
            self.graph.replay()
            slot = made % (lag + 1)
            flags[slot].copy_(self.all_finished, non_blocking=True)
            if pinned:
                events[slot].record()
            made += 1
            if made > lag:  # read the flag of `lag` replays ago, while the ones since run
                old = (made - 1 - lag) % (lag + 1)
                if pinned:
                    events[old].synchronize()
                if bool(flags[old]):
                    break
        return self.history[:, start:start + made]

    def _start(self, token: torch.Tensor, n: int, position: int | None) -> int:
        if not self.chooses:
            raise ValueError("run(n) needs the graph to choose the tokens: build it with greedy=True or sampling=...")
        start = (self.cache.length if position is None else position) + 1
        if start - 1 + n > self.cache.max_len:
            raise ValueError(f"{n} steps from position {start - 1} do not fit the cache's {self.cache.max_len}.")
        self.token.copy_(token)
        self.ready()
        return start

    def _run(self):
        out = self.step(self.token)
        if not self.chooses:
            return out
        watch = None if self.finished is None else (self.finished, self.stop_ids, self.pad)
        if self.fused and self.greedy:  # the fused head found the argmax, fed it and watched the stops
            logits, next_ids = out
        elif self.draw is not None:  # the draw's second kernel pads, watches and feeds the choice itself
            logits = out
            next_ids = self.draw.choose(logits[:, -1], self.sampling,
                                        feed=(self.token, self.history, self.cache.cursor.position), watch=watch)
        else:  # the module step's argmax, or choose_next's draw (where Triton does not run), in torch ops
            logits = out
            if self.greedy:
                next_ids = logits[:, -1].argmax(dim=-1, keepdim=True)
            else:
                no_history = self.token[:, :0]
                next_ids = choose_next(logits[:, -1], no_history, self.sampling, self.generator, logprobs=False)[0]
            if watch is not None:  # finished rows get the padding; then note who finishes now
                next_ids = torch.where(self.finished[:, None], self.pad, next_ids)
                self.finished |= (next_ids == self.stop_ids).any(dim=1)  # (torch.isin cannot be captured)
            self.token.copy_(next_ids)
            self.history.index_copy_(1, self.cache.cursor.position.view(1), next_ids)
        return (logits, next_ids) if watch is None else (logits, next_ids, self.finished.all())

    def _capture(self) -> None:
        # The warm-up runs write the cache and the token, so their state is put back before the capture;
        # they run from position 0, since two steps from the cache's position might pass its end.
        restore = [*self.cache.tensors(), self.token] + ([self.finished] if self.finished is not None else [])
        if self.draw is not None:
            restore += [self.draw.seed, self.draw.count]
        self.graph, out = capture(self._run, restore=restore, prepare=self.cache.cursor.position.zero_,
                                  generators=[self.generator] if self.generator is not None else [])
        if not self.chooses:
            self.logits = out
        elif self.finished is None:
            self.logits, self.next = out
        else:
            self.logits, self.next, self.all_finished = out


class GraphedPrefill:
    """Prompts fed to a static cache through CUDA graphs: `prefill(ids, attention_mask)` returns the
    logits (B, 1, V) at the last of the T new positions and leaves the cache T positions further on,
    as `model(ids, attention_mask=..., cache=cache)` does.

    A graph is kept per bucket (T rounded up to a power of two, at least `smallest`, at most the
    cache's length; see `bucket`) and per kind (with a padding mask or without), and captured the second time its
    bucket is used, so a prompt length met once costs no capture; the first time runs the ordinary
    forward. The padded positions are written to the cache's slots past the prompt and never seen:
    real positions attend only to earlier ones, and the next tokens overwrite those slots. The
    graphs share one memory pool (they never run at the same time). `start` (the cache's position,
    if the caller knows it) saves a read of the device."""

    smallest = 16

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graphs: dict = {}  # (bucket, masked, all_logits) -> (graph, ids, mask or None, last, pad, logits)
        self.seen: set = set()  # the keys met so far
        self.pool = None

    def bucket(self, T: int) -> int:
        """The length T is padded to: a power of two, or T itself where padding would be seen (a
        rolling window's slots are reused, and linear attention sums every key it is given)."""
        if not all(type(layer) is StaticCache for layer in self.cache.layers):
            return T
        return min(self.cache.max_len, max(self.smallest, 1 << (T - 1).bit_length()))

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 start: int | None = None, all_logits: bool = False) -> torch.Tensor:
        """`all_logits=True`: the logits of every new position, (B, T, V), as the model's
        `all_logits` gives them (speculative decoding's check of the draft's guesses); its graphs
        are per exact length, not per bucket."""
        B, T = ids.shape
        S = T if all_logits else self.bucket(T)
        key = (S, attention_mask is not None, all_logits)
        start = self.cache.length if start is None else start
        entry = self.graphs.get(key)
        first = entry is None and key not in self.seen
        if first or start + S > self.cache.max_len or T > S:  # seen once, or the padding would not fit
            self.seen.add(key)
            return self.model(ids, attention_mask=attention_mask, cache=self.cache, all_logits=all_logits)[0]
        if entry is None:
            entry = self.graphs[key] = self._capture(B, S, attention_mask is not None, all_logits)
        graph, ids_buf, mask_buf, last, pad, logits = entry
        ids_buf[:, :T].copy_(ids)
        if mask_buf is not None:
            mask_buf[:, :T].copy_(attention_mask[:, -T:])
            mask_buf[:, T:].fill_(True)
        last.fill_(T - 1)
        pad.fill_(S - T)
        graph.replay()
        return logits

    def _capture(self, B: int, S: int, masked: bool, all_logits: bool):
        model, cache, device = self.model, self.cache, self.model.device
        ids = torch.zeros(B, S, dtype=torch.long, device=device)
        mask = torch.ones(B, S, dtype=torch.bool, device=device) if masked else None
        last = torch.full((1,), S - 1, dtype=torch.long, device=device)
        pad = torch.zeros((), dtype=torch.long, device=device)

        def forward():
            x = model._residual_stream(ids, mask, cache)
            x = x if all_logits else x.index_select(1, last)
            cache.cursor.position.sub_(pad)  # back to just after the last real position
            return model.lm_head(model.norm_f(x))

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # warmed up from position 0, where S positions always fit
        graph, logits = capture(forward, restore=cache.tensors(), pool=self.pool, prepare=cache.cursor.position.zero_)
        return graph, ids, mask, last, pad, logits


def capture(step, warmup: int = 2, restore=(), pool=None, prepare=None, generators=()):
    """Record `step()` (a function of fixed buffers only) as a CUDA graph; returns (graph, output),
    where `output` is the buffer each `graph.replay()` overwrites.

    It runs `warmup` times on a side stream first, so that cuBLAS workspaces, kernel choices and
    compilation all happen before the capture (none of them may happen inside it). Tensors in
    `restore` get back the values they had before the warm-up. `pool` (torch.cuda.graph_pool_handle())
    lets graphs that never run at the same time share their intermediate memory. `prepare()` runs
    before each warm-up run (after `restore` is saved), e.g. to put a position where the runs fit.
    `generators`: the torch.Generators the step draws from, registered with the graph (each replay
    then draws on from the generator's state, as the same kernels run eagerly would)."""
    saved = [(t, t.clone()) for t in restore]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            if prepare is not None:
                prepare()
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for tensor, copy in saved:
        tensor.copy_(copy)
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return graph, output


__all__ = ["STOP_SLOTS", "GraphedPrefill", "GraphedStep", "capture", "graph_unsupported", "use_graph"]
