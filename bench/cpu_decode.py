"""CPU decode latency, ms per token at batch 1: lm's `model.generate` (its defaults: KV cache, the
one-token steps through `lm.decode_step.LeanStep`, whose float32 products and attention run in lm's
compiled kernels, `lm.cpu_kernels`, where they can be built) against transformers' `generate`.
The first line says whether the kernels ran; `LM_CPU_KERNELS=0` measures torch's products instead.

Seed 000's configuration (preset "roketmodel": 8 layers, d_model 512, 8 heads, d_ff 2048, learned
positions, untied head, 256-token character vocabulary), random weights (speed does not depend on
them), fp32, greedy decoding of `--new` tokens after a `--prompt`-token prompt, both with their KV
cache; lm also without its cache. Transformers runs GPT2LMHeadModel with the same architecture
(sdpa attention). Each side runs `--repeats` times, alternating; the median counts.

    .venv/bin/python bench/cpu_decode.py [--threads 2] [--new 200] [--prompt 16] [--batch 1]

`--batch 8` decodes 8 prompts at once (no padding), ms per step of 8 tokens.

`--lever step-in-c` measures lm alone, in one process: `model.generate` with each step in one call of lm's C
kernel (`lm.decode_step.StepInC`, `lm_decode_step` in lm/csrc/decode.c: every block's norms, products, cache
writes and attention without a return to Python) against LeanStep's functions calling the same products and
attention kernels one by one from Python, alternating, `--repeats` rounds each.

Ends with one JSON line: {"bench", "unit": "ms/token", "lm", "peer", "peer_name", "speedup"};
speedup > 1 means lm is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lm
import lm.cpu_kernels
from _report import report


def build(vocab: int, block: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = lm.preset("roketmodel", vocab_size=vocab, block_size=block, dropout=0.0)
    ours = lm.GPT(config).eval()
    hf_config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=config.d_model, n_layer=config.n_layer,
                           n_head=config.n_head, n_inner=config.ffn_width, activation_function="gelu",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    peer = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").eval()
    return ours, peer


def step_in_c_lever(args) -> None:
    """--lever step-in-c: model.generate with StepInC on and off in turns; the median ms/token of each."""
    import lm.decode_step

    torch.manual_seed(0)
    ours = lm.GPT(lm.preset("roketmodel", vocab_size=256, block_size=1024, dropout=0.0)).eval()
    prompt = torch.randint(0, 256, (args.batch, args.prompt))
    real, on = lm.decode_step.StepInC.__call__, [True]
    lm.decode_step.StepInC.__call__ = lambda self, *a: real(self, *a) if on[0] else None
    times = {True: [], False: []}
    with torch.inference_mode():
        tokens = {}
        for switch in (True, False):  # warm up, and the same tokens either way
            on[0] = switch
            tokens[switch] = ours.generate(prompt, max_new_tokens=args.new, temperature=0)
        assert torch.equal(tokens[True], tokens[False])
        for _ in range(args.repeats):
            for switch in (True, False):
                on[0] = switch
                times[switch].append(ms_per_token(lambda: ours.generate(prompt, max_new_tokens=args.new,
                                                                        temperature=0), args.new))
    unit = "ms/token" if args.batch == 1 else f"ms/step of {args.batch} tokens"
    for switch, values in times.items():
        print(f"lm, step in C {'on ' if switch else 'off'} {statistics.median(values):6.2f} {unit}  "
              f"(runs: {[round(v, 2) for v in values]})")
    report(f"cpu_decode_lever_step_in_c_b{args.batch}", unit, statistics.median(times[True]),
           statistics.median(times[False]), "lm with LeanStep's functions (one process, alternating)",
           higher_is_better=False)


def ms_per_token(fn, new: int) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start) / new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--new", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side (default: 3)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (default: 1)")
    parser.add_argument("--lever", choices=["step-in-c"], help="lm alone: the lever on and off in turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.lever:
        return step_in_c_lever(args)
    torch.manual_seed(0)
    print("lm's CPU kernels:", lm.cpu_kernels.unavailable() or "compiled and used")
    ours, peer = build(vocab=256, block=1024)
    prompt = torch.randint(0, 256, (args.batch, args.prompt))
    n = args.new

    import copy

    from lm.quantize import quantize_int8

    ours_int8 = quantize_int8(copy.deepcopy(ours))
    runs = {
        "lm (KV cache)": lambda: ours.generate(prompt, max_new_tokens=n, temperature=0),  # the defaults
        "lm int8 (KV cache)": lambda: ours_int8.generate(prompt, max_new_tokens=n, temperature=0),
        "lm (no cache)": lambda: ours.generate(prompt, max_new_tokens=n, temperature=0, use_cache=False),
        "transformers (cache)": lambda: peer.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                      use_cache=True, attention_mask=torch.ones_like(prompt)),
    }
    with torch.inference_mode():
        ours_ids = runs["lm (KV cache)"]()
        assert ours_ids.shape == (args.batch, args.prompt + n)
        assert torch.equal(ours_ids, runs["lm (no cache)"]())  # the cache changes speed, not tokens
        for fn in runs.values():  # warm up
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(ms_per_token(fn, n))
    unit = "ms/token" if args.batch == 1 else f"ms/step of {args.batch} tokens"
    for name, values in times.items():
        print(f"{name:22s} {statistics.median(values):7.2f} {unit}  (runs: {[round(v, 2) for v in values]})")
    speedup_int8 = statistics.median(times["transformers (cache)"]) / statistics.median(times["lm int8 (KV cache)"])
    print(f"int8 against transformers fp32: {speedup_int8:.2f}x")
    report(f"cpu_decode_roketmodel_b{args.batch}", unit, statistics.median(times["lm (KV cache)"]),
           statistics.median(times["transformers (cache)"]), "transformers GPT2LMHeadModel.generate (cache)",
           higher_is_better=False)


if __name__ == "__main__":
    main()
