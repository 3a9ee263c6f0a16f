"""The fused decoding kernels one by one (`lm.fused_decode`) against what the module step runs.

For each of GPT-2 124M's matrix-vector shapes at batch 1 (and `--batch`), the time of
`lm.fused_decode.norm_linear` (lm's Triton kernel with its `launch_config`) against `F.linear`
(cuBLAS); and of `decode_attention` over 100 to 1,000 cached keys (a cache of 1,024 slots) with its
default `attention_config` (the keys split over up to 16 programs per head), with one program per
head, and `F.scaled_dot_product_attention`. Each is timed as a CUDA graph of 20 back-to-back
launches, the way a decoding step replays them, best of five replays. `--sweep` also times every
(columns, inputs, warps) combination of the matrix-vector kernel and (keys per block, blocks per
program, warps) of the attention kernel, the searches behind `launch_config` and `attention_config`.

    python bench/fused_kernels.py [--batch 1 2] [--sweep]

Measured on one H200 (torch 2.11, Triton 3.6; 2026-12-03; the sweep's run), us per kernel at batch 1:

    shape (N x K)            lm (launch_config)   cuBLAS F.linear
    qkv    2304 x 768              3.4                 3.95
    proj    768 x 768              2.7                 4.36
    fc     3072 x 768              3.6                 3.99
    proj2   768 x 3072             4.5                 6.92
    head  50304 x 768             23.0                22.45

Attention, 12 heads of 64 at batch 1 (2026-12-04, without --sweep):

    keys                            101     201     501    1,001
    lm (split, 8 programs a head)   2.8     4.3     4.4     4.5
    lm, one program per head        3.8     3.8     6.0    10.2
    SDPA                            4.1     5.3     6.8     6.8

One program per (row, head) reads every key itself: 12 programs for GPT-2 on 132 SMs, fine for a
few hundred keys and slower than SDPA's split kernels at a thousand. Split, each program reads 128
keys, and the last to finish (an atomic count tells it) joins their partial softmax sums; only the
programs that reach the current position work, and with one of them it writes the output directly.
At batch 8 the matrix-vector kernel's multiply-adds on CUDA cores take longer than cuBLAS's tensor
cores (7.6 against 4.0 us for qkv), so lm uses it only up to batch 2 (`lm.fused_decode.MAX_ROWS`).

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
        one_program, split = fd.attention_config(D, S, split=False), fd.attention_config(D, S, split=True)
        scratch = fd.attention_scratch(B, H, D, 64, device)  # enough for any split count below
        for length in (100, 200, 500, 1000):
            position = torch.tensor(length, device=device)
            heads = q[:, :H * D].view(B, H, 1, D)
            ours = graph_us(lambda: fd.decode_attention(q, keys, values, position, H, config=split, scratch=scratch))
            single = graph_us(lambda: fd.decode_attention(q, keys, values, position, H, config=one_program,
                                                          scratch=scratch))
            sdpa = graph_us(lambda: nn.functional.scaled_dot_product_attention(
                heads, keys[:, :, :length + 1], values[:, :, :length + 1]))
            row = {"batch": B, "attention_keys": length + 1, "lm_us": ours, "lm_one_program_per_head_us": single,
                   "sdpa_us": sdpa, "config": split}
            if args.sweep:
                tried = []
                for bs, warps in itertools.product((32, 64, 128, 256), (2, 4, 8)):
                    for nb in (1, 2, 4, 8):
                        if S % (bs * nb) == 0 and S // (bs * nb) <= 64:
                            config = dict(BS=bs, NB=nb, SPLITS=S // (bs * nb), num_warps=warps)
                            tried.append((graph_us(lambda: fd.decode_attention(q, keys, values, position, H,
                                                                               config=config, scratch=scratch)),
                                          bs, nb, warps))
                row["fastest"] = [[round(t[0], 2), *t[1:]] for t in sorted(tried)[:5]]  # us, BS, NB, warps
            print(json.dumps(row), flush=True)
            if length == 200 and B == args.batch[0]:
                block["attention"] = (ours, sdpa)
    report(f"fused_decode_block_b{args.batch[0]}", "us per block (4 products + attention over 201 keys)",
           sum(v[0] for v in block.values()), sum(v[1] for v in block.values()),
           "cuBLAS F.linear + SDPA (what the module step runs)", higher_is_better=False)


if __name__ == "__main__":
    main()
