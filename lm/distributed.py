"""Several processes, one model: what `torchrun` sets up, and the few collectives training needs.

    torchrun --nproc_per_node=2 -m lm train --data_dir data/shakespeare --out_dir runs/ddp

`torchrun` starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE in each. `lm` reads
them: process `rank` takes its share of every batch, gradients are averaged across processes after
each backward pass (DistributedDataParallel), and only rank 0 writes checkpoints and prints.
GPUs talk through NCCL; CPUs through gloo, which is how the tests run two processes on one machine.
FSDP (fully sharded data parallel) shards the parameters, gradients and optimizer state across
processes as well, for models that do not fit on one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world size from the variables torchrun sets (one process when they are absent)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        raise RuntimeError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers (torchrun sets them): {err}") from err


def launched_by_torchrun() -> bool:
    return env_info().world_size > 1


def local_device(device: str | torch.device) -> torch.device:
    """Under torchrun each process uses its own GPU: "cuda" becomes cuda:LOCAL_RANK (cuda:0 alone)."""
    device = torch.device(device)
    if device.type == "cuda" and (device.index is None or launched_by_torchrun()):
        return torch.device("cuda", env_info().local_rank)
    return device


def init(device: str | torch.device) -> DistInfo:
    """Join the process group torchrun prepared (once); NCCL for CUDA, gloo otherwise."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return info


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all processes (itself when there is one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, parallel: str, device: torch.device, precision: str = "fp32",
         prefetch: int = 2) -> torch.nn.Module:
    """The model each process trains: DistributedDataParallel around it, or FSDP shards of it.

    DDP keeps a full copy per process and averages gradients; FSDP (`fully_shard`, FSDP2) keeps
    1/world_size of every block's parameters per process and gathers a block's weights only while
    that block runs. FSDP changes the model in place (its parameters become sharded DTensors).

    Under FSDP with precision "bf16" or "fp16", the shards stay float32 (the optimizer's master
    weights) and are gathered in the low precision, half the bytes on the wire, while gradients are
    reduced in float32 (`MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`). `prefetch`: how
    many blocks ahead each block asks for its weights (forward) and how many behind (backward), so
    the gathers overlap the blocks' compute instead of waiting for it.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL}.")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if prefetch > 1:  # FSDP2 prefetches one block on its own
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch):i][::-1])
    return model
