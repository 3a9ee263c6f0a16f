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
FSDP_UNITS = ("auto", "model", "block")  # what FSDP gathers at a time: see `wrap`
WHOLE_MODEL_PARAMS = 10**9  # "auto" gathers models up to this many parameters whole, larger ones block by block


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
         prefetch: int = 2, units: str = "auto") -> torch.nn.Module:
    """The model each process trains: DistributedDataParallel around it, or FSDP shards of it.

    DDP keeps a full copy per process and averages gradients; FSDP (`fully_shard`, FSDP2) keeps
    1/world_size of the parameters, gradients and optimizer state per process and gathers the
    weights of a unit only while it runs. FSDP changes the model in place (its parameters become
    sharded DTensors).

    `units`: what FSDP gathers at a time. "block": each transformer block is a unit (and the rest of
    the model one more), gathered when it runs and let go after, so a process never holds more than
    a few blocks' full weights: the way to train a model whose weights, gradients and AdamW state do
    not fit one GPU. "model": the whole model is one unit, gathered once at the start of the forward
    pass and its gradients reduced once at the end of backward: more memory at the peak (the full
    weights in the gather precision, and the full gradients at the end), but FSDP's hooks run once a
    step instead of three times per block. Those hooks are Python that torch.compile does not trace,
    so with units per block the compiled model runs as one graph per block with the host in between;
    for GPT-2 124M on one H100 (world size 1, bf16, compiled, batch 16) a step took 77-82 ms by
    block, 49 ms whole, 40 ms without FSDP: the host, not the GPU, set the pace. "auto" (default):
    "model" up to `WHOLE_MODEL_PARAMS` parameters, "block" above.

    Under FSDP with precision "bf16" or "fp16", the shards stay float32 (the optimizer's master
    weights) and are gathered in the low precision, half the bytes on the wire, while gradients are
    reduced in float32 (`MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`). `prefetch` (units
    per block): how many blocks ahead each block asks for its weights (forward) and how many behind
    (backward), so the gathers overlap the blocks' compute instead of waiting for it.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLEL}.")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    if fsdp_units(model, units) == "block":
        blocks = list(model.blocks)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        if prefetch > 1:  # FSDP2 prefetches one block on its own
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
                block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch):i][::-1])
    fully_shard(model, mp_policy=policy)
    return model


def fsdp_units(model: torch.nn.Module, units: str = "auto") -> str:
    """"model" or "block": what `wrap` makes FSDP's units of `model` for `units` ("auto" decides by size)."""
    if units not in FSDP_UNITS:
        raise ValueError(f"fsdp_units={units!r} is not one of {FSDP_UNITS}.")
    if units == "auto":
        return "model" if model.num_params(non_embedding=False) <= WHOLE_MODEL_PARAMS else "block"
    return units
