"""CPU training throughput, tokens/s: lm.GPT against Hugging Face transformers' GPT2LMHeadModel.

Both models have the same architecture (6 layers, 6 heads, d_model 384, GELU MLP, tied embeddings,
learned positions), the same batches (B=8, T=256, character vocabulary, random windows of pydoc
text), the same loss, gradient clipping and fused AdamW, and the same thread count. lm's side is one
`lm.trainer.Trainer.train_step()`: the trainer users run, with its bookkeeping, not a hand-written
loop; its causal attention, and its MLP's first bias and GELU, run in lm's C kernels (lm/csrc/causal.c) where
those can be built (`LM_CPU_KERNELS=0` gives SDPA's flash kernel, as transformers uses, and torch's GELU).

`--arch llama` compares seed 002's LLaMA-style block at the same size instead (RoPE, RMSNorm, bias-free
SwiGLU of width 1536, tied head) against transformers' LlamaForCausalLM: there lm's RMSNorm and SwiGLU gate run
in C (`lm.cpu_kernels.rms_norm`, `silu_gate`), as does RoPE's rotation (`lm.cpu_kernels.rope`), and its attention
in the causal kernel; `--kv_heads 2` gives both models grouped-query attention (lm repeats the key/value heads
for its kernel).

Each side runs in a process of its own, as a user runs either library: lm's Trainer sets glibc's
malloc to reuse freed blocks (`lm.trainer.reuse_freed_memory`, process-wide; LM_REUSE_FREED_MEMORY=0
leaves malloc as it is), and transformers' process keeps glibc's defaults. The processes alternate,
`--rounds` of each, so drifts in machine load hit both; each does `--warmup` untimed steps, then
`--steps` timed ones, and the median round counts. `--same-process` runs both in this one process
instead, alternating every round (the peer then gets lm's malloc setting too; with
LM_REUSE_FREED_MEMORY=0, neither does).

    .venv/bin/python bench/cpu_train_throughput.py [--steps 10] [--threads 2] [--precision bf16]

A lever of lm's own is smaller than this machine's drift from one run to the next (about 5%), so
`--lever NAME` measures one inside a single process instead: lm alone, the lever on and off in turns,
`--steps` timed steps each, for `--rounds` rounds; the median step with it against without it:

    c-attention   causal attention in lm's C kernel (lm/csrc/causal.c), against PyTorch's flash kernel
    qkv-whole     the kernel taking qkv's output whole, its bias added there
                  (`CausalSelfAttention._attention_in_c`), against q, k, v handed to it apart
    bias-gelu     the MLP's fc bias and exact GELU in lm's C kernel (`lm.cpu_kernels.bias_gelu`), against
                  fc with its bias, then F.gelu
    clip-in-adamw gradient clipping folded into the fused AdamW's step (`Trainer._fold_clipping`), against
                  clip_grad_norm_ first
    row-kernels   (with --arch llama) RMSNorm and SwiGLU's gate in lm's C kernels (`lm.cpu_kernels.rms_norm`,
                  `silu_gate`), against torch's written-out RMSNorm and F.silu(gate) * value
    rope          (with --arch llama) RoPE's rotation of q and k in lm's C kernel (`lm.cpu_kernels.rope`), against
                  the written-out x cos + rotate_half(x) sin
    bias-residual the output projections' biases added with the residual sums in one pass of lm's C kernel
                  (`lm.cpu_kernels.bias_residual`, from `Block._residual`), against proj with its bias, then x + that

    .venv/bin/python bench/cpu_train_throughput.py --lever qkv-whole --steps 3 --rounds 12

What a CPU without AVX-512 would give, measured on one that has it: lm's kernels, torch's own and MKL's all held
to AVX2 (1.12-1.16 on the 2-core Xeon, where AVX-512 gives 1.2-1.3: the products take twice as long, and what
lm's kernels save stays the same in milliseconds):

    LM_CPU_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/cpu_train_throughput.py

Why AVX2 stays below 1.2 (torch.profiler over a step of each side, 2026-12-06, the Xeon held to AVX2): both run
the same 74 matrix products (2048 x 384 x 1536 at about 193 GFLOP/s over the two cores, AVX2's two FMA units
at their full rate: nothing left to win there), 711 ms of lm's 860 ms profiled step and 651-709 ms of
transformers' 890-990 across four profiles. lm's other work was 149 ms (attention 62, in its C kernel; bias and
GELU 31; LayerNorm 11; AdamW 8; the norms for clipping 4.5), transformers' 180-320. Unprofiled, lm 814-837 ms
a step against 900-925. With lm's other work at nothing the ratio would be about 1.27; 1.2 needs it at about
40 ms, and causal attention's own products (7.3 GFLOP a step, forward and backward) take 38 ms at that rate.
With AVX-512 the products take half as long, and the same saving in milliseconds gives 1.2-1.3.

Ends with one JSON line: {"bench", "unit", "lm", "peer", "peer_name", "speedup"}; speedup > 1
means lm trains faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import lm
import lm.attention
import lm.data
import lm.feedforward
import lm.model
import lm.norms
import lm.optim
import lm.positions
import lm.trainer
from _report import report


def build_models(vocab_size: int, block_size: int, arch: str = "gpt2", kv_heads: int = 6):
    if arch == "llama":
        return build_llama_models(vocab_size, block_size, kv_heads)
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = lm.GPT(lm.ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=6, n_head=6,
                                 d_model=384, dropout=0.0))
    hf_config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=384, n_layer=6, n_head=6,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu")
    try:
        peer = GPT2LMHeadModel(hf_config, attn_implementation="sdpa")
    except TypeError:
        peer = GPT2LMHeadModel(hf_config)
    return ours, peer


def build_llama_models(vocab_size: int, block_size: int, kv_heads: int = 6):
    """Seed 002's LLaMA-style block at the same size: lm's "rscalm-138m" preset cut to 6 layers x 6 heads x 384
    (RoPE, RMSNorm with eps 1e-6, bias-free SwiGLU of width 4 x 384, tied head), `kv_heads` key/value heads
    (fewer than 6: grouped-query attention, as seed 004 has), and transformers' LlamaForCausalLM with the same
    settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = lm.preset("rscalm-138m", vocab_size=vocab_size, block_size=block_size, n_layer=6, n_head=6, d_model=384,
                       n_kv_heads=kv_heads)
    ours = lm.GPT(config)
    hf_config = LlamaConfig(vocab_size=vocab_size, hidden_size=384, intermediate_size=config.ffn_width,
                            num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=kv_heads,
                            max_position_embeddings=block_size, rms_norm_eps=config.norm_eps, tie_word_embeddings=True,
                            attention_bias=False, mlp_bias=False)
    try:
        peer = LlamaForCausalLM(hf_config, attn_implementation="sdpa")
    except TypeError:
        peer = LlamaForCausalLM(hf_config)
    return ours, peer


