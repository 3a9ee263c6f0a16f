"""Speculative decoding, ms per token at batch 1: lm's `speculative_generate` (the shipped 1M-parameter
draft proposing tokens for the shipped 4.8M-parameter Shakespeare model) against plain greedy
decoding of the same model, `lm.Decoder(target).generate(..., temperature=0)`: lm's fastest
non-speculative path (on CUDA it replays a CUDA graph per token; the decoder is built once, so the
capture is not timed).

Both write the same text: greedy decoding of the target, `--new` characters after each of three
prompts (asserted, token for token). Each side runs `--repeats` times, alternating, after a warm-up
run; the fastest run counts. The table also gives each draft length's acceptance rate (the share
of draft tokens the target kept) and tokens per target forward; on CUDA, the eager greedy loop
(`cuda_graph=False`) for reference. On CUDA speculative decoding runs through CUDA graphs too (the
draft's guesses as back-to-back replays, the target's check of k+1 positions as a graph), kept with
the target between calls, so only the first (warm-up) call captures them.

On the 2-core AVX-512 Xeon (2026-12-06), with each step in one C call (`lm.decode_step.StepInC`) and
`lm_matvec` taking two rows at a time: 1.16x at k=3 (0.637 against 0.742 ms/token), 1.18x at k=2, 1.13x at k=4;
after the Python around a step was halved (greedy decoding faster too), 1.09x (0.620 against 0.674), 1.11x at k=2
(1.04x at k=3 before the two-row products). On a 2-core AVX2 CPU (2026-12-05), with lm's C kernels called one by
one (`lm.cpu_kernels`): 1.08x at k=3 (1.64
against 1.77 ms/token), 1.09x at k=2, 1.04x at k=4; earlier that day, with torch's products, three
runs: 1.07-1.09x at k=3 (2.49-2.61 against 2.70-2.85 ms/token), 1.12-1.13x at k=4, the same with
--threads 1. Both models' forwards, the target's check of k+1 positions too, go through
`lm.decode_step.LeanStep` (through the modules the check made it 0.94x at k=3). The kernels sum
each output in a fixed order, so the check's logits are those of one-token steps bit for bit: the
text cannot differ at a near tie between two tokens.

Measured on one H200 (2026-12-04), three runs, k=3: 0.242-0.287 ms/token against 0.120-0.194 for
greedy decoding's fused graph (0.50-0.70x); k=6 0.195-0.240 (0.61-0.84x). Eager, before the
graphs: 1.26 against 0.47 (0.37x). Each round still reads the guesses and the target's choices
back (the host waits once a round), and at this size every forward, the draft's too, costs mostly
its launches; the text is the same on every side.

    .venv/bin/python bench/speculative_decode.py [--device cpu|cuda] [--threads 2] [--new 500]
                                                 [--num_draft 2 3 4 6] [--repeats 3]

Ends with one JSON line: {"bench", "unit": "ms/token", "lm", "peer", "peer_name", "speedup"} for
the first --num_draft; speedup > 1 means speculative decoding is faster.
"""

from __future__ import annotations

import argparse
import time

import torch

import lm
from lm.speculative import speculative_generate
from _report import report

PROMPTS = ["ROMEO:\n", "KING HENRY:\nWhat say you, my lo", "First Citizen:\nBefore we proceed any further, hear me"]


def timed(fn, device: torch.device):
    """(seconds, result) of fn(), waiting for the GPU on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU (default: 2)")
    parser.add_argument("--new", type=int, default=500, help="new tokens per prompt (default: 500)")
    parser.add_argument("--num_draft", type=int, nargs="+", default=[3, 2, 4, 6],
                        help="draft tokens per step; the first one is reported (default: 3 2 4 6)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per side (default: 3)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    target = lm.load_model(lm.assets.path("shakespeare_char.pt"), device=device)
    draft = lm.load_model(lm.assets.path("shakespeare_char_draft.pt"), device=device)
    decoder = lm.Decoder(target)

    def greedy(**options):
        return lambda: [decoder.generate(p, max_new_tokens=args.new, temperature=0, **options) for p in PROMPTS]

    def speculative(k):
        return lambda: [speculative_generate(target, draft, p, args.new, num_draft=k, return_stats=True)
                        for p in PROMPTS]

    runs = {"greedy": greedy()}
    if device.type == "cuda":
        runs["greedy, eager"] = greedy(cuda_graph=False)
    runs.update({f"speculative, k={k}": speculative(k) for k in args.num_draft})

    expected = runs["greedy"]()  # also the warm-up: the graph is captured here
    n_tokens = sum(len(target.tokenizer.encode(text)) for text in expected)
    stats = {}
    for name, fn in runs.items():  # warm up, and check every side writes the same text
        out = fn()
        texts = [o[0] if isinstance(o, tuple) else o for o in out]
        assert texts == expected, f"{name} wrote different text from greedy decoding"
        if isinstance(out[0], tuple):
            stats[name] = [o[1] for o in out]
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn, device)[0])
    ms = {name: 1000 * seconds / n_tokens for name, seconds in best.items()}

    print(f"target {lm.count_params(target.config):,} parameters, draft {lm.count_params(draft.config):,}; "
          f"{device}; {len(PROMPTS)} prompts x {args.new} new tokens, the same text on every side")
    for name in runs:
        line = f"{name:17s} {ms[name]:7.3f} ms/token  {ms['greedy'] / ms[name]:5.2f}x"
        if name in stats:
            drafted = sum(s.drafted for s in stats[name])
            accepted = sum(s.accepted for s in stats[name])
            steps = sum(s.steps for s in stats[name])
            line += (f"  acceptance {accepted / drafted:.1%}, {sum(s.new_tokens for s in stats[name]) / steps:.2f} "
                     f"tokens per target forward")
        print(line)
    chosen = f"speculative, k={args.num_draft[0]}"
    peer_name = "lm Decoder.generate greedy (CUDA graph)" if device.type == "cuda" else "lm Decoder.generate greedy"
    report(f"speculative_decode_shakespeare_{device.type}", "ms/token", ms[chosen], ms["greedy"], peer_name,
           higher_is_better=False)


if __name__ == "__main__":
    main()
