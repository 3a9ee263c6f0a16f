"""Training as `lm.train` and `lm train` run it: the policy around the loop of `lm.trainer`.

    history = lm.train(model, train_ids, val_ids, lm.TrainConfig(max_steps=1000, out_dir="runs/x"))

On top of what the `Trainer` itself resolves (precision="auto", resume="auto"), this module
resolves batch_size="auto": the largest micro-batch whose training step fits in memory, found by
trial steps of the trainer (`lm.memory.find_batch_size`), less an eighth for headroom. It sits
above both `lm.trainer` and `lm.memory`, since the search needs the trainer's own step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from . import distributed
from .memory import find_batch_size
from .model import GPT
from .trainer import TrainConfig, Trainer, TrainHistory, TrainingError, check_precision, resolve_precision

log = logging.getLogger(__name__)


def resolve_batch_size(model: GPT, config: TrainConfig) -> tuple[TrainConfig, int | None]:
    """`config` with batch_size="auto" replaced by the batch to train with, and the largest batch
    that fitted (None when the config named a number).

    The search runs trial steps on the model's device: on a GPU a batch fits unless it runs out of
    memory (or exceeds `memory_budget`), elsewhere `memory_budget` is required. From 8 sequences up
    an eighth is left free: the allocator fragments over a long run, and evaluation needs room too.
    """
    if config.batch_size != "auto":
        return config, None
    if distributed.env_info().enabled:
        raise TrainingError("--batch_size auto runs alone; under torchrun give a number (find it first with "
                            "one process and --batch_size auto, or batch_size='auto' in lm.train).")
    device = model.device
    if device.type != "cuda" and config.memory_budget is None:
        raise TrainingError(f"batch_size='auto' on {device.type} needs memory_budget (bytes one training step may "
                            f"use, e.g. 4 * 2**30; --memory_budget in GiB for lm train): running out of memory "
                            f"can only be caught on a CUDA GPU.")
    precision = resolve_precision(config.precision, device)
    check_precision(device, precision)
    found = find_batch_size(model, config.seq_len or model.config.block_size, device=device,
                            memory_budget=config.memory_budget, precision=precision)
    chosen = max(1, found * 7 // 8) if found >= 8 else found
    log.info("batch_size='auto': %d sequences fit, training with %d", found, chosen)
    return dataclasses.replace(config, batch_size=chosen), found


def train(
    model: GPT,
    train_data,
    val_data,
    config: TrainConfig,
    callback: Callable[[TrainHistory], None] | None = None,
    resume=None,
) -> TrainHistory:
    """Train `model` in place on 1-D token sequences (tensors or numpy arrays) and return its history.

    `callback(history)` runs after every evaluation (a live plot, say). With `config.out_dir`,
    `last.pt` is written at every evaluation, `best.pt` whenever the validation loss improves, and
    metrics go to `metrics.csv`. `resume` (a checkpoint path or dict) continues an earlier run;
    `resume="auto"` continues the run in `config.out_dir` when it has a last.pt (and returns its
    history untouched when that is already at max_steps), else starts afresh. precision="auto" and
    batch_size="auto" in `config` are resolved first. The model is left in eval mode.

    Nothing is lost when a run stops early. Ctrl-C (SIGINT) or SIGTERM lets the step or evaluation in
    progress finish, saves last.pt with exactly the steps done, and raises
    `lm.trainer.TrainingInterrupted`, a KeyboardInterrupt (its `.checkpoint` is the file, its
    `.exit_code` 130 or 143); calling `train` again with resume="auto" continues exactly. A crash or
    kill -9 loses only the steps since the last evaluation: last.pt, best.pt and metrics.csv are
    always whole, and a resumed run brings best.pt and metrics.csv back in step with last.pt. One run
    at a time may use an out_dir: a second raises TrainingError naming the first (pid, host, start).
    """
    config, _ = resolve_batch_size(model, config)
    return Trainer(model, train_data, val_data, config, callback=callback, resume=resume).fit()


__all__ = ["resolve_batch_size", "train"]
