"""GPU decode throughput, tokens/s: lm's `generate` (KV cache) against transformers' `generate`.

GPT-2 124M (preset "gpt2-124m"), random weights, bfloat16 weights and activations, greedy decoding
of `--new` tokens after a `--prompt`-token prompt, at each batch size in `--batch`. Tokens/s counts
generated tokens of all rows; each side runs after one warm-up call (which captures lm's CUDA
graph, and compiles for "lm compiled").

    lm                   lm.Decoder(model).generate, the default on CUDA: each one-token step
                         replays a CUDA graph, captured on the first call and kept by the decoder; at
                         batch 1 and 2 the graph is of lm.fused_decode.FusedStep (Triton kernels,
                         launched with programmatic dependent launch on Hopper), greedy steps run back
                         to back with nothing but graph launches, and the prompt's forward replays a
                         graph of its length bucket (lm.cuda_graph.GraphedPrefill)
    lm, no PDL           the same with lm.fused_decode.PDL = False: each kernel starts when the last ends
    lm, one attention program per head
                         the same with lm.fused_decode.SPLIT_KEYS = False: each head's keys are read
                         by one program, not split over up to 16 (matters for long contexts: --prompt 800)
    lm compiled          compile=True: the model's own step, torch.compile'd, then graphed
    lm eager             cuda_graph=False: every kernel launched from Python
    lm, model.generate   model.generate, which keeps one Decoder with the model (model.decoder)
    lm, a new Decoder each call
                         what a decoder's first call costs: the graphs are captured within the call
    transformers         GPT2LMHeadModel.generate with its dynamic cache (sdpa attention)
    lm, sampled          what a chat asks for: temperature 0.8, top_k 50, stopping at <|endoftext|>
                         (seeded: random weights rarely draw it, and steps are counted); the graph draws
                         each token (the Gumbel-max kernels of lm.fused_sampling) and pads rows that
                         have finished, and the host reads back whether all have, a few steps
                         behind (lm.cuda_graph.GraphedStep.run_until)
    lm, sampled, eager   the same with cuda_graph=False (the same kernels draw, launched from Python)
    transformers, sampled
                         generate(do_sample=True, temperature=0.8, top_k=50, eos_token_id=<|endoftext|>)

    python bench/gpu_decode.py --batch 1 2 64 --new 200 --out lm/assets/gpu_decode.json

Measured on one H200 (torch 2.11, Triton 3.6; 2026-12-04, after top-k became the draw's own
threshold in lm.fused_sampling's kernels), tokens/s, the best of three calls, stored in
lm/assets/gpu_decode.json:

                              batch 1   batch 2   batch 64
    lm                          3,769     6,228     62,079   (fused step at batch 1 and 2)
    lm, no PDL                  3,209     5,463     62,110
    lm, one attention program   3,664     6,268     61,908   (a 16-token prompt: the split matters later)
    lm compiled                 1,959     3,897     77,723
    lm eager                      351       546     17,164   (one-token steps through LeanStep)
    lm, model.generate          3,756     6,249     62,031
    lm, a new Decoder each call 2,875     4,230     53,918
    transformers                  212       294      8,474
    lm, sampled                 3,261     5,481     55,767
    lm, sampled, eager            246       550     14,009
    transformers, sampled         182       233      8,400

transformers' rows vary between machines of the same kind (runs the same day: 217 / 413 / 7,492
and 221 / 398 / 12,250 greedy, 115 / 262 / 5,767 and 175 / 396 / 9,565 sampled). "lm, sampled" at
batch 1 was 1,526 tokens/s with the draw and the stop check in Python after each replay (a probe
script timing lm.Decoder.generate, same settings), 2,278 with torch.multinomial's kernels in the
graph, and 2,859 / 4,998 / 53,816 with the Gumbel-max kernels but top-k still torch.topk's filter
(this bench, earlier the same day). In the probe, plain sampling at temperature 0.8 makes 3,812
tokens/s, greedy's speed; top-k 50 3,460 (3,092 with torch.topk); greedy with a stop token 3,580
(2,986 before the stops went into the graph); top-p 0.95, which still sorts the row, 2,887.

Without PDL and the prompt's graph (2026-12-03) the default made 2,833 tokens/s at batch 1. In
another run the same day, with PDL on and off in turn (a script toggling lm.fused_decode.PDL, same model): 3,530 / 3,504
against 3,096 / 3,067 tokens/s at batch 1, 6,116 / 6,120 against 5,306 / 5,303 at batch 2, the
same ids. The side "lm, one attention program per head" came after that table (2026-12-04); the
same two decoders in a shorter script (stored as "split_keys" in the asset), 200 new tokens:
split 3,736 / 3,389 tokens/s against one program per head 3,611 / 2,432 at batch 1 after a prompt
of 16 / 800; 6,314 / 5,364 against 6,356 / 4,354 at batch 2. The eager rows depend on the host CPU
that launches the kernels, which differs between machines of the same kind (385 tokens/s at batch 1
on 2026-12-03).

Eager, each step launches every kernel from Python: about 3 ms a step at batch 1 and at batch 64 alike.
At batch 64 a few rows of the graph's greedy ids differ from eager's (55 of 64 rows equal): the
static step attends through a mask, another bf16 kernel, and random weights leave near-ties in the
logits; in float32 the tests find them identical.

Ends with one JSON line for the first batch size: {"bench", "unit": "tokens/s", "lm", "peer",
"peer_name", "speedup"}, lm being generate's default; speedup > 1 means lm is faster. Figures go to
--out as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lm
import lm.fused_decode
from _report import report


SAMPLED = dict(temperature=0.8, top_k=50, seed=0)
STOP = 50256


def seeded(generate, *args, **options):
    """transformers' draws come from torch's generator: seeded per call, so each call makes the same tokens."""
    torch.manual_seed(SAMPLED["seed"])
    return generate(*args, **options)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class SwitchedOff(lm.Decoder):
    """A decoder that runs with one of lm.fused_decode's switches off: "PDL" (each kernel starts when
    the last ends) or "SPLIT_KEYS" (one attention program per head reads all its keys)."""

    def __init__(self, model, switch: str):
        super().__init__(model)
        self.switch = switch

    def generate(self, *args, **options):
        setattr(lm.fused_decode, self.switch, False)
        try:
            return super().generate(*args, **options)
        finally:
            setattr(lm.fused_decode, self.switch, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    parser.add_argument("--new", type=int, default=200, help="tokens to generate per row (default: 200)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default: 16)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    config = lm.preset("gpt2-124m")
    ours = lm.GPT(config).to(device, dtype).eval()
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.d_model,
                           n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                           pad_token_id=0)
    peer = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").to(device, dtype).eval()
    sync = torch.cuda.synchronize
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": "bfloat16",
               "new_tokens": args.new, "prompt_tokens": args.prompt, "runs": []}
    n = args.new
    graphed, compiled = lm.Decoder(ours), lm.Decoder(ours)  # each keeps its captured graph between calls
    unlinked, unsplit = SwitchedOff(ours, "PDL"), SwitchedOff(ours, "SPLIT_KEYS")
    for B in args.batch:
        prompt = torch.randint(0, config.vocab_size, (B, args.prompt), device=device)
        sides = {
            "lm": lambda: graphed.generate(prompt, max_new_tokens=n, temperature=0),
            "lm, no PDL": lambda: unlinked.generate(prompt, max_new_tokens=n, temperature=0),
            "lm, one attention program per head": lambda: unsplit.generate(prompt, max_new_tokens=n, temperature=0),
            "lm compiled": lambda: compiled.generate(prompt, max_new_tokens=n, temperature=0, compile=True),
            "lm eager": lambda: graphed.generate(prompt, max_new_tokens=n, temperature=0, cuda_graph=False),
            "lm, model.generate": lambda: ours.generate(prompt, max_new_tokens=n, temperature=0),
            "lm, a new Decoder each call": lambda: lm.Decoder(ours).generate(prompt, max_new_tokens=n, temperature=0),
            "transformers": lambda: peer.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                  use_cache=True, attention_mask=torch.ones_like(prompt)),
            # what a chat does: a draw at temperature 0.8 among the 50 likeliest tokens, watching for a stop
            # token (GPT-2's <|endoftext|>); seeded, so every call makes the same tokens (all n, unless the
            # draws make the stop token: then the steps made are counted)
            "lm, sampled": lambda: graphed.generate(prompt, max_new_tokens=n, **SAMPLED, stop_tokens=[STOP]),
            "lm, sampled, eager": lambda: graphed.generate(prompt, max_new_tokens=n, **SAMPLED, stop_tokens=[STOP],
                                                           cuda_graph=False),
            "transformers, sampled": lambda: seeded(peer.generate, prompt, max_new_tokens=n, do_sample=True,
                                                    temperature=0.8, top_k=50, eos_token_id=STOP, use_cache=True,
                                                    attention_mask=torch.ones_like(prompt)),
        }
        outputs = {}
        with torch.inference_mode():
            for name, fn in sides.items():
                outputs[name] = fn()  # warm-up
                steps = outputs[name].size(1) - args.prompt  # n, unless every row drew the stop token
                if steps != n:  # (seeded: every call stops at the same step)
                    print(f"{name}: every row stopped after {steps} of {n} tokens; counting {steps}", flush=True)
                seconds = min(timed(fn, sync) for _ in range(3))  # the best of three
                run = {"side": name, "batch": B, "tokens_per_second": B * steps / seconds,
                       "ms_per_step": 1000 * seconds / steps}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
        for name in ("lm", "lm compiled"):  # bf16 kernels differ in rounding: near-ties may flip
            same_rows = sum(torch.equal(a, b) for a, b in zip(outputs[name], outputs["lm eager"]))
            print(f"batch {B}: {name} gives eager's ids in {same_rows} of {B} rows", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    first = [r for r in results["runs"] if r["batch"] == args.batch[0]]
    by_side = {r["side"]: r["tokens_per_second"] for r in first}
    report(f"gpu_decode_gpt2_b{args.batch[0]}", "tokens/s", by_side["lm"], by_side["transformers"],
           "transformers GPT2LMHeadModel.generate (cache)", higher_is_better=True)


if __name__ == "__main__":
    main()
