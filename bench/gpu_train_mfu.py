"""GPU training throughput and MFU: lm.GPT (preset "gpt2-124m") against transformers' GPT2LMHeadModel.

Both models are GPT-2 124M (12 layers, 12 heads of 64, d_model 768, T = 1024, GELU MLP, tied
embeddings, learned positions, no dropout) and train on the same work, one after the other in one
process, one micro-batch per optimizer step (no accumulation):

    lm    lm's own trainer, `lm.trainer.Trainer(..., TrainConfig(precision="bf16", compile=True))`,
          run with `fit` (the loop `lm.train` runs); times from `history.step_time`
    peer  transformers' GPT2LMHeadModel (attn_implementation="sdpa"), torch.compile'd, in a loop that
          does what `train_step` does: bf16 autocast, backward, clip at 1.0, step, one read of
          the loss and gradient norm

Same for both: the batches (`lm.data.Batches`, same seed, over random token ids: the speed of a step
does not depend on what the ids are), bf16 autocast over float32 weights, torch.compile in the same
mode, scaled_dot_product_attention (on an H100 with torch 2.11 it runs cuDNN's flash kernels), and
fused AdamW with the same parameter groups (`lm.optim.configure_optimizer`).

Vocabulary: both models use vocab_size=50304 (`--vocab`), GPT-2's 50,257 padded up to a multiple of
128 as nanoGPT does, so the output head's and the embedding's matrix products tile evenly on the
tensor cores. The ids stay below 50,257; the 47 extra rows are never targets.

MFU (model FLOPs utilisation), nanoGPT's / PaLM's estimate:

    FLOPs per token = 6 N + 12 L H Q T
    MFU             = tokens/s * FLOPs per token / 989e12      (H100 SXM dense bf16 peak)

N is the parameter count of GPT-2 124M with its real 50,257-token vocabulary, position embeddings
excluded (as nanoGPT's estimate_mfu does; the token embedding, tied to the head, is counted once):
123,653,376. 6N counts the forward and backward matrix products of the weights; 12 L H Q T those of
attention (QK^T and AV, forward and backward, as if not causal). L layers, H heads, Q head dim, T
sequence length. Padding rows are not counted as useful work.

Each run does `--warmup` untimed steps (the first compiles), then `--steps` timed ones; tokens/s is
the timed tokens over the timed wall time. `--batch` takes several sizes; the closing JSON line
compares lm and transformers at the batch size where lm is fastest, both at that same batch.

    python bench/gpu_train_mfu.py --batch 16 32 64                 # sweep the micro-batch
    python bench/gpu_train_mfu.py --batch 32 --peers --profile 3     # lm only, GPU time by kernel kind

Measured on one H200 (torch 2.11.0+cu130, transformers 5.17.0; same bf16 peak as the H100, 1.4x its
memory bandwidth), stored with settings and every run in lm/assets/gpu_train_mfu.json by

    python bench/gpu_train_mfu.py --batch 64 --steps 20 --warmup 3 --out lm/assets/gpu_train_mfu.json

    lm (Trainer.fit)               B=64   529,729 tokens/s  MFU 45.8%
    transformers GPT2LMHeadModel   B=64   436,707 tokens/s  MFU 37.8%    speedup 1.21

After the redesign of issue 11 (one model forward, the trainer/training split), lm alone
(--peers --steps 20 --warmup 3), in one session with the code before it: 46.3% after, 46.4% before.

How lm got there, B=64, each a run of this script: `train_step` reading loss and gradient norm
twice per step 42.9%; once per step (a non-finite step skipped on the device instead) 44.2%, and
43.8% at B=128; `fit`, which also queues step k+1 before reading step k, 45.8%. Not better:
FlashAttention-2 instead of cuDNN (--sdpa-backend flash) 41.1%; inductor's coordinate-descent
tuning 43.3%. On an H100 with two reads a step: lm 39.1%, transformers 33.7%. The profile at B=64
(131.5 ms a step, 123.5 ms of it GPU busy, with two reads): matrix products 65.9 ms, cuDNN
attention 17.6 ms, Triton's fused elementwise / LayerNorm / GELU / cross-entropy kernels 35.3 ms
(cross-entropy over the 50,304 logits 9.5 ms, GELU 9.2 ms), AdamW + clipping 1.5 ms. With `fit` a
step takes 123.7 ms: the GPU no longer waits for the host.

Levers (`--lever`, lm alone with `--peers`; each in a fresh process, 20 timed steps after 3), measured on
the H200 on 2026-12-04, MFU at batch 16 / 32, where the run-to-run spread is about a point:

    none (as shipped: the loss fused with the head in chunks of 1,280)   40.6% / 43.4%
    plain-loss (the (B, T, V) logits, then cross-entropy)                 42.1% / 43.3%
                                     (12.4 / 22.8 GB at the peak, where the fused loss needs 9.0 / 16.3)
    loss-chunks-2560 / loss-chunks-5120                                   40.5% / 40.6%, 41.7% / 43.1%
    gelu-tanh (GELU's tanh approximation)                                 40.8% / 42.5%
    --compile-mode reduce-overhead (forward and backward as CUDA graphs)  41.5% / 42.2%
    pointwise-autotune (inductor tunes its elementwise kernels; global)   40.6% / 39.9%

None moves MFU past the spread. The profile at batch 16 (`--profile 2`): 33.6 ms of GPU work in a
34.9 ms step, matrix products 16.6 ms (about 730 TFLOP/s, 74% of the peak), cuDNN attention 4.3 ms,
Triton's elementwise, LayerNorm, GELU and loss-chunk kernels 10.2 ms, AdamW and clipping 1.5 ms.
50% MFU means a 28.3 ms step: the elementwise work would have to move into the matrix products'
epilogues (GELU and bias into the first MLP product, the residual add into the second), and attention
would need a kernel near FlashAttention-3's speed; neither is in torch 2.11's kernels.

Also tried on 2026-12-05 (H200, batch 16; the same profile again: 33.2 ms busy in a 35.1 ms step,
matrix products 16.4, attention 4.2, Triton 10.1, AdamW 1.5): a Triton kernel per loss chunk that
reads the bfloat16 scores twice and writes their gradient over them (the whole loss, 16 x 1024 rows
of 50,304, products included: 9.50 ms against 9.14 for the compiled torch operations, 6.0 of either
being the three products), no gain at the shipped chunk size; at 2,560 rows a chunk the kernel took
7.98 ms (the compiled operations at that size were not timed alone, and gave no gain in a whole
step: the loss-chunks-2560 lever above), a lead of about 1 ms a step; `--compile-mode
max-autotune-no-cudagraphs` did not finish compiling within 6 minutes, a cost no reader would pay.

Later that day (two H200 machines, one after the other): the loss kernel inside `fit`'s compiled step
stopped the run with an illegal memory access (it passes its own tests, eager and compiled, and the
step runs with CUDA_LAUNCH_BLOCKING=1), so it is not in lm. A trace of `fit` at batch 16 (CPU and
CUDA, 12 steady steps) found the GPU idle before each step's first forward kernel and around the
batch copy, the clipping and the optimizer: the host spends 28.6 ms of a 36.7 ms step inside
`_start_step` launching ~980 kernels (median; 32.3 ms of 70.0 at batch 32), so at batch 16 the host
is close to being the limit, and a slower host CPU costs MFU directly. This script gave 42.2% MFU
(33.6 ms a step) at batch 16 on one machine; the same `fit` on another machine within the hour gave
36.7 ms a step (median; mean 35.4): compare levers only within one run.

On 2026-12-05, one H100 SXM (lm alone, each lever a fresh process on one machine, stored as `levers_h100`),
MFU at batch 16 / 32: none 37.9% and 38.1% (two runs) / 40.3%; `bf16-residual` (the residual stream kept in
bfloat16, as Megatron-LM and llm.c keep it: the LayerNorm, residual-sum and cast kernels read and write 2
bytes for each of its numbers instead of 4)
39.9% / 42.4%, the one lever past the spread, with 8.4 / 14.9 GB at the peak; `whole-step-graph` (the whole
step one CUDA graph, `train_lm_whole_step_graph`) 37.4% / 39.4%: the GPU, not the host, is the limit, since
`fit` already queues a step ahead; `cpp-wrapper` 38.3% (first step 105 s against 11); `combo-kernels` 38.3%.
lm keeps the residual stream in float32, as nanoGPT's autocast does: bfloat16 would round every layer's
addition to 8 significant bits, a change to what the model computes, not to how fast.

On 2026-12-06, another H100 SXM (stored as `levers_h100_2026_12_06`), two changes to the fused loss's pass that
adds each chunk's head gradient to the float32 sum, each patched into lm/losses.py for the run: cuBLAS adding
the product into the sum as it writes it (`torch.addmm(total, g.t(), h, out_dtype=torch.float32)`, wrapped in a
`torch.library.custom_op` because torch 2.11's compiler fails on out_dtype) 35.0% at batch 16 against 36.7% for
the shipped path on the same machine (35.5% / 37.3% beside the nanoGPT-style peer's 37.6% / 39.4%); four chunks'
gradients kept in bfloat16 for one product 35.0% with 17.3 GB at the peak. Both slower; neither kept.
Later that day, a third H100: `--lever gemm-autotune` (inductor's `max_autotune_gemm` alone: Triton's product
templates tried against cuBLAS, with the elementwise work after a product fused into its template, the one way
torch 2.11 offers to move GELU and the residual sums into the products) had not finished compiling after 370 s on
the machine's 16 cores, so it never timed a step; the shipped path gave 37.5% at batch 16 just before it.

Ends with one JSON line: {"bench", "unit": "MFU", "lm", "peer", "peer_name", "speedup"}; speedup > 1
means lm reaches the higher MFU (= the higher tokens/s, since the work per token is the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time

import torch

import lm
import lm.losses
import lm.trainer
from lm.data import Batches
from lm.optim import configure_optimizer
from lm.trainer import TrainConfig, Trainer
from _report import report

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (and H200: same chip)
PEER_NAME = "transformers GPT2LMHeadModel"
SEED = 1337  # of the batch stream: both models see the same windows


# ---- the work and its FLOPs ----------------------------------------------------------------------
def flops_per_token(config: lm.ModelConfig, T: int) -> tuple[int, int, int]:
    """(FLOPs per token, N, attention term) for `config` at sequence length T; N without position
    embeddings and with GPT-2's real vocabulary (padding rows are not useful work)."""
    real = lm.preset("gpt2-124m", n_layer=config.n_layer, n_head=config.n_head, d_model=config.d_model,
                     block_size=config.block_size)
    N = lm.count_params(real) - real.block_size * real.d_model
    L, H, Q = config.n_layer, config.n_head, config.head_dim
    attention = 12 * L * H * Q * T
    return 6 * N + attention, N, attention


