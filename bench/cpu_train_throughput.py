"""CPU training throughput, tokens/s: lm.GPT against Hugging Face transformers' GPT2LMHeadModel.

Both models have the same architecture (6 layers, 6 heads, d_model 384, GELU MLP, tied embeddings,
learned positions), the same batches (B=8, T=256, character vocabulary, random windows of pydoc
text), the same loss, gradient clipping and fused AdamW, and both run in one process with the same
thread count. lm's side is one `lm.trainer.Trainer.train_step()`: the trainer users run, with its
bookkeeping, not a hand-written loop; its causal attention runs in lm's C kernel (lm/csrc/causal.c)
where that can be built (`LM_CPU_KERNELS=0` gives SDPA's flash kernel, as transformers uses). Each does `--warmup` untimed
steps, then `--steps` timed ones; the two alternate in rounds so drifts in machine load hit both.

    .venv/bin/python bench/cpu_train_throughput.py [--steps 10] [--threads 2]

Ends with one JSON line: {"bench", "unit", "lm", "peer", "peer_name", "speedup"}; speedup > 1
means lm trains faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lm
import lm.data
import lm.optim
import lm.trainer
from _report import report


def build_models(vocab_size: int, block_size: int):
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
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = lm.load_corpus("pydoc")
    tok = lm.CharTokenizer.train(text)
    data = torch.tensor(tok.encode(text, parse_special=False))
    ours, peer = build_models(tok.vocab_size, args.seq_len)
    # lm: one optimizer step of its trainer (batch, forward, backward, clip, fused AdamW, bookkeeping)
    trainer = lm.trainer.Trainer(ours, data, data, lm.TrainConfig(
        max_steps=10**9, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=0, progress=False,
        compile=args.compile, precision=args.precision))
    peer_batches = lm.data.Batches(data, args.batch_size, args.seq_len, seed=0)
    peer_opt = lm.optim.configure_optimizer(peer, 3e-4, 0.1)
    runs = {"lm": trainer.train_step, "transformers": lambda: step_hf(peer, peer_opt, peer_batches, args.precision)}
    ours.train()
    peer.train()
    for step in runs.values():
        timed(step, args.warmup)

    tokens = args.batch_size * args.seq_len * args.steps
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            rates[name].append(tokens / timed(step, args.steps))
    for name, values in rates.items():
        print(f"{name:13s} {statistics.median(values):8.0f} tokens/s  (rounds: {[round(v) for v in values]})")
    ours_rate, peer_rate = statistics.median(rates["lm"]), statistics.median(rates["transformers"])
    report("cpu_train_6L6H384_B8T256", "tokens/s", ours_rate, peer_rate, "transformers GPT2LMHeadModel",
           higher_is_better=True)


if __name__ == "__main__":
    main()
