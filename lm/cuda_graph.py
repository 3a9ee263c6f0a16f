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

`lm.generation.Decoder` does this for you on CUDA and keeps the graph between calls.
"""

from __future__ import annotations

import torch


def graph_unsupported(model) -> str | None:
    """Why `model` cannot decode through a CUDA graph, or None when it can."""
    if model.device.type != "cuda":
        return f"CUDA graphs need the model on a CUDA device (it is on {model.device.type})"
    if model.config.ffn == "moe":
        return "ffn='moe' routes tokens to experts with data-dependent shapes (a host sync per layer)"
    return None


class GraphedStep:
    """`model(token, cache=cache)` on a static cache, captured as a CUDA graph on the first call and
    replayed on every later one; each replay also moves the cache's device position by one.
    `compile=True` runs the step through `torch.compile` first (fewer, fused kernels inside the
    graph; compiling takes a while on the first call)."""

    def __init__(self, model, cache, compile: bool = False):
        reason = graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"cannot decode with a CUDA graph: {reason}; pass cuda_graph=False.")
        if not cache.static:
            raise ValueError("GraphedStep needs KVCache(..., static=True): the graph must read a fixed buffer.")
        self.cache = cache
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)

        def step(token):
            return model(token, cache=cache)[0]

        self.step = torch.compile(step, fullgraph=True, dynamic=False) if compile else step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of `token` (B, 1) at the cache's next position."""
        self.token.copy_(token)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # The warm-up runs write the cache, so its state is put back before the capture.
        self.graph, self.logits = capture(lambda: self.step(self.token), restore=self.cache.tensors())


def capture(step, warmup: int = 2, restore=(), pool=None):
    """Record `step()` (a function of fixed buffers only) as a CUDA graph; returns (graph, output),
    where `output` is the buffer each `graph.replay()` overwrites.

    It runs `warmup` times on a side stream first, so that cuBLAS workspaces, kernel choices and
    compilation all happen before the capture (none of them may happen inside it). Tensors in
    `restore` get back the values they had before the warm-up. `pool` (torch.cuda.graph_pool_handle())
    lets graphs that never run at the same time share their intermediate memory."""
    saved = [(t, t.clone()) for t in restore]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for tensor, copy in saved:
        tensor.copy_(copy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return graph, output


__all__ = ["GraphedStep", "capture", "graph_unsupported"]
