"""Decoding steps replayed as a CUDA graph: the fast path of `generate` on a GPU.

At batch 1 one decoding step of a small model is a few hundred tiny kernels (norms, matrix-vector
products, attention over the cache). The GPU finishes each faster than Python can launch the
next, so the step costs the launch time, not the arithmetic: GPT-2 124M took 3.4 ms a token on an
H100 eagerly, while reading its 250 MB of bf16 weights takes 0.07 ms. A CUDA graph records the
kernels of one step once and replays all of them with a single launch.

A graph replays fixed kernels on fixed addresses, so nothing in the step may change shape or
move: `KVCache(..., static=True)` keeps its length on the device and attends over all of its slots
under a mask, `GPT.decode_step` reads the position from there, the new token goes into a fixed
input buffer and the logits come out in a fixed output buffer.

    cache = KVCache(model, batch_size=1, static=True)
    logits, _ = model(prompt_ids, cache=cache)     # prefill: the ordinary path, any length
    step = GraphedStep(model, cache)
    logits = step(next_ids)                        # (B, 1, V); overwritten by the next call

`generate` and `stream` use this on CUDA by default (`cuda_graph=None`: when the model allows it),
and the ordinary cached step elsewhere; both give the same tokens. Capturing costs tens of
milliseconds, more than a hundred replayed steps, so `decoder_for` keeps the last cache and graph
on the model for the next call with the same batch size (`release(model)` frees them).
"""

from __future__ import annotations

import itertools

import torch

from .kv_cache import KVCache


def graph_unsupported(model) -> str | None:
    """Why `model` cannot decode through a CUDA graph, or None when it can."""
    if model.device.type != "cuda":
        return f"CUDA graphs need the model on a CUDA device (it is on {model.device.type})"
    if model.config.ffn == "moe":
        return "ffn='moe' routes tokens to experts with data-dependent shapes (a host sync per layer)"
    return None


class GraphedStep:
    """`model.decode_step` on a static cache, captured as a CUDA graph on the first call and
    replayed on every later one. `compile=True` runs the step through `torch.compile` first (fewer,
    fused kernels inside the graph; compiling takes a while on the first call)."""

    def __init__(self, model, cache, compile: bool = False):
        reason = graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"cannot decode with a CUDA graph: {reason}; pass cuda_graph=False.")
        if not cache.static:
            raise ValueError("GraphedStep needs KVCache(..., static=True): the graph must read a fixed buffer.")
        self.cache = cache
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        self.step = torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compile else model.decode_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of `token` (B, 1) at the cache's next position; advances the cache."""
        if self.cache.length >= self.cache.max_len:
            raise RuntimeError(f"the KV cache holds {self.cache.max_len} positions and is full; reset it and "
                               f"prefill again (generate does this for you).")
        self.token.copy_(token)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.cache.advance(1)
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream first, so that cuBLAS workspaces, kernel choices and compilation
        # all happen before the capture. The warm-up writes the cache, so its state is put back.
        saved = [(t, t.clone()) for layer in self.cache.layers for t in vars(layer).values()
                 if isinstance(t, torch.Tensor)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step(self.token, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, copy in saved:
            tensor.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(self.token, self.cache)
        self.graph = graph


class _Kept:
    """The model's last static cache and graphed step. A copy or a pickle of the model starts
    without them (a CUDA graph cannot be copied, and it belongs to the original's tensors)."""

    def __init__(self):
        self.key, self.cache, self.step = None, None, None

    def __deepcopy__(self, memo):
        return _Kept()

    def __reduce__(self):
        return (_Kept, ())


def decoder_for(model, batch_size: int, max_len: int, compile: bool = False) -> tuple[KVCache, GraphedStep]:
    """An empty static cache and its graphed step for `model`, reused from the last call when the
    batch size, length, compile setting and every parameter's and buffer's address are the same
    (moving or casting the model gives new addresses, and so a new capture). One generation at a
    time per model: the next call resets the cache the last one used."""
    addresses = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    key = (batch_size, max_len, compile, addresses)
    kept = model.__dict__.setdefault("_graphed_decoder", _Kept())
    if kept.key != key:
        release(model)  # free the old buffers before taking new ones
        kept.cache = KVCache(model, batch_size, max_len=max_len, static=True)
        kept.step, kept.key = GraphedStep(model, kept.cache, compile=compile), key
    kept.cache.reset()
    return kept.cache, kept.step


def release(model) -> None:
    """Drop the static cache and CUDA graph that `generate` keeps on `model` for its next call."""
    kept = model.__dict__.get("_graphed_decoder")
    if kept is not None:
        kept.key, kept.cache, kept.step = None, None, None


__all__ = ["GraphedStep", "decoder_for", "graph_unsupported", "release"]