def peer_training(model, loss_of, data, batch: int, T: int, steps: int, warmup: int, profile: int = 0) -> dict:
    """The peer's loop, step for step what `lm.trainer.Trainer.train_step` does: the same batches
    (`lm.data.Batches`, same seed), bf16 autocast, backward, clipping at 1.0, fused AdamW
    (`configure_optimizer`), then one read of the loss and the gradient norm. (lm's `fit` also
    queues the next step before that read, which this plain loop does not.) Returns the wall
    seconds of each step."""
    model.train()
    optimizer = configure_optimizer(model, lr=6e-4, weight_decay=0.1)
    batches = Batches(data, batch, T, seed=SEED)

    def step():
        (x, y), = batches.next_step("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.stack([loss.detach().float(), grad_norm]).tolist()  # one wait per step, as lm's

    torch.cuda.reset_peak_memory_stats()
    step_time = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        step_time.append(time.perf_counter() - t0)
    if profile:
        print_profile(step, profile)
    return {"step_time": step_time, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def print_profile(step, n: int) -> None:
    """GPU kernel time per step, by kind of kernel and for the largest kernels (for finding speedups)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    us = {e.key: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in kernels}
    # attention first: cuDNN's attention kernels also have "sm90_" in their names
    kinds = {"attention": ("flash", "fmha", "sdpa", "cudnn", "attn"), "matmul": ("gemm", "nvjet", "xmma", "cutlass", "sm90_"),
             "optimizer": ("adam", "multi_tensor", "foreach"), "triton (fused elementwise, norms, loss)": ("triton",)}
    totals = dict.fromkeys([*kinds, "other"], 0.0)
    for name, t in us.items():
        kind = next((k for k, keys in kinds.items() if any(key in name.lower() for key in keys)), "other")
        totals[kind] += t
    busy = sum(us.values()) / n / 1e3
    print(f"  profile over {n} steps: wall {1e3 * wall:.1f} ms/step, GPU busy {busy:.1f} ms/step")
    for kind, t in totals.items():
        print(f"    {kind:42s} {t / n / 1e3:7.2f} ms/step")
    for name, t in sorted(us.items(), key=lambda kv: -kv[1])[:25]:
        print(f"    {t / n / 1e3:7.2f} ms  {name[:110]}")


# ---- the two models ------------------------------------------------------------------------------
def train_lm(config: lm.ModelConfig, data, batch: int, steps: int, warmup: int, compile_mode: str,
             profile: int = 0) -> dict:
    """lm's side: lm's own trainer, `lm.trainer.Trainer` with precision="bf16" and compile=True.

    It runs `Trainer.fit` (the loop `lm.train` runs, which starts each step before reading the
    last one's loss) for warmup + steps steps and reads the times from `history.step_time`. Its
    one evaluation, after the last step, is not timed (it recompiles the model for eval mode);
    no checkpoints are written."""
    model = lm.GPT(config).cuda()
    n = warmup + steps
    train_config = TrainConfig(max_steps=n, batch_size=batch, lr=6e-4, warmup_steps=0, weight_decay=0.1,
                               grad_clip=1.0, precision="bf16", compile=compile_mode == "default",
                               eval_interval=n, eval_iters=1, seed=SEED, progress=False)
    trainer = Trainer(model, data, data, train_config)
    if compile_mode not in ("default", "none"):  # the trainer compiles in the default mode only
        trainer.wrapped = torch.compile(trainer.wrapped, mode=compile_mode)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    if profile:
        trainer.wrapped.train()
        print_profile(trainer.train_step, profile)
    return {"step_time": list(trainer.history.step_time[:n]), "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def train_lm_whole_step_graph(config: lm.ModelConfig, data, batch: int, steps: int, warmup: int,
                              compile_mode: str, profile: int = 0) -> dict:
    """lm's step as one CUDA graph (`--lever whole-step-graph`): what `Trainer._start_step` queues (the
    compiled forward with the fused loss, backward, the gradient norm, clipping folded into the fused
    AdamW, a non-finite step skipped on the device) captured once and replayed, so the host launches one
    graph a step instead of ~980 kernels. The batch is copied into the graph's input tensors first;
    the loss and norm of step k are read after step k+1 is queued, as `fit` does. The learning rate
    stays at 6e-4 (a graph keeps the number it was captured with; a schedule would need it in a tensor):
    the work per step is the same. A measure of what such a trainer would win, not `Trainer.fit`."""
    model = lm.GPT(config).cuda().train()
    forward = compiled(model, compile_mode)
    optimizer = configure_optimizer(model, lr=6e-4, weight_decay=0.1)
    for group in optimizer.param_groups:
        group["capturable"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    batches = Batches(data, batch, config.block_size, seed=SEED)
    x_in = torch.zeros((batch, config.block_size), dtype=torch.long, device="cuda")
    y_in = torch.zeros_like(x_in)

    def next_batch():
        (x, y), = batches.next_step("cuda")
        x_in.copy_(x)
        y_in.copy_(y)

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(x_in, y_in, return_logits=False)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.grad_scale = torch.clamp(norm + 1e-6, min=1.0)  # clip at 1.0 as the fused kernel reads
        optimizer.found_inf = (~torch.isfinite(loss.detach() + norm)).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
        return loss.detach(), norm

    torch.cuda.reset_peak_memory_stats()
    step_time = []
    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, and make the optimizer's state, outside the capture
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            next_batch()
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_out, norm_out = body()
    torch.cuda.synchronize()
    step_time.append(time.perf_counter() - t0)  # the first "step": compile, three steps, the capture
    pending = []

    def step():
        next_batch()
        graph.replay()
        pending.append(torch.stack([loss_out.float(), norm_out.float()]))
        if len(pending) > 1:
            pending.pop(0).tolist()  # wait for the step before, as fit does

    for _ in range(warmup + steps - 1):
        t0 = time.perf_counter()
        step()
        step_time.append(time.perf_counter() - t0)
    loss, norm = pending.pop().tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise RuntimeError(f"the graphed steps gave loss {loss}, gradient norm {norm}")
    if profile:
        print_profile(step, profile)
    return {"step_time": step_time, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def train_peer(config: lm.ModelConfig, data, batch: int, steps: int, warmup: int, compile_mode: str,
               profile: int = 0) -> dict:
    """transformers' side: GPT2LMHeadModel of the same config, sdpa attention, same optimizer."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.d_model,
                           n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu",  # exact GELU, as lm
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                           bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").cuda()
    # Name the loss: otherwise transformers logs a warning inside forward, a torch.compile graph break.
    model.loss_type = "ForCausalLM"
    forward = compiled(model, compile_mode)
    # labels = inputs: transformers shifts them inside (T - 1 targets per row, lm has T: same work)
    return peer_training(model, lambda x, y: forward(input_ids=x, labels=x).loss, data, batch,
                         config.block_size, steps, warmup, profile)


def compiled(model, compile_mode: str):
    """`model` through torch.compile in `compile_mode` ("none": as it is), as both peers run."""
    if compile_mode == "none":
        return model
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode)


def train_nanogpt_style(config: lm.ModelConfig, data, batch: int, steps: int, warmup: int, compile_mode: str,
                       profile: int = 0) -> dict:
    """A GPT-2 written as nanoGPT writes it (bench/_nanogpt_style.py), in the same loop."""
    from _nanogpt_style import NanoStyleGPT

    model = NanoStyleGPT(config.vocab_size, config.block_size, config.n_layer, config.n_head, config.d_model).cuda()
    forward = compiled(model, compile_mode)
    return peer_training(model, forward, data, batch, config.block_size, steps, warmup, profile)


def _plain_loss() -> dict:
    lm.trainer.loss_only = lambda model: {}  # the trainer then asks for logits and loss, as model(x, y) gives
    return {}


def _loss_chunks(numbers: int):
    def apply() -> dict:
        lm.losses.CHUNK_NUMBERS = numbers
        return {}
    return apply


def _inductor(**settings):
    def apply() -> dict:
        import torch._inductor.config

        for name, value in settings.items():
            setattr(torch._inductor.config, name, value)
        return {}
    return apply


def _bf16_residual() -> dict:
    embed = lm.GPT.embed

    def in_bf16(self, idx, offset=0):  # under autocast the blocks then add bfloat16 to bfloat16
        x = embed(self, idx, offset)
        return x.to(torch.bfloat16) if torch.is_autocast_enabled(x.device.type) else x
    lm.GPT.embed = in_bf16
    return {}


def _clip_apart() -> dict:
    lm.trainer.Trainer._fold_clipping = False
    return {}


# --lever: one change to lm's run, applied before its model is built (returns ModelConfig changes);
# measured values are in lm/assets/gpu_train_mfu.json under "levers". CUDA graphs: --compile-mode reduce-overhead.
LEVERS = {
    "none": dict,
    "plain-loss": _plain_loss,                   # the (B, T, V) logits, then cross-entropy
    "loss-chunks-2560": _loss_chunks(2 ** 27),   # 2**27 logits per chunk of the fused loss
    "loss-chunks-5120": _loss_chunks(2 ** 28),
    "gelu-tanh": lambda: {"ffn": "gelu_tanh"},   # GELU's tanh approximation
    "pointwise-autotune": _inductor(max_autotune_pointwise=True),  # inductor tunes its elementwise kernels' launches
    "clip-apart": _clip_apart,                   # clip_grad_norm_'s own pass, not folded into the fused AdamW
    "cpp-wrapper": _inductor(cpp_wrapper=True),  # inductor launches its kernels from C++, not Python
    "combo-kernels": _inductor(combo_kernels=True),  # inductor joins independent small kernels into one launch
    "gemm-autotune": _inductor(max_autotune_gemm=True),  # Triton product templates tried, elementwise work fused in
    "bf16-residual": _bf16_residual,             # the residual stream in bfloat16 (float32 under plain autocast)
    "whole-step-graph": dict,                    # the whole step as one CUDA graph (train_lm_whole_step_graph)
}


PEERS = {"nanogpt": ("nanoGPT-style GPT-2", train_nanogpt_style), "transformers": (PEER_NAME, train_peer)}


def summarise(name: str, run: dict, batch: int, T: int, warmup: int, flops: int) -> dict:
    timed = run["step_time"][warmup:]
    tokens_per_s = batch * T * len(timed) / sum(timed)
    return {"model": name, "batch": batch, "tokens_per_s": round(tokens_per_s), "mfu": tokens_per_s * flops / PEAK_FLOPS,
            "step_ms": 1e3 * sum(timed) / len(timed), "first_step_s": run["step_time"][0], "peak_gb": run["peak_gb"]}


def free_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="micro-batch sizes (default: 32)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compile included (default: 5)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, max-autotune-no-cudagraphs, max-autotune, or none")
    parser.add_argument("--vocab", type=int, default=50304, help="vocab_size of both models (default: 50304)")
    parser.add_argument("--peers", nargs="*", default=["nanogpt", "transformers"], choices=sorted(PEERS),
                        help="peers to train too (default: nanogpt transformers; none: lm alone)")
    parser.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient"],
                        help="restrict scaled_dot_product_attention to one kernel, for both models (default: auto)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many more steps of each run and print kernel times")
    parser.add_argument("--lever", default="none", choices=sorted(LEVERS),
                        help="change one thing in lm's run, to measure what it is worth (default: none)")
    parser.add_argument("--out", default=None, help="write device, settings and every run as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (bf16 autocast, flash attention, fused AdamW).")

    torch.backends.cuda.matmul.allow_tf32 = True  # for any float32 matmul left outside autocast
    torch.backends.cudnn.allow_tf32 = True
    config = lm.preset("gpt2-124m", vocab_size=args.vocab)
    T = config.block_size
    flops, N, attention = flops_per_token(config, T)
    config = dataclasses.replace(config, **LEVERS[args.lever]())
    data = torch.randint(0, 50257, (1 << 22,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)

    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}, torch {torch.__version__}, compile mode {args.compile_mode}, "
          f"vocab_size {args.vocab} (both models), T {T}, bf16 autocast")
    print(f"FLOPs per token = 6N + 12*L*H*Q*T = 6*{N:,} + 12*{config.n_layer}*{config.n_head}*{config.head_dim}*{T}"
          f" = {6 * N:,} + {attention:,} = {flops:,}")
    print("  N = parameters of GPT-2 124M (vocabulary 50,257), position embeddings excluded, tied head counted once")
    print(f"MFU = tokens/s * {flops:,} / {PEAK_FLOPS:.3g} (H100 SXM dense bf16 peak)")

    if args.sdpa_backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa_backend]
        sdpa_kernel([backend]).__enter__()  # for the whole process: both models, forward and backward
    lm_side = train_lm_whole_step_graph if args.lever == "whole-step-graph" else train_lm
    sides = [("lm", lm_side)] + [PEERS[name] for name in args.peers]
    results = []
    record = {"bench": "gpu_train_mfu", "device_name": device_name, "torch": torch.__version__,
              "compile_mode": args.compile_mode, "lever": args.lever, "sdpa_backend": args.sdpa_backend, "vocab_size": args.vocab, "seq_len": T, "precision": "bf16 autocast",
              "steps": args.steps, "warmup": args.warmup, "flops_per_token": flops, "n_params_mfu": N,
              "peak_flops": PEAK_FLOPS, "runs": results}
    if "transformers" in args.peers:
        import transformers

        record["transformers"] = transformers.__version__
    for batch in args.batch:
        for name, train_side in sides:
            try:
                run = train_side(config, data, batch, args.steps, args.warmup, args.compile_mode, args.profile)
                row = summarise(name, run, batch, T, args.warmup, flops)
            except torch.cuda.OutOfMemoryError:
                row = {"model": name, "batch": batch, "error": "out of memory"}
            free_memory()
            results.append(row)
            if "error" in row:
                print(f"{name:30s} B={batch:3d}  out of memory", flush=True)
            else:
                print(f"{name:30s} B={batch:3d}  {row['tokens_per_s']:9,d} tokens/s  MFU {row['mfu']:6.1%}  "
                      f"{row['step_ms']:7.1f} ms/step  first step {row['first_step_s']:5.1f} s  "
                      f"peak {row['peak_gb']:5.1f} GB", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(record, f, indent=1)

    ok = {(r["model"], r["batch"]): r for r in results if "error" not in r}
    peer_names = [PEERS[name][0] for name in args.peers]
    comparable = [r for (name, batch), r in ok.items() if name == "lm" and all((p, batch) in ok for p in peer_names)]
    if not comparable:
        raise SystemExit("no batch size ran for both models; try smaller --batch values.")
    best = max(comparable, key=lambda r: r["tokens_per_s"])
    print(f"lm at B={best['batch']}: {best['tokens_per_s']:,} tokens/s, MFU {best['mfu']:.1%}")
    if not peer_names:
        return
    for name in peer_names:
        peer = ok[(name, best["batch"])]
        print(f"{name} at B={peer['batch']}: {peer['tokens_per_s']:,} tokens/s, MFU {peer['mfu']:.1%}")
    strongest = max((ok[(name, best["batch"])] for name in peer_names), key=lambda r: r["mfu"])
    record["compared_at_batch"] = best["batch"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    report("gpu_train_mfu", "MFU", best["mfu"], strongest["mfu"], strongest["model"], higher_is_better=True)


if __name__ == "__main__":
    main()
