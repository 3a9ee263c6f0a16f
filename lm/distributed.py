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


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """The model each process trains: DistributedDataParallel around it, or FSDP shards of it.

    DDP keeps a full copy per process and averages gradients; FSDP (`fully_shard`, FSDP2) keeps
    1/world_size of every block's parameters per process and gathers a block's weights only while
    that block runs. FSDP changes the model in place (its parameters become sharded DTensors).
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL}.")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model
