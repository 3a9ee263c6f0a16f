"""The fused decoding kernels one by one (`lm.fused_decode`) against what the module step runs.

For each of GPT-2 124M's matrix-vector shapes at batch 1 (and `--batch`), the time of
`lm.fused_decode.norm_linear` (lm's Triton kernel with its `launch_config`) against `F.linear`
(cuBLAS); and of `decode_attention` over 200 and 1,000 cached keys against
`F.scaled_dot_product_attention`. Each is timed as a CUDA graph of 20 back-to-back launches, the way
a decoding step replays them, best of five replays. `--sweep` also times every (columns, inputs,
warps) combination of the matrix-vector kernel and the attention kernel's keys per block, the
search that chose `launch_config` and `attention_config`.

    python bench/fused_kernels.py [--batch 1 2] [--sweep]

Measured on one H200 (torch 2.11, Triton 3.6; 2026-12-03; the sweep's run), us per kernel at batch 1:

    shape (N x K)            lm (launch_config)   cuBLAS F.linear
    qkv    2304 x 768              3.4                 3.95
    proj    768 x 768              2.7                 4.36
    fc     3072 x 768              3.6                 3.99
    proj2   768 x 3072             4.5                 6.92
    head  50304 x 768             23.0                22.45
    attention, 200 / 1,000 keys    4.2 / 11.0          SDPA 5.3 / 6.5

The attention kernel gives each (row, head) one program, which reads every key itself: 12 programs
for GPT-2, fine for a few hundred keys and slower than SDPA's split kernels at a thousand (splitting
the keys over programs, flash-decoding, is what would fix that). At batch 8 the kernel's
multiply-adds on CUDA cores take longer than cuBLAS's tensor cores (7.6 against 4.0 us for qkv), so
lm uses it only up to batch 2 (`lm.fused_decode.MAX_ROWS`).

Ends with one JSON line: the sum over one block's four products plus the attention (200 keys) at
the first batch size, lm against cuBLAS + SDPA; speedup > 1 means lm is faster.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch import nn

from lm import fused_decode as fd
from _report import report

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc": (3072, 768), "proj2": (768, 3072), "head": (50304, 768)}


def graph_us(fn, n: int = 20, reps: int = 5) -> float:
    """Microseconds per call of fn, replayed n at a time in a CUDA graph (best of reps)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    parser.add_argument("--sweep", action="store_true", help="also time every launch configuration")
    args = parser.parse_args()
    device = "cuda"
    torch.manual_seed(0)
    block = {}
    for B in args.batch:
        for name, (N, K) in SHAPES.items():
            layer = nn.Linear(K, N, bias=name != "head").to(device, torch.bfloat16)
            x = torch.randn(B, K, device=device, dtype=torch.bfloat16)
            error = (fd.norm_linear(x, layer).float() - nn.functional.linear(x, layer.weight, layer.bias).float())
            row = {"batch": B, "shape": name, "lm_us": graph_us(lambda: fd.norm_linear(x, layer)),
                   "cublas_us": graph_us(lambda: nn.functional.linear(x, layer.weight, layer.bias)),
                   "config": fd.launch_config(B, N, K), "max_abs_error": error.abs().max().item()}
            if args.sweep:
                tried = []
                for BN, BK, warps in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
                    BM = fd._pow2(B)
                    if BM * BN * BK > 16384 or BK > fd._pow2(K):
                        continue
                    config = dict(BM=BM, BN=BN, BK=BK, num_warps=warps)
                    tried.append((graph_us(lambda: fd.norm_linear(x, layer, config=config)), BN, BK, warps))
                row["fastest"] = [[round(t[0], 2), *t[1:]] for t in sorted(tried)[:5]]  # us, BN, BK, warps
            print(json.dumps(row), flush=True)
            if name != "head" and B == args.batch[0]:
                block[name] = (row["lm_us"], row["cublas_us"])
        H, D, S = 12, 64, 1024
        q = torch.randn(B, 3 * H * D, device=device, dtype=torch.bfloat16)
        keys, values = (torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        for length in (200, 1000):
            position = torch.tensor(length, device=device)
            heads = q[:, :H * D].view(B, H, 1, D)
            ours = graph_us(lambda: fd.decode_attention(q, keys, values, position, H))
            sdpa = graph_us(lambda: nn.functional.scaled_dot_product_attention(
                heads, keys[:, :, :length + 1], values[:, :, :length + 1]))
            row = {"batch": B, "attention_keys": length + 1, "lm_us": ours, "sdpa_us": sdpa}
            if args.sweep:
                tried = [(graph_us(lambda: fd.decode_attention(q, keys, values, position, H,
                                                               config=dict(BS=bs, num_warps=w))), bs, w)
                         for bs, w in itertools.product((16, 32, 64, 128, 256), (1, 2, 4, 8))]
                row["fastest"] = [[round(t[0], 2), *t[1:]] for t in sorted(tried)[:5]]  # us, BS, warps
            print(json.dumps(row), flush=True)
            if length == 200 and B == args.batch[0]:
                block["attention"] = (ours, sdpa)
    report(f"fused_decode_block_b{args.batch[0]}", "us per block (4 products + attention over 201 keys)",
           sum(v[0] for v in block.values()), sum(v[1] for v in block.values()),
           "cuBLAS F.linear + SDPA (what the module step runs)", higher_is_better=False)


if __name__ == "__main__":
    main()
