"""Multi-GPU scaling: lm's trainer on 1 GPU and on N GPUs (torchrun, DDP or FSDP), tokens/s and MFU.

Each run trains with `lm.train`: bf16 autocast, torch.compile, fused AdamW, T=1024, the same
micro-batch per GPU, on random token ids (throughput does not depend on what the tokens say).
Tokens/s is measured over the steps after `--warmup` (compilation and allocator warm-up excluded),
from `TrainHistory.step_time`; MFU = tokens/s per GPU x FLOPs per token / 989e12 (H100/H200 dense
bf16), FLOPs per token = 6 N + 12 L H Q T (N without position tables and vocabulary padding).

    python bench/ddp_scaling.py --nproc 2 4 8 --batch 16 --steps 30 --warmup 10 --parallel ddp fsdp
    python bench/ddp_scaling.py --model 13b --nproc 8 --batch 2 --parallel fsdp --fsdp_units block
    python bench/ddp_scaling.py --nproc 1 --parallel fsdp --fsdp_units model block   # FSDP's own cost, 1 GPU

`--fsdp_units` (`TrainConfig.fsdp_units`, see `lm.distributed.wrap`): what FSDP gathers at a time, the whole
model or each block; each value is a run of its own, labelled fsdp-model, fsdp-block ("auto": fsdp). With
`--nproc 1`, FSDP runs in one process (lm itself trains one process without it): no communication, so the
run measures what FSDP's hooks, casts and sharded optimizer cost against the plain 1-GPU run.

--model gpt2-124m (default): preset "gpt2-124m", vocabulary padded to 50,304.
--model 13b: the RSCaLM recipe (RoPE, RMSNorm, SwiGLU, no biases, tied head, vocabulary 32,000) at
LLaMA-2-13B's widths: 40 layers, d_model 5120, 40 heads, d_ff 13,824; 12.9B parameters, with
gradient checkpointing. Its float32 weights, gradients and AdamW state alone are 206 GB, more than
one H200's 141 GB: the 1-GPU run records that it does not fit (the out-of-memory error and the
memory it reached) and FSDP on N GPUs holds 1/N of them per GPU.

The peer is ideal linear scaling (N x the 1-GPU tokens/s) of the largest N; speedup is the scaling
efficiency. Writes every run to --out (default lm/assets/ddp_scaling.json; "single", "scaled" and
"efficiency" keep the largest N, as chapter 6 reads them) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12  # H100 / H200 dense bf16
GPT2_VOCAB = 50257


def model_config(name: str):
    """The model of --model (see the module's docstring)."""
    import lm

    if name == "gpt2-124m":
        return lm.preset("gpt2-124m", vocab_size=50304)
    if name == "13b":
        return lm.preset("rscalm-700m", n_layer=40, d_model=5120, n_head=40, d_ff=13824,
                         gradient_checkpointing=True)
    raise ValueError(f"--model {name!r}: gpt2-124m or 13b")


def flops_per_token(config, T: int = 1024) -> int:
    """6 N + 12 L H Q T, N without learned position tables and without vocabulary padding rows."""
    import lm

    real = lm.ModelConfig.from_dict({**config.to_dict(), "vocab_size": min(config.vocab_size, GPT2_VOCAB)}) \
        if config.vocab_size == 50304 else config
    N = lm.count_params(real) - (real.block_size * real.d_model if real.pos == "learned" else 0)
    return 6 * N + 12 * config.n_layer * config.n_head * config.head_dim * T


def worker(args) -> None:
    import torch

    import lm
    from lm import distributed

    parallel = args.parallel[0]
    if parallel == "fsdp" and distributed.env_info().world_size == 1:  # --nproc 1: FSDP's cost alone
        distributed.DistInfo.enabled = property(lambda self: True)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = distributed.local_device("cuda")
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    config = model_config(args.model)
    info = distributed.env_info()
    label = parallel if parallel == "ddp" or args.fsdp_units[0] == "auto" else f"fsdp-{args.fsdp_units[0]}"
    result = {"nproc": info.world_size, "parallel": label, "batch_per_gpu": args.batch, "model": args.model,
              "params": lm.count_params(config)}
    try:
        with torch.device(device):  # built and initialised on the GPU: 13B float32 weights are 51 GB to
            model = lm.GPT(config)  # fill, minutes on a CPU; FSDP then keeps 1/N of them per GPU
        data = torch.randint(0, min(config.vocab_size, GPT2_VOCAB), (20_000_000,),
                             generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        steps = args.warmup + args.steps
        train = lm.TrainConfig(max_steps=steps, batch_size=args.batch, seq_len=1024, lr=6e-4, warmup_steps=10,
                               eval_interval=steps, eval_iters=1, precision="bf16", compile=True,
                               parallel=parallel, fsdp_units=args.fsdp_units[0], progress=False)
        history = lm.train(model, data, data[:100_000], train)
    except torch.OutOfMemoryError as err:  # the model does not fit this way: record it and how far it got
        result.update(fits=False, error=str(err).splitlines()[0],
                      peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    else:
        timed = history.step_time[args.warmup:]
        tokens = args.batch * 1024 * info.world_size * len(timed)
        per_second = tokens / sum(timed)
        result.update(fits=True, tokens_per_second=per_second, step_ms=1000 * sum(timed) / len(timed),
                      mfu=per_second / info.world_size * flops_per_token(config) / PEAK_FLOPS,
                      peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                      loss_first=history.loss[0], loss_last=history.loss[-1])
    if info.is_main:
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown()


def launch(nproc: int, parallel: str, args, units: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--result", str(result), "--batch", str(args.batch), "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--parallel", parallel,
               "--fsdp_units", units]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0",
               "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
        out = json.loads(result.read_text())
        out["wall_seconds"] = time.perf_counter() - start
        print(json.dumps(out), flush=True)
        return out


def main() -> None:
    from lm.distributed import FSDP_UNITS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="GPUs for the scaled runs (default: 2)")
    parser.add_argument("--model", default="gpt2-124m", choices=("gpt2-124m", "13b"), help="see above")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per GPU (default: 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default: 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--parallel", nargs="+", default=["ddp"], choices=("ddp", "fsdp"),
                        help="strategies for the scaled runs (default: ddp)")
    parser.add_argument("--fsdp_units", nargs="+", default=["auto"], choices=FSDP_UNITS,
                        help="FSDP's units, a run each (default: auto)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run (default: 1800)")
    parser.add_argument("--out", default=str(ROOT / "lm" / "assets" / "ddp_scaling.json"),
                        help="where the figures go (default: lm/assets/ddp_scaling.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    from _report import report

    one = launch(1, "ddp", args)
    runs = [one] + [launch(n, p, args, u) for n in args.nproc for p in args.parallel
                    for u in (args.fsdp_units if p == "fsdp" else ["auto"])]
    for run in runs[1:]:
        if run.get("fits") and one.get("fits"):
            run["efficiency"] = run["tokens_per_second"] / (run["nproc"] * one["tokens_per_second"])
    top = max(args.nproc)
    scaled = {r["parallel"]: r for r in runs[1:] if r["nproc"] == top}
    figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
               "seq_len": 1024, "precision": "bf16", "compile": True, "single": one, "scaled": scaled,
               "efficiency": {p: r["efficiency"] for p, r in scaled.items() if "efficiency" in r},
               "runs": runs, "command": "python bench/ddp_scaling.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    for run in runs:
        shown = (f"{run['tokens_per_second']:,.0f} tokens/s, MFU {run['mfu']:.1%}"
                 + (f", efficiency {run['efficiency']:.1%}" if "efficiency" in run else "")) if run.get("fits") \
            else f"does not fit ({run['error'][:80]})"
        print(f"{run['nproc']} GPU(s) {run['parallel']:4}: {shown}; peak {run['peak_memory_gib']:.1f} GiB per GPU")
    best = next(r for r in runs[1:] if r["nproc"] == top)
    if best.get("fits") and one.get("fits"):
        report("ddp_scaling", "tokens/s", best["tokens_per_second"], top * one["tokens_per_second"],
               f"ideal linear scaling of 1 GPU x {top} ({best['parallel']})", higher_is_better=True)
    else:  # a model one GPU cannot hold: the scaled run's own figure, and no ratio
        print(json.dumps({"bench": f"ddp_scaling_{args.model}", "unit": "tokens/s",
                          "lm": best.get("tokens_per_second"), "peer": None,
                          "peer_name": "1 GPU (does not fit)", "speedup": None}))


if __name__ == "__main__":
    main()
