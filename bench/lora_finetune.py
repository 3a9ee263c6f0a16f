"""CPU LoRA fine-tuning, tokens/s and peak memory: lm's LoRA (`lm.apply_lora` + its trainer) against
peft's LoRA on transformers' GPT2LMHeadModel.

Both models have GPT-2's architecture at a small size (6 layers, 6 heads, d_model 384, GELU MLP, tied
embeddings, learned positions) and the same weights: lm's are copied into transformers' model, and
the adapters' A matrices too (B starts at zero in both), so the first step's losses agree and both do
the same arithmetic. The vocabulary is 256 tokens by default (byte-level), so that the step's time is
the transformer blocks', where the adapters are; `--vocab 50257` (GPT-2's) adds a large frozen head
whose matrix products, the same in both, then take most of the step. LoRA: rank 8, alpha 16, no
dropout, on the attention's fused qkv projection and both output projections (lm targets ("qkv",
"proj"), peft target_modules ["c_attn", "c_proj"]: GPT-2's c_proj names both the attention's and the
MLP's output projection, and lm's "proj" does too). Every other weight is frozen.

A step: batch 8 x 256 tokens of random ids (speed does not depend on the text), next-token loss over
all 256 positions, backward, gradient clipping at 1.0, AdamW (`lm.optim.configure_optimizer`: the
fused kernel, trainable parameters only, so the adapters alone) for both. lm's side is one
`lm.trainer.Trainer.train_step()`, the trainer users run. Each side does `--warmup` untimed steps (the
first gives the loss check), then `--steps` timed steps, one of each side in turn, so that a busy
spell on a shared machine slows both alike; the median step counts (the fastest is printed too).

Peak memory: each side runs again alone in a fresh subprocess (`--memory lm|peft`) that imports the
same libraries (torch, transformers, peft, lm), builds only its own model and runs two steps (the
first allocates the optimizer's state). It reports the process's peak resident set size (VmHWM in
/proc/self/status: what the kernel saw the process hold at its highest, every allocator included)
and how far the peak rose above the resident size just before the first step, which is what
training adds (activations kept for backward, gradients, optimizer state) to the libraries and the
weights. tracemalloc is not used (it sees Python's allocations, not torch's), nor getrusage's
ru_maxrss (a subprocess inherits its parent's peak there).

    .venv/bin/python bench/lora_finetune.py [--threads 2] [--steps 8] [--vocab 256]

Ends with one JSON line: {"bench", "unit": "tokens/s", "lm", "peer", "peer_name", "speedup"};
speedup > 1 means lm trains faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lm
import lm.data
import lm.optim
import lm.trainer
from lm.lora import LoRAConfig, apply_lora, lora_layers
from _report import report

RANK, ALPHA = 8, 16.0
MEMORY_STEPS = 2  # the first allocates the optimizer's state, the second runs as every later step does


def build_lm(vocab: int, seq_len: int) -> lm.GPT:
    model = lm.GPT(lm.ModelConfig(vocab_size=vocab, block_size=seq_len, n_layer=6, n_head=6, d_model=384,
                                  dropout=0.0))
    apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=("qkv", "proj")))
    return model


def build_peft(vocab: int, seq_len: int, ours: lm.GPT | None = None):
    """peft's LoRA on transformers' GPT-2 of the same shape; with `ours`, holding the same weights."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=384, n_layer=6, n_head=6,
                                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    if ours is not None:
        copy_weights(ours, hf)
    peer = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_proj"]))
    if ours is not None:  # the same starting adapters (B is zero in both)
        with torch.no_grad():
            for h, block in zip(peer.base_model.model.transformer.h, ours.blocks):
                for conv, layer in [(h.attn.c_attn, block.attn.qkv), (h.attn.c_proj, block.attn.proj),
                                    (h.mlp.c_proj, block.mlp.proj)]:
                    conv.lora_A["default"].weight.copy_(layer.lora_A)
                    conv.lora_B["default"].weight.copy_(layer.lora_B)
    return peer


@torch.no_grad()
def copy_weights(ours: lm.GPT, hf) -> None:
    """lm's GPT-2 weights into transformers' (whose Conv1D layers store weights as [in, out])."""
    t = hf.transformer
    t.wte.weight.copy_(ours.tok_emb.weight)
    t.wpe.weight.copy_(ours.pos_emb.weight)
    for h, block in zip(t.h, ours.blocks):
        for hf_norm, our_norm in [(h.ln_1, block.norm1), (h.ln_2, block.norm2)]:
            hf_norm.weight.copy_(our_norm.weight)
            hf_norm.bias.copy_(our_norm.bias)
        for conv, linear in [(h.attn.c_attn, block.attn.qkv.base), (h.attn.c_proj, block.attn.proj.base),
                             (h.mlp.c_fc, block.mlp.fc), (h.mlp.c_proj, block.mlp.proj.base)]:
            conv.weight.copy_(linear.weight.T)
            conv.bias.copy_(linear.bias)
    t.ln_f.weight.copy_(ours.norm_f.weight)
    t.ln_f.bias.copy_(ours.norm_f.bias)


