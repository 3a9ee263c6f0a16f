"""Run by tests/test_distributed.py under `torchrun`: train a tiny model and write the history (rank 0).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py OUT.json BATCH PARALLEL \
        [OUT_DIR [RESUME [PRECISION [FSDP_UNITS]]]]       ("-" for an OUT_DIR or RESUME left out)
"""

from __future__ import annotations

import json
import sys

import torch

import lm
from lm import distributed

TEXT = " ".join(["the king and queen of a small castle walked to the river at dawn while birds sang"] * 30)


def run(batch_size: int, parallel: str = "ddp", out_dir: str | None = None, max_steps: int = 8,
        resume=None, precision: str = "fp32", fsdp_units: str = "auto") -> lm.TrainHistory:
    torch.set_num_threads(1)
    tok = lm.CharTokenizer.train(TEXT)
    ids = torch.tensor(tok.encode(TEXT))
    torch.manual_seed(0)  # every process builds the same initial weights
    model = lm.GPT(lm.ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, d_model=32),
                   tokenizer=tok)
    config = lm.TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=1e-2, warmup_steps=2, eval_interval=4,
                            eval_iters=2, parallel=parallel, progress=False, out_dir=out_dir, precision=precision,
                            fsdp_units=fsdp_units)
    return lm.train(model, ids[:900], ids[900:], config, resume=resume)


if __name__ == "__main__":
    out, batch, parallel = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out_dir, resume, precision, units = (sys.argv[4:] + ["-", "-", "fp32", "auto"][len(sys.argv) - 4:])[:4]
    out_dir, resume = (None if a == "-" else a for a in (out_dir, resume))
    history = run(batch, parallel, out_dir, max_steps=8 if resume is None else 12, resume=resume, precision=precision,
                  fsdp_units=units)
    if distributed.env_info().is_main:
        with open(out, "w") as f:
            json.dump(history.to_dict(), f)
    distributed.shutdown()
