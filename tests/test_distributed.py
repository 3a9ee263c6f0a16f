"""Two processes on CPU (gloo) train like one process with the same global batch: DDP, FSDP, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm
from lm import distributed
from lm.cli import main as lm_main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single():
    """One process, global batch 8."""
    return dist_worker.run(batch_size=8)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp-block"])
def test_two_processes_match_one(tmp_path, single, parallel):
    """DDP; FSDP with the (tiny) model one unit, as "auto" has it; FSDP with a unit per block."""
    out = tmp_path / "history.json"
    units = "block" if parallel == "fsdp-block" else "auto"
    torchrun("tests/dist_worker.py", str(out), "4", parallel.split("-")[0], "-", "-", "fp32", units)  # 2 x batch 4
    both = json.loads(out.read_text())
    assert both["step"] == single.step
    assert both["loss"] == pytest.approx(single.loss, rel=1e-4)
    assert both["grad_norm"] == pytest.approx(single.grad_norm, rel=1e-3)
    assert both["val_loss"] == pytest.approx(single.val_loss, rel=1e-4)
    assert both["tokens"] == single.tokens  # tokens of all processes together


def test_fsdp_checkpoint_loads_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    torchrun("tests/dist_worker.py", str(tmp_path / "a.json"), "4", "fsdp", str(runs))
    ckpt = lm.load_checkpoint(runs / "last.pt")
    assert ckpt["step"] == 8 and ckpt["trainer"]["world_size"] == 2
    assert all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in ckpt["model"].values())  # gathered
    model = lm.load_model(runs / "last.pt", device="cpu")  # the full model, in one process
    assert model.num_params() > 0
    torchrun("tests/dist_worker.py", str(tmp_path / "b.json"), "4", "fsdp", str(runs), str(runs / "last.pt"))
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert resumed["step"] == list(range(12))
    # the same 8 + 4 steps in one process: the continuation after the resume must agree
    one = tmp_path / "one"
    dist_worker.run(batch_size=8, out_dir=str(one))
    reference = dist_worker.run(batch_size=8, max_steps=12, resume=one / "last.pt")
    assert resumed["loss"][8:] == pytest.approx(reference.loss[8:], rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(reference.val_loss, rel=1e-4)


def test_fsdp_in_bfloat16_trains_like_one_process_and_keeps_float32_weights(tmp_path):
    """FSDP with precision="bf16": the weights gathered in bfloat16, the shards (the optimizer's
    master weights) and the gradient reduction in float32. The loss follows one process's bf16
    autocast run (not to the last bit: the gathered norms and embeddings are bfloat16 too), and the
    checkpoint holds float32 weights that load on a CPU."""
    runs = tmp_path / "runs"
    torchrun("tests/dist_worker.py", str(tmp_path / "h.json"), "4", "fsdp", str(runs), "-", "bf16")
    both = json.loads((tmp_path / "h.json").read_text())
    one = dist_worker.run(batch_size=8, precision="bf16")
    assert both["loss"] == pytest.approx(one.loss, rel=3e-2)
    assert both["loss"][-1] < 0.9 * both["loss"][0]  # it learns
    ckpt = lm.load_checkpoint(runs / "last.pt")
    assert ckpt["train_config"]["precision"] == "bf16"
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    lm.load_model(runs / "last.pt", device="cpu")


def test_fsdp_wrap_prefetches_the_next_blocks():
    """distributed.wrap's FSDP: each block asks for the weights of the next `prefetch` blocks in the
    forward pass and of the previous ones in the backward pass (one process group of one, gloo)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = lm.GPT(lm.ModelConfig(vocab_size=16, block_size=8, n_layer=4, n_head=2, d_model=16))
        distributed.wrap(model, "fsdp", torch.device("cpu"), precision="bf16", prefetch=2, units="block")
        blocks = list(model.blocks)
        forward = [list(b._get_fsdp_state()._states_to_forward_prefetch) for b in blocks]
        backward = [list(b._get_fsdp_state()._states_to_backward_prefetch) for b in blocks]
        state = [b._get_fsdp_state() for b in blocks]
        assert forward[0] == state[1:3] and forward[3] == [] and backward[3] == [state[2], state[1]]
        policy = state[0]._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
        assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # the shard: float32 master weights
        loss = model(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8)))[1]
        loss.backward()
        assert model.blocks[0].attn.qkv.weight.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()


def test_fsdp_units_whole_model_up_to_a_size_then_per_block(monkeypatch):
    """"auto" makes the whole model FSDP's one unit while it is small (the blocks get no FSDP state of their
    own, so the compiled model stays one graph), a unit per block past WHOLE_MODEL_PARAMS; a bad value is named."""
    import torch.distributed as dist

    def wrapped(units):
        model = lm.GPT(lm.ModelConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=16))
        distributed.wrap(model, "fsdp", torch.device("cpu"), units=units)
        return model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + (os.getpid() + 7) % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        small = wrapped("auto")
        assert small._get_fsdp_state() is not None
        assert not any(hasattr(b, "_get_fsdp_state") for b in small.blocks)
        assert distributed.fsdp_units(small) == "model"
        monkeypatch.setattr(distributed, "WHOLE_MODEL_PARAMS", small.num_params() - 1)
        assert distributed.fsdp_units(small) == "block"
        assert all(b._get_fsdp_state() is not None for b in wrapped("auto").blocks)
        assert not any(hasattr(b, "_get_fsdp_state") for b in wrapped("model").blocks)
        with pytest.raises(ValueError, match="fsdp_units='layer'"):
            wrapped("layer")
    finally:
        dist.destroy_process_group()
    with pytest.raises(lm.TrainingError, match="fsdp_units='layer' is not one of"):
        lm.TrainConfig(fsdp_units="layer")


def test_cli_under_torchrun_matches_one_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(dist_worker.TEXT + "\n")
    data = tmp_path / "data"
    assert lm_main(["prep", "--corpus", str(corpus), "--out_dir", str(data)]) == 0
    flags = ["--data_dir", str(data), "--max_steps", "6", "--n_layer", "1", "--d_model", "32", "--n_head", "2",
             "--seq_len", "16", "--eval_interval", "3", "--eval_iters", "2", "--lr", "1e-2", "--warmup_steps", "1",
             "--no_progress", "--device", "cpu"]
    result = torchrun("-m", "lm", "train", "--out_dir", str(tmp_path / "two"), "--batch_size", "4", *flags)
    assert "2 processes (ddp)" in result.stdout
    torch.set_num_threads(1)
    assert lm_main(["train", "--out_dir", str(tmp_path / "one"), "--batch_size", "8", *flags]) == 0
    one, two = (lm.load_checkpoint(tmp_path / d / "last.pt")["trainer"]["history"] for d in ("one", "two"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


def test_env_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = distributed.env_info()
    assert (info.rank, info.local_rank, info.world_size, info.is_main, info.enabled) == (3, 1, 4, False, True)
    assert distributed.local_device("cpu") == torch.device("cpu")
    assert distributed.local_device("cuda") == torch.device("cuda", 1)  # each process its own GPU
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="must be integers"):
        distributed.env_info()


def test_single_process_has_no_process_group():
    assert not distributed.env_info().enabled
    assert distributed.local_device("cuda") == torch.device("cuda", 0)
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)
    value = torch.tensor(2.5)
    assert distributed.all_mean(value) is value
