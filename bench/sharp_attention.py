"""CPU training's causal attention and bias-GELU when the numbers get sharp: lm's C kernels against PyTorch's.

float32's normal numbers stop at 2^-126 (1.2e-38); below come the subnormals, which x86 cores handle in
microcode, about a hundred cycles for each instruction that reads or writes one. Softmax makes them wherever
a row's scores spread by more than about 87 (e^-90 = 8e-40), and backward multiplies those probabilities by
gradients; exact GELU makes them past |x| = 11 (its e^(-x^2/2)). lm's kernels run with the processor set to
read and write subnormals as zero (`tiny_as_zero` in lm/csrc/vector_math.h), so their time does not depend
on how sharp the numbers are. This script times, for q and k scaled by each `--scales` value (the book's
training shape: batch 8, 6 heads of 64, 256 tokens, float32), one layer's attention forward and backward
through `lm.cpu_kernels.causal_attention` and through `F.scaled_dot_product_attention` (PyTorch's flash
kernel for the CPU, what transformers' GPT-2 runs), and the MLP's bias + exact GELU forward and backward
on (2048, 1536) pre-activations of standard deviation `scale` through `lm.cpu_kernels.bias_gelu` and
through `F.gelu(h + b)`. Best of `--repeats` runs each.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sharp_attention.py [--scales 1 5 20] [--repeats 5]

Measured on the 2-core Xeon (AVX-512) on 2026-12-06, ms forward and backward, best of 5, with the kernels
as they are and (one run later, same machine) as they were before `tiny_as_zero`:

    scale of q and k (of h)          1       5      20
    attention, lm                   5.5     5.9     5.3    (before: 5.3, 36.9, 183.4)
    attention, PyTorch (flash)     11.4    58.3    14.3
    bias-GELU, lm                   1.9     2.0     1.7    (before: 1.8, 4.5, 24.6)
    bias-GELU, PyTorch              2.6     8.0     2.9

Ends with one JSON line for attention at the largest scale: lm against PyTorch's flash kernel, ms forward
and backward; speedup > 1 means lm is faster.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _report import report
from lm import cpu_kernels


def best_ms(run, repeats: int) -> float:
    run()  # warm: the kernels compile on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def attention_case(scale: float, generator: torch.Generator):
    """(q, k, v, upstream gradient) of one layer at the book's shape, q and k times `scale`"""
    q, k, v, g = (torch.randn(8, 6, 256, 64, generator=generator) for _ in range(4))
    return (q * scale).requires_grad_(), (k * scale).requires_grad_(), v.requires_grad_(), g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    why = cpu_kernels.causal_unavailable(64)
    if why is not None:
        raise SystemExit(f"lm's causal kernel is not available here: {why}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for scale in args.scales:
        q, k, v, g = attention_case(scale, generator)
        ours = best_ms(lambda: torch.autograd.grad(cpu_kernels.causal_attention(q, k, v), (q, k, v), g), args.repeats)
        flash = best_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                    (q, k, v), g), args.repeats)
        h = (torch.randn(2048, 1536, generator=generator) * scale).requires_grad_()
        b = torch.zeros(1536, requires_grad=True)
        up = torch.randn(2048, 1536, generator=generator) * 1e-4
        gelu_ours = best_ms(lambda: torch.autograd.grad(cpu_kernels.bias_gelu(h, b), (h, b), up), args.repeats)
        gelu_torch = best_ms(lambda: torch.autograd.grad(F.gelu(h + b), (h, b), up), args.repeats)
        rows.append((scale, ours, flash, gelu_ours, gelu_torch))
        print(f"scale {scale:5g}: attention lm {ours:7.2f} ms, PyTorch's flash kernel {flash:7.2f} ms;  "
              f"bias-GELU lm {gelu_ours:6.2f} ms, PyTorch {gelu_torch:6.2f} ms", flush=True)
    scale, ours, flash = rows[-1][:3]
    report(f"cpu_attention_sharp_x{scale:g}", "ms", ours, flash, "PyTorch F.scaled_dot_product_attention (flash, CPU)",
           higher_is_better=False)


if __name__ == "__main__":
    main()