def make_steps(args, sides=("lm", "peft")):
    """{side: one training step, returning its loss} and {side: model}. With both sides, peft's model
    gets lm's weights and starting adapters; alone (memory runs) each builds only its own model."""
    torch.manual_seed(0)
    data = torch.randint(0, args.vocab, (200_000,))
    steps, models = {}, {}
    if "lm" in sides:
        ours = models["lm"] = build_lm(args.vocab, args.seq_len)
        trainer = lm.trainer.Trainer(ours, data, data, lm.TrainConfig(
            max_steps=10**9, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, warmup_steps=0, seed=0,
            progress=False))
        steps["lm"] = lambda: float(trainer.train_step()["loss"])
        ours.train()
    if "peft" in sides:
        peer = models["peft"] = build_peft(args.vocab, args.seq_len, models.get("lm")).train()
        batches = lm.data.Batches(data, args.batch_size, args.seq_len, seed=0)
        optimizer = lm.optim.configure_optimizer(peer, 1e-3, 0.1)

        def step_peft():
            (x, y), = batches.next_step()
            # shift_labels: the targets as they are, so the loss covers the same 256 positions as lm's
            loss = peer(input_ids=x, labels=y, shift_labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        steps["peft"] = step_peft
    return steps, models


def rss_mb(field: str = "VmRSS") -> float:
    """The process's resident set size now ("VmRSS") or at its highest so far ("VmHWM"), from
    /proc/self/status (Linux). Not getrusage's ru_maxrss: that keeps the parent's peak across fork and
    exec, so a subprocess of a large parent would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(side: str, args) -> None:
    """Run one side alone and print its memory as one JSON line (run in a subprocess)."""
    import peft  # noqa: F401  (both sides import the same libraries, so their baselines match)
    import transformers  # noqa: F401

    steps, _ = make_steps(args, sides=(side,))
    before = rss_mb()
    for _ in range(MEMORY_STEPS):
        steps[side]()
    peak = rss_mb("VmHWM")
    print(json.dumps({"side": side, "rss_before_mb": round(before), "peak_mb": round(peak),
                      "rise_mb": round(peak - before)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each side (default: 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default: 256; GPT-2's is 50257)")
    parser.add_argument("--memory", choices=("lm", "peft"), help=argparse.SUPPRESS)  # the subprocess's job
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        return measure_memory(args.memory, args)

    steps, models = make_steps(args)
    first = {name: step() for name, step in steps.items()}
    print(f"first-step loss: lm {first['lm']:.5f}, peft {first['peft']:.5f} (same weights, same batch)")
    assert abs(first["lm"] - first["peft"]) < 1e-3, "the two sides do not compute the same thing"
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    print(f"trainable parameters: lm {trainable['lm']:,}, peft {trainable['peft']:,} "
          f"({len(lora_layers(models['lm']))} adapted layers)")
    for step in steps.values():
        for _ in range(args.warmup - 1):
            step()

    times = {name: [] for name in steps}
    for _ in range(args.steps):  # one step each in turn: a busy spell on the machine slows both alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:5s} {rates[name]:8.0f} tokens/s  (median step {statistics.median(values):.3f} s, "
              f"fastest {min(values):.3f} s, steps: {[round(v, 2) for v in values]})")

    if not args.no_memory:
        for side in ("lm", "peft"):
            command = [sys.executable, __file__, "--memory", side, *sys.argv[1:]]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory = json.loads(out)
            print(f"{side:5s} peak RSS {memory['peak_mb']:6d} MB, {memory['rise_mb']:5d} MB above the "
                  f"{memory['rss_before_mb']} MB before its first step")

    ours, peer = rates["lm"], rates["peft"]
    import peft

    report(f"cpu_lora_finetune_6L6H384_V{args.vocab}_B{args.batch_size}T{args.seq_len}", "tokens/s", ours, peer,
           f"peft {peft.__version__} LoRA on transformers GPT2LMHeadModel", higher_is_better=True)


if __name__ == "__main__":
    main()