def step_hf(model, opt, batches, precision="fp32"):
    """The peer's training step: the same batches, loss, clipping and AdamW as lm's trainer."""
    (x, y), = batches.next_step()
    with lm.trainer.autocast(torch.device("cpu"), precision):
        loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside; same next-token task
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn, steps):
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def setup(args):
    """The steps to time, {"lm": ..., "transformers": ...} (only `args.side`'s when given), each a call that
    runs one training step."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = lm.load_corpus("pydoc")
    tok = lm.CharTokenizer.train(text)
    data = torch.tensor(tok.encode(text, parse_special=False))
    ours, peer = build_models(tok.vocab_size, args.seq_len, getattr(args, "arch", "gpt2"), getattr(args, "kv_heads", 6))
    runs = {}
    if args.side in (None, "lm"):
        # one optimizer step of lm's trainer (batch, forward, backward, clip, fused AdamW, bookkeeping)
        trainer = lm.trainer.Trainer(ours, data, data, lm.TrainConfig(
            max_steps=10**9, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=0, progress=False,
            compile=args.compile, precision=args.precision))
        ours.train()
        runs["lm"] = trainer.train_step
    if args.side in (None, "transformers"):
        peer_batches = lm.data.Batches(data, args.batch_size, args.seq_len, seed=0)
        peer_opt = lm.optim.configure_optimizer(peer, 3e-4, 0.1)
        peer.train()
        runs["transformers"] = lambda: step_hf(peer, peer_opt, peer_batches, args.precision)
    return runs


def _switch_c_attention(on: bool) -> None:
    lm.attention.kernels.SAVED_PROBABILITIES = SAVED_PROBABILITIES if on else 0  # 0: the flash kernel


def _switch_qkv_whole(on: bool) -> None:
    layer = lm.attention.CausalSelfAttention
    layer._attention_in_c = ATTENTION_IN_C if on else (lambda self, x: False)


def _switch_clip_in_adamw(on: bool) -> None:
    # off: the fused step is told nothing of clipping, as if it could not skip a bad step on the device either,
    # so the trainer clips the gradients with clip_grad_norm_ first
    lm.trainer.Trainer._fold_clipping = on


def _switch_bias_gelu(on: bool) -> None:
    lm.feedforward.MLP._bias_gelu_in_c = BIAS_GELU_IN_C if on else (lambda self, x: False)


def _switch_row_kernels(on: bool) -> None:
    lm.norms.RMSNorm._in_c = RMS_NORM_IN_C if on else (lambda self, x: False)
    lm.feedforward.SwiGLU._gate_in_c = GATE_IN_C if on else staticmethod(lambda gate: False)


def _switch_bias_residual(on: bool) -> None:
    plain = staticmethod(lambda x, sublayer, h, *args: x + sublayer(h, *args))
    lm.model.Block._residual = BLOCK_RESIDUAL if on else plain


def _switch_rope(on: bool) -> None:
    lm.positions.RotaryEmbedding._in_c = ROPE_IN_C if on else staticmethod(lambda q, k: False)


SAVED_PROBABILITIES = lm.attention.kernels.SAVED_PROBABILITIES
BIAS_GELU_IN_C = lm.feedforward.MLP._bias_gelu_in_c
ATTENTION_IN_C = lm.attention.CausalSelfAttention._attention_in_c
RMS_NORM_IN_C, GATE_IN_C = lm.norms.RMSNorm._in_c, lm.feedforward.SwiGLU.__dict__["_gate_in_c"]
ROPE_IN_C = lm.positions.RotaryEmbedding.__dict__["_in_c"]
BLOCK_RESIDUAL = lm.model.Block.__dict__["_residual"]
LEVERS = {"c-attention": _switch_c_attention, "qkv-whole": _switch_qkv_whole, "clip-in-adamw": _switch_clip_in_adamw,
          "bias-gelu": _switch_bias_gelu, "row-kernels": _switch_row_kernels, "rope": _switch_rope,
          "bias-residual": _switch_bias_residual}


def lever_in_one_process(args) -> None:
    """--lever: lm's step with the lever on and off in turns; reports the median ms a step of each."""
    args.side = "lm"
    step, switch = setup(args)["lm"], LEVERS[args.lever]
    timed(step, args.warmup)
    ms = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            switch(on)
            step()  # the first step after a switch settles the allocator
            ms[on].append(1e3 * timed(step, args.steps) / args.steps)
    switch(True)
    for on, values in ms.items():
        print(f"lm, {args.lever} {'on ' if on else 'off'} {statistics.median(values):7.1f} ms a step  "
              f"(rounds: {[round(v) for v in values]})")
    report(f"cpu_train_lever_{args.lever}", "ms/step", statistics.median(ms[True]), statistics.median(ms[False]),
           f"lm with {args.lever} off (one process, alternating)", higher_is_better=False)


