"""The model chapter 7 ships as "a model worth reading" (lm/assets/shakespeare_char.pt), and the
script that makes it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm
from lm.data import read_tokens
from lm.trainer import estimate_loss

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = lm.assets.path("shakespeare_char.pt")


def shakespeare_dir() -> Path:
    folder = lm.corpora.data_home() / "shakespeare"
    if not (folder / "val.bin").is_file():
        pytest.skip("the Shakespeare corpus is not prepared here (make data)")
    return folder


def test_the_shipped_model_is_the_recorded_run_and_writes_better_than_a_quick_one():
    record = lm.checkpoint.load_checkpoint(SHIPPED)["train_config"]
    model = lm.load_model(SHIPPED)
    assert lm.count_params(model.config) == sum(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float16 on disk, float32 here
    assert record["max_steps"] == 5000 and len(record["val_loss"]) == len(record["eval_steps"])
    assert record["best_val_loss"] == min(record["val_loss"])
    folder = shakespeare_dir()
    tokenizer = lm.load_tokenizer(folder / "tokenizer.json")
    assert tokenizer.vocab_size == model.tokenizer.vocab_size
    assert tokenizer.encode("ROMEO:\nWhat, ho!") == model.tokenizer.encode("ROMEO:\nWhat, ho!")
    val = read_tokens(folder / "val.bin", tokenizer.vocab_size)
    torch.manual_seed(0)
    loss = estimate_loss(model, val, batch_size=8, seq_len=model.config.block_size, iters=4)
    assert abs(loss - record["best_val_loss"]) < 0.1, (loss, record["best_val_loss"])
    assert loss < 1.5  # chapter 7's quick model, 250 steps, is near 2.6


def test_the_script_writes_the_same_kind_of_file(tmp_path):
    shakespeare_dir()
    out = tmp_path / "tiny.pt"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shakespeare_model.py"), "--out", str(out),
                          "--steps", "3", "--eval_interval", "3", "--layers", "1", "--width", "64",
                          "--batch_size", "2", "--block_size", "32", "--device", "cpu"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["params"] > 0
    record = lm.checkpoint.load_checkpoint(out)["train_config"]
    assert record["max_steps"] == 3 and record["eval_steps"] == [3]
    model = lm.load_model(out)
    assert model.config.n_layer == 1 and isinstance(model.generate("ROMEO:", max_new_tokens=5, seed=0), str)
