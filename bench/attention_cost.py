"""What does each attention variant cost as the sequence grows? Forward + backward time and memory.

One attention layer (the `lm.attention` module as a model uses it: fused q/k/v projection,
attention, output projection), d_model 256, 4 heads (D = 64), batch B, for each T in `--lengths`:

    manual          written-out softmax attention: the full (B, H, T, T) score matrix, saved for backward
    sdpa            torch's fused scaled_dot_product_attention, causal (lm's own habit of keeping the
                    probabilities of short sequences in CPU training, lm.attention.kernels.SAVED_PROBABILITIES,
                    is switched off here, so this is the fused kernel alone; `--keep` leaves it on)
    gqa             sdpa with 2 key/value heads for the 4 query heads
    sliding_window  window 128, computed block by block (only the keys a window can reach)
    linear          causal linear attention, chunked (chunk 64), no T x T matrix
    block_sparse    blocks of 16, 2 local blocks + every 4th block as a summary, only allowed blocks computed

Time: the fastest of `--repeats` forward+backward passes after one warm-up, in ms (on a shared
machine the fastest pass is the least disturbed one; the median is stored too). Memory:
- `saved_mb`: bytes of the tensors autograd keeps for the backward pass (counted once per storage
  through torch.autograd.graph.saved_tensors_hooks). It is what grows with T, and it is the same on
  any device, so CPU runs can show the T^2 of softmax attention without a GPU;
- `peak_mb` (CUDA only): torch.cuda.max_memory_allocated during the pass, above what was allocated
  before it.

    .venv/bin/python bench/attention_cost.py                                  # CPU, 1 thread, T = 128 .. 2048
    .venv/bin/python bench/attention_cost.py --out lm/assets/attention_cost_cpu.json
    python bench/attention_cost.py --device cuda --lengths 1024 2048 4096 8192 16384 --batch 2

The table goes to stdout and, with `--out`, as JSON (settings + one row per variant and T) to a
file. The last line is one JSON object comparing, at the largest T, linear attention ("lm": the
variant that does the whole causal context in O(T)) with the written-out softmax attention a
textbook implements ("peer"); speedup = peer / lm, > 1 when linear attention is faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import lm
from _report import report
from lm.attention import kernels
from lm.registry import ATTENTION

VARIANTS = {  # name -> ModelConfig overrides
    "manual": dict(attention="manual"),
    "sdpa": dict(attention="sdpa"),
    "gqa": dict(attention="sdpa", n_kv_heads=2),
    "sliding_window": dict(attention="sliding_window", window=128),
    "linear": dict(attention="linear"),
    "block_sparse": dict(attention="block_sparse", sparse_block=16, sparse_local=2, sparse_stride=4),
}


class SavedBytes:
    """Sum of the bytes autograd saves for backward, each storage counted once."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(layer: torch.nn.Module, B: int, T: int, device: torch.device, dtype: torch.dtype, repeats: int):
    x = torch.randn(B, T, layer.proj.in_features, device=device, dtype=dtype, requires_grad=True)

    def step():
        layer(x).float().sum().backward()

    # memory: one pass with the hooks (and, on CUDA, the peak above the baseline)
    saved = SavedBytes()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        step()
    peak_mb = None
    if device.type == "cuda":
        sync(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20

    times = []
    for _ in range(repeats):
        x.grad = None
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times), saved.total / 2**20, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed passes per point; the fastest is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on cpu, steadier on a shared machine; torch's on cuda)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=None, help="write the full table as JSON to this file")
    parser.add_argument("--keep", action="store_true",
                        help="let sdpa keep short sequences' probabilities on a CPU, as lm's training does")
    args = parser.parse_args()
    if not args.keep:
        kernels.SAVED_PROBABILITIES = 0  # "sdpa" measures torch's fused kernel, which keeps no T x T matrix

    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    lengths = sorted(args.lengths)
    layers = {}
    for name in args.variants:
        config = lm.ModelConfig(d_model=args.d_model, n_head=args.n_head, block_size=max(lengths), **VARIANTS[name])
        layers[name] = ATTENTION.get(config.attention)(config).to(device=device, dtype=dtype)

    rows = []
    print(f"{'variant':<15} {'T':>6} {'ms fwd+bwd':>11} {'saved MB':>9} {'peak MB':>8}")
    for T in lengths:
        for name, layer in layers.items():
            layer(torch.randn(args.batch, T, args.d_model, device=device, dtype=dtype)).sum().backward()  # warm-up
            ms, ms_median, saved_mb, peak_mb = measure(layer, args.batch, T, device, dtype, args.repeats)
            rows.append(dict(variant=name, T=T, ms=round(ms, 3), ms_median=round(ms_median, 3),
                             saved_mb=round(saved_mb, 3), peak_mb=None if peak_mb is None else round(peak_mb, 3)))
            peak = "-" if peak_mb is None else f"{peak_mb:.1f}"
            print(f"{name:<15} {T:>6} {ms:>11.2f} {saved_mb:>9.2f} {peak:>8}", flush=True)

    result = dict(
        bench="attention_cost", device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(), torch=torch.__version__, dtype=args.dtype, batch=args.batch,
        d_model=args.d_model, n_head=args.n_head, repeats=args.repeats, variants=VARIANTS, rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")

    T = lengths[-1]
    at_max = {r["variant"]: r["ms"] for r in rows if r["T"] == T}
    if "manual" in at_max:
        others = ", ".join(f"{n} {at_max['manual'] / ms:.1f}x" for n, ms in at_max.items() if n != "manual")
        print(f"speed-up over manual at T={T}: {others}")
    if "linear" in at_max and "manual" in at_max:
        report("attention_cost", f"ms fwd+bwd at T={T}", at_max["linear"], at_max["manual"],
               "manual softmax attention", higher_is_better=False)


if __name__ == "__main__":
    main()
