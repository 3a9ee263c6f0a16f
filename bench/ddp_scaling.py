"""Multi-GPU scaling: lm's trainer on 1 GPU and on N GPUs (torchrun, DDP or FSDP), tokens/s.

Each run trains GPT-2 124M (preset "gpt2-124m", vocabulary padded to 50,304) with `lm.train`:
bf16 autocast, torch.compile, fused AdamW, T=1024, the same micro-batch per GPU, on random token
ids (throughput does not depend on what the tokens say). Tokens/s is measured over the steps after
`--warmup` (compilation and allocator warm-up excluded), from `TrainHistory.step_time`.

    python bench/ddp_scaling.py --nproc 2 --batch 16 --steps 30 --warmup 10 --parallel ddp fsdp

The peer is ideal linear scaling (N x the 1-GPU tokens/s); speedup is the scaling efficiency.
Writes the figures to --out (default lm/assets/ddp_scaling.json) and ends with one JSON line.
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


def worker(args) -> None:
    import torch

    import lm
    from lm import distributed

    parallel = args.parallel[0]
    torch.backends.cuda.matmul.allow_tf32 = True
    device = distributed.local_device("cuda")
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = lm.GPT(lm.preset("gpt2-124m", vocab_size=50304)).to(device)
    data = torch.randint(0, 50257, (20_000_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    steps = args.warmup + args.steps
    config = lm.TrainConfig(max_steps=steps, batch_size=args.batch, seq_len=1024, lr=6e-4, warmup_steps=10,
                            eval_interval=steps, eval_iters=1, precision="bf16", compile=True,
                            parallel=parallel, progress=False)
    history = lm.train(model, data, data[:100_000], config)
    info = distributed.env_info()
    if info.is_main:
        timed = history.step_time[args.warmup:]
        tokens = args.batch * 1024 * info.world_size * len(timed)
        result = {"nproc": info.world_size, "parallel": parallel, "batch_per_gpu": args.batch,
                  "tokens_per_second": tokens / sum(timed), "step_ms": 1000 * sum(timed) / len(timed),
                  "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                  "loss_first": history.loss[0], "loss_last": history.loss[-1]}
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown()


def launch(nproc: int, parallel: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--result", str(result), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--parallel", parallel]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0",
               "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        out = json.loads(result.read_text())
        out["wall_seconds"] = time.perf_counter() - start
        print(json.dumps(out), flush=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="GPUs for the scaled runs (default: 2)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per GPU (default: 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default: 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--parallel", nargs="+", default=["ddp"], choices=("ddp", "fsdp"),
                        help="strategies to run on --nproc GPUs (default: ddp)")
    parser.add_argument("--out", default=str(ROOT / "lm" / "assets" / "ddp_scaling.json"),
                        help="where to write the figures")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    from _report import report

    one = launch(1, "ddp", args)
    scaled = {p: launch(args.nproc, p, args) for p in args.parallel}
    figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": "gpt2-124m",
               "seq_len": 1024, "precision": "bf16", "compile": True, "single": one, "scaled": scaled,
               "efficiency": {p: r["tokens_per_second"] / (args.nproc * one["tokens_per_second"])
                              for p, r in scaled.items()},
               "command": "python bench/ddp_scaling.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    best = scaled[args.parallel[0]]
    report("ddp_scaling", "tokens/s", best["tokens_per_second"], args.nproc * one["tokens_per_second"],
           f"ideal linear scaling of 1 GPU x {args.nproc} ({args.parallel[0]})", higher_is_better=True)


if __name__ == "__main__":
    main()