def one_side(args) -> None:
    """--side: warm up, time `--steps` steps of one side, print its tokens/s as a JSON line."""
    step = setup(args)[args.side]
    timed(step, args.warmup)
    print(json.dumps({"tokens_per_s": args.batch_size * args.seq_len * args.steps / timed(step, args.steps)}))


def in_own_process(args, side: str) -> float:
    """tokens/s of one side, measured in a fresh process"""
    options = [f"--{name}={getattr(args, name)}" for name in ("steps", "warmup", "threads", "batch_size", "seq_len",
                                                                 "precision", "arch", "kv_heads")]
    done = subprocess.run([sys.executable, __file__, "--side", side, *options, *(["--compile"] if args.compile else [])],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="lm.TrainConfig(compile=True) for lm")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="autocast for both (lm: TrainConfig(precision=...)); default fp32")
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"),
                        help="gpt2: GPT2LMHeadModel's block (default); llama: seed 002's RoPE, RMSNorm and SwiGLU "
                             "against LlamaForCausalLM")
    parser.add_argument("--kv_heads", type=int, default=6, help="with --arch llama: key/value heads (default 6; "
                                                                  "fewer: grouped-query attention)")
    parser.add_argument("--same-process", action="store_true", help="both sides in this process")
    parser.add_argument("--lever", choices=sorted(LEVERS), help="lm alone, this lever on and off in one process")
    parser.add_argument("--side", choices=("lm", "transformers"), help=argparse.SUPPRESS)  # one side's process
    args = parser.parse_args()
    if args.lever is not None:
        return lever_in_one_process(args)
    if args.side is not None:
        return one_side(args)

    rates = {"lm": [], "transformers": []}
    if args.same_process:
        runs = setup(args)
        for step in runs.values():
            timed(step, args.warmup)
        tokens = args.batch_size * args.seq_len * args.steps
        for _ in range(args.rounds):
            for name, step in runs.items():
                rates[name].append(tokens / timed(step, args.steps))
    else:
        for _ in range(args.rounds):
            for name in rates:
                rates[name].append(in_own_process(args, name))
    for name, values in rates.items():
        print(f"{name:13s} {statistics.median(values):8.0f} tokens/s  (rounds: {[round(v) for v in values]})")
    ours_rate, peer_rate = statistics.median(rates["lm"]), statistics.median(rates["transformers"])
    where = "one process" if args.same_process else "processes of their own"
    llama = args.arch == "llama"
    grouped = f"_kv{args.kv_heads}" if llama and args.kv_heads != 6 else ""
    name = "cpu_train_6L6H384_B8T256" + ("_llama" if llama else "") + grouped
    report(name, "tokens/s", ours_rate, peer_rate,
           f"transformers {'LlamaForCausalLM' if llama else 'GPT2LMHeadModel'} ({where})", higher_is_better=True)


if __name__ == "__main__":
    main()
