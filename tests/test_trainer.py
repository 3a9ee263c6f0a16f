"""The trainer's features: accumulation, resuming, early stopping, mixed precision, EMA, metrics, compile."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import lm
import lm.trainer
import lm.training
from lm import GPT, CharTokenizer, ModelConfig, TrainConfig, TrainingError, load_checkpoint, load_model, train
from lm.data import Batches
from lm.trainer import Trainer

from helpers import hold_lock_in_a_thread


def setup_run(text: str, seed: int = 0, dropout: float = 0.0, **model_kwargs):
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    split = int(0.9 * len(ids))
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 2, "n_head": 2,
                            "d_model": 32, "dropout": dropout, **model_kwargs})
    return GPT(config, tokenizer=tok), ids[:split], ids[split:]


def quick(**overrides) -> TrainConfig:
    settings = dict(max_steps=20, batch_size=8, lr=1e-2, warmup_steps=3, eval_interval=5, eval_iters=2,
                    progress=False)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def corpus_text() -> str:
    """Varied text (not a single repeated sentence), so batches differ and losses do too."""
    words = "the king and queen of a small castle walked to the river at dawn while birds sang".split()
    rng = np.random.default_rng(0)
    return " ".join(rng.choice(words, size=900)) + "\n"


# ---- accumulation ----------------------------------------------------------------------------------
def test_gradient_accumulation_matches_one_big_batch(corpus_text):
    torch.set_num_threads(1)
    runs = {}
    for batch, accum in [(8, 1), (4, 2), (2, 4)]:
        model, train_ids, val_ids = setup_run(corpus_text, seed=3)
        runs[accum] = train(model, train_ids, val_ids, quick(batch_size=batch, grad_accum_steps=accum))
    for accum in (2, 4):
        assert runs[accum].loss == pytest.approx(runs[1].loss, rel=1e-4)
        assert runs[accum].grad_norm == pytest.approx(runs[1].grad_norm, rel=1e-3)
        assert runs[accum].val_loss == pytest.approx(runs[1].val_loss, rel=1e-4)
    assert runs[2].tokens == runs[1].tokens == 20 * 8 * 32


# ---- resuming --------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, corpus_text):
    torch.set_num_threads(1)
    config = quick(max_steps=20, eval_interval=5, out_dir=str(tmp_path / "full"))
    model, train_ids, val_ids = setup_run(corpus_text, seed=2, dropout=0.1)  # dropout draws random numbers
    full = train(model, train_ids, val_ids, config)

    def stop_at_ten(history):
        if history.eval_step[-1] == 9:
            raise Stop

    part = quick(max_steps=20, eval_interval=5, out_dir=str(tmp_path / "part"))
    model, train_ids, val_ids = setup_run(corpus_text, seed=2, dropout=0.1)
    with pytest.raises(Stop):
        train(model, train_ids, val_ids, part, callback=stop_at_ten)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 10

    model, train_ids, val_ids = setup_run(corpus_text, seed=99, dropout=0.1)  # other weights: they get loaded
    torch.manual_seed(12345)  # and another RNG state: it gets restored
    resumed = train(model, train_ids, val_ids, part, resume=tmp_path / "part" / "last.pt")
    assert resumed.step == list(range(20))
    assert resumed.loss == full.loss  # bit for bit
    assert resumed.val_loss == full.val_loss and resumed.lr == full.lr
    assert resumed.best_val_loss == full.best_val_loss

    rows = list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(20))  # no duplicates from the first attempt
    assert [float(r["loss"]) for r in rows] == pytest.approx(full.loss)


def signal_at(monkeypatch, where: str, signum: int, count: int, again: bool = False) -> None:
    """Send `signum` to this process the `count`-th time training reaches `where`: inside a step
    (drawing its batch), inside an evaluation, or inside a checkpoint save. `again`: a second signal
    during the save that follows."""
    calls = {"n": 0}

    def hook(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == count:
                signal.raise_signal(signum)  # the handler runs here, mid-call, as a real Ctrl-C would
            return real(*args, **kwargs)
        return wrapped

    if where == "step":
        monkeypatch.setattr(Trainer, "_start_step", hook(Trainer._start_step))
    elif where == "evaluation":
        monkeypatch.setattr(lm.trainer, "estimate_loss", hook(lm.trainer.estimate_loss))
    if where == "save" or again:
        real_save = lm.trainer.save_checkpoint

        def save(*args, **kwargs):
            calls["saves"] = calls.get("saves", 0) + 1
            if where == "save" and calls["saves"] == count or again and calls["n"] >= count:
                signal.raise_signal(signum)
            return real_save(*args, **kwargs)
        monkeypatch.setattr(lm.trainer, "save_checkpoint", save)


@pytest.mark.parametrize("where, signum, count, saved_step", [
    ("step", signal.SIGINT, 13, 13),  # the 13th step finishes, then last.pt holds 13 steps
    ("step", signal.SIGTERM, 3, 3),
    ("evaluation", signal.SIGINT, 2, 8),  # mid-evaluation of step 8: it completes and is saved
    ("save", signal.SIGTERM, 1, 8),  # mid-save of step 8's last.pt: it completes (and best.pt too)
])
def test_a_signal_saves_a_whole_last_checkpoint_and_resume_is_exact(tmp_path, corpus_text, monkeypatch, where,
                                                                   signum, count, saved_step):
    torch.set_num_threads(1)
    config = quick(max_steps=16, eval_interval=8, out_dir=str(tmp_path))
    model, train_ids, val_ids = setup_run(corpus_text, seed=4, dropout=0.1)
    full = train(model, train_ids, val_ids, quick(max_steps=16, eval_interval=8))

    with monkeypatch.context() as patch:
        signal_at(patch, where, signum, count, again=where == "step")
        model, train_ids, val_ids = setup_run(corpus_text, seed=4, dropout=0.1)
        with pytest.raises(lm.trainer.TrainingInterrupted) as stop:
            train(model, train_ids, val_ids, config)
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.exit_code == 128 + signum
    assert stop.value.step == saved_step and stop.value.checkpoint == tmp_path / "last.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    last = load_checkpoint(tmp_path / "last.pt")
    history = last["trainer"]["history"]
    assert last["step"] == saved_step and history["step"] == list(range(saved_step))
    assert history["loss"] == full.loss[:saved_step]
    assert history["eval_step"] == [s for s in full.eval_step if s < saved_step]

    model, train_ids, val_ids = setup_run(corpus_text, seed=0, dropout=0.1)
    resumed = train(model, train_ids, val_ids, config, resume="auto")
    assert resumed.loss == full.loss and resumed.val_loss == full.val_loss  # bit for bit
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(16))
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == full.val_loss


def test_keyboard_interrupt_raised_mid_step_leaves_last_checkpoint_alone(tmp_path, corpus_text, monkeypatch,
                                                                           capsys):
    """A KeyboardInterrupt raised as an exception (not a signal) half-way through a step: the state is
    half-updated, so last.pt stays the one of the last evaluation."""
    torch.set_num_threads(1)
    config = quick(max_steps=16, eval_interval=8, out_dir=str(tmp_path))
    real_next_step, calls = Batches.next_step, []

    def interrupt_on_the_13th_step(self, device="cpu"):
        calls.append(self.seed == config.seed)  # training batches, not the evaluation's
        if sum(calls) == 13 and calls[-1]:
            raise KeyboardInterrupt
        return real_next_step(self, device)

    monkeypatch.setattr(Batches, "next_step", interrupt_on_the_13th_step)
    model, train_ids, val_ids = setup_run(corpus_text, seed=4)
    with pytest.raises(KeyboardInterrupt):
        train(model, train_ids, val_ids, config)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    assert "in the middle of a step" in capsys.readouterr().out


def test_evaluations_and_checkpoints_see_their_own_step(tmp_path, corpus_text):
    """fit() queues step k + 1 before it reads step k; an evaluation must still see the weights of
    exactly k steps. Warmup makes the first three learning rates the same for both runs."""
    torch.set_num_threads(1)
    at_first_eval = []
    model, train_ids, val_ids = setup_run(corpus_text, seed=5)
    history = train(model, train_ids, val_ids, quick(max_steps=6, eval_interval=3),
                    callback=lambda h: at_first_eval.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert history.step == list(range(6)) and history.eval_step == [2, 5]  # evaluations after their own step
    three, _, _ = setup_run(corpus_text, seed=5)
    short = train(three, train_ids, val_ids, quick(max_steps=3, eval_interval=3))
    assert short.val_loss[0] == history.val_loss[0]
    assert all(torch.equal(at_first_eval[0][k], v) for k, v in three.state_dict().items())


def test_resume_auto_continues_from_last_pt(tmp_path, corpus_text, capsys):
    torch.set_num_threads(1)
    model, train_ids, val_ids = setup_run(corpus_text, seed=2, dropout=0.1)
    straight = train(model, train_ids, val_ids, quick(max_steps=20, out_dir=str(tmp_path / "straight")),
                     resume="auto")  # nothing to resume there: a fresh run

    def stop_at_ten(history):
        if history.eval_step[-1] == 9:
            raise Stop

    config = quick(max_steps=20, out_dir=str(tmp_path / "run"))
    model, train_ids, val_ids = setup_run(corpus_text, seed=2, dropout=0.1)
    with pytest.raises(Stop):
        train(model, train_ids, val_ids, config, callback=stop_at_ten)
    model, train_ids, val_ids = setup_run(corpus_text, seed=99, dropout=0.1)  # the checkpoint's weights win
    resumed = train(model, train_ids, val_ids, config, resume="auto")
    assert resumed.step == list(range(20))
    assert resumed.loss == straight.loss and resumed.val_loss == straight.val_loss  # bit for bit

    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    model, train_ids, val_ids = setup_run(corpus_text, seed=7, dropout=0.1)
    again = train(model, train_ids, val_ids, config, resume="auto")  # already at max_steps
    assert "nothing to do" in capsys.readouterr().out
    assert again.loss == straight.loss and not model.training
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert all(torch.equal(v, load_model(tmp_path / "run" / "last.pt", device="cpu").state_dict()[k])
               for k, v in model.state_dict().items())


def test_resume_refuses_another_model_or_tokenizer(tmp_path, corpus_text):
    config = quick(max_steps=5, out_dir=str(tmp_path))
    model, train_ids, val_ids = setup_run(corpus_text)
    train(model, train_ids, val_ids, config)
    before = (tmp_path / "last.pt").read_bytes()
    other, _, _ = setup_run(corpus_text, n_layer=1, d_model=48)
    with pytest.raises(TrainingError, match=r"holds a run of another model \(d_model: checkpoint 32, now 48, "
                                            r"n_layer: checkpoint 2, now 1\).*--overwrite.*another out_dir"):
        Trainer(other, train_ids, val_ids, config, resume="auto")
    with pytest.raises(TrainingError, match="n_layer: checkpoint 2, now 1"):
        Trainer(setup_run(corpus_text, n_layer=1)[0], train_ids, val_ids, config, resume=tmp_path / "last.pt")
    swapped = CharTokenizer.train(corpus_text.replace("a", "\u00e9"))  # as many characters, other ids
    assert swapped.vocab_size == model.tokenizer.vocab_size
    with pytest.raises(TrainingError, match="another tokenizer"):
        Trainer(GPT(model.config, tokenizer=swapped), train_ids, val_ids, config, resume="auto")
    assert (tmp_path / "last.pt").read_bytes() == before
    more_dropout, _, _ = setup_run(corpus_text, dropout=0.2, gradient_checkpointing=True)  # these may change
    assert Trainer(more_dropout, train_ids, val_ids, quick(max_steps=8, out_dir=str(tmp_path)), resume="auto").step == 5


def test_resume_needs_a_training_checkpoint(tmp_path, corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    lm.save_checkpoint(tmp_path / "weights.pt", model)
    with pytest.raises(TrainingError, match="no trainer state"):
        train(model, train_ids, val_ids, quick(), resume=tmp_path / "weights.pt")


def test_checkpoint_holds_everything_to_resume(tmp_path, corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    train(model, train_ids, val_ids, quick(max_steps=5, out_dir=str(tmp_path), precision="fp16"))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    state = ckpt["trainer"]
    assert set(state) >= {"batches", "rng", "history", "scheduler", "evals_without_improvement"}
    assert state["scheduler"] == {"name": "warmup_cosine", "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3,
                                  "max_steps": 5}
    assert state["history"]["step"] == [0, 1, 2, 3, 4]
    assert ckpt["scaler"] is not None and ckpt["optimizer"]["state"]
    assert ckpt["timestamp"] and ckpt["train_config"]["precision"] == "fp16"


# ---- early stopping --------------------------------------------------------------------------------
def test_early_stopping_with_patience_and_min_delta(corpus_text, monkeypatch):
    scripted = iter([3.0, 2.0, 1.995, 1.99, 1.5, 1.6, 1.7, 1.8, 1.9])
    real = lm.trainer.estimate_loss

    def fake(model, data, *args, **kwargs):
        return next(scripted) if data is val_ids else real(model, data, *args, **kwargs)

    model, train_ids, val_ids = setup_run(corpus_text)
    monkeypatch.setattr(lm.trainer, "estimate_loss", fake)
    history = train(model, train_ids, val_ids, quick(max_steps=100, eval_interval=2, patience=2, min_delta=0.01))
    # 1.995 and 1.99 improve on 2.0 by less than min_delta: two evaluations without progress -> stop
    assert history.val_loss == [3.0, 2.0, 1.995, 1.99]
    assert history.stopped_early and history.step[-1] == 7
    assert history.best_val_loss == 1.99  # best.pt still follows any improvement


def test_no_early_stop_without_patience(corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=10))
    assert not history.stopped_early and len(history.step) == 10


# ---- mixed precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(corpus_text, precision):
    runs = {}
    for p in ("fp32", precision):
        model, train_ids, val_ids = setup_run(corpus_text, seed=1)
        runs[p] = train(model, train_ids, val_ids, quick(max_steps=30, eval_interval=30, precision=p))
        assert next(model.parameters()).dtype == torch.float32  # weights stay fp32; only compute is low
    assert runs[precision].val_loss[-1] < 0.7 * math.log(model.config.vocab_size)
    assert runs[precision].val_loss[-1] == pytest.approx(runs["fp32"].val_loss[-1], rel=0.1)
    assert runs[precision].loss[0] == pytest.approx(runs["fp32"].loss[0], rel=0.02)


def test_fp16_gradient_scaler_skips_overflowing_steps(corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text, seed=1)
    trainer = Trainer(model, train_ids, val_ids, quick(precision="fp16"))
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # so large that fp16 gradients overflow
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # step skipped
    assert trainer.scaler.get_scale() < 2.0**60  # and the scale backed off


def test_autocast_runs_matmuls_in_bf16():
    seen = []
    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=16))
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with lm.trainer.autocast(torch.device("cpu"), "bf16"):
        model(torch.zeros(1, 8, dtype=torch.long))
    with lm.trainer.autocast(torch.device("cpu"), "fp32"):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [torch.bfloat16, torch.float32]


# ---- EMA -------------------------------------------------------------------------------------------
def test_ema_is_evaluated_saved_and_loaded(tmp_path, corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=20, ema_decay=0.9, out_dir=str(tmp_path)))
    assert len(history.ema_val_loss) == len(history.val_loss) == 4
    assert history.best_val_loss == min(history.ema_val_loss)  # best.pt follows the weights it serves
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert not torch.equal(ckpt["ema"]["blocks.0.attn.qkv.weight"], ckpt["model"]["blocks.0.attn.qkv.weight"])
    averaged = load_model(tmp_path / "last.pt", device="cpu")
    trained = load_model(tmp_path / "last.pt", device="cpu", ema=False)
    assert torch.equal(averaged.blocks[0].attn.qkv.weight, ckpt["ema"]["blocks.0.attn.qkv.weight"])
    assert torch.equal(trained.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


# ---- metrics ---------------------------------------------------------------------------------------
def test_metrics_csv(tmp_path, corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=10, out_dir=str(tmp_path)))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == history.step
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.loss)
    assert [float(r["lr"]) for r in rows] == pytest.approx(history.lr)
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == history.eval_step == [4, 9]
    assert [float(r["val_loss"]) for r in evals] == pytest.approx(history.val_loss)
    assert int(rows[-1]["tokens"]) == history.tokens == 10 * 8 * 32


def test_tensorboard_logs(tmp_path, corpus_text):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=10, out_dir=str(tmp_path), tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(history.loss, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/val_loss")] == history.eval_step


def test_progress_bar_shows_loss_lr_and_throughput(corpus_text, capsys):
    model, train_ids, val_ids = setup_run(corpus_text)
    train(model, train_ids, val_ids, quick(max_steps=5, progress=True))
    err = capsys.readouterr().err
    assert "training" in err and "loss=" in err and "lr=" in err and "tok_s=" in err


def test_tokens_per_second_leaves_out_the_first_step(corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=6))
    tokens = 8 * 32
    assert history.tokens_per_second == pytest.approx(5 * tokens / sum(history.step_time[1:]))


# ---- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("precision", "fp8"), ("grad_accum_steps", 0), ("patience", 0), ("min_delta", -1.0),
    ("ema_decay", 1.0), ("sampling", "shuffle"), ("parallel", "tp"),
])
def test_new_settings_are_checked(field, value):
    with pytest.raises(TrainingError, match=field):
        TrainConfig(**{field: value})


def test_precision_auto_is_fp32_on_cpu(tmp_path, corpus_text):
    assert TrainConfig().precision == "auto"
    assert lm.trainer.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert lm.trainer.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    model, train_ids, val_ids = setup_run(corpus_text)
    trainer = Trainer(model, train_ids, val_ids, quick(max_steps=5, precision="auto", out_dir=str(tmp_path)))
    assert trainer.config.precision == "fp32" and trainer.scaler is None
    trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["train_config"]["precision"] == "fp32"  # what it trained in


def auto_batch_budget(model, fits: int) -> int:
    """A memory budget between the needs of `fits` and `fits + 1` sequences of `model` at its block_size."""
    from lm.memory import training_memory

    T = model.config.block_size
    return (training_memory(model, fits, T)["total"] + training_memory(model, fits + 1, T)["total"]) // 2


@pytest.mark.parametrize("fits, chosen", [(5, 5), (16, 14)])  # from 8 sequences up, an eighth is left free
def test_batch_size_auto_within_a_memory_budget(tmp_path, corpus_text, fits, chosen):
    model, train_ids, val_ids = setup_run(corpus_text)
    config = quick(max_steps=2, batch_size="auto", memory_budget=auto_batch_budget(model, fits), out_dir=str(tmp_path))
    resolved, found = lm.training.resolve_batch_size(model, config)
    assert (found, resolved.batch_size) == (fits, chosen)
    history = train(model, train_ids, val_ids, config)  # lm.train resolves it the same way
    assert history.tokens == 2 * chosen * 32
    assert load_checkpoint(tmp_path / "last.pt")["train_config"]["batch_size"] == chosen


def test_batch_size_auto_needs_a_budget_off_cuda_and_runs_alone(corpus_text, monkeypatch):
    model, train_ids, val_ids = setup_run(corpus_text)
    with pytest.raises(TrainingError, match="batch_size='auto' on cpu needs memory_budget"):
        train(model, train_ids, val_ids, quick(batch_size="auto"))
    with pytest.raises(TrainingError, match="Trainer needs a number for batch_size"):
        Trainer(model, train_ids, val_ids, quick(batch_size="auto", memory_budget=2**30))
    monkeypatch.setattr(lm.training.distributed, "env_info", lambda: lm.distributed.DistInfo(0, 0, 2))
    with pytest.raises(TrainingError, match="runs alone; under torchrun give a number"):
        train(model, train_ids, val_ids, quick(batch_size="auto", memory_budget=2**30))


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", "big", "batch_size='big' must be a positive integer, or 'auto'"),
    ("memory_budget", -1, "memory_budget=-1 must be a positive number of bytes"),
    ("precision", "fp8", r"precision='fp8' is not one of \('auto', 'fp32'"),
])
def test_auto_settings_are_checked(field, value, match):
    with pytest.raises(TrainingError, match=match):
        TrainConfig(**{field: value})


def test_train_config_from_dict_names_unknown_keys():
    assert TrainConfig.from_dict({"lr": 1e-3}).lr == 1e-3
    assert TrainConfig.from_dict({"learning_rate": 1e-3}).lr == 1e-3  # a seed's name (lm.config.ALIASES)
    with pytest.raises(TrainingError, match=r"unknown training settings \['learning_rat'\]"):
        TrainConfig.from_dict({"learning_rat": 1e-3})


def test_epoch_sampling_trains(corpus_text):
    model, train_ids, val_ids = setup_run(corpus_text)
    history = train(model, train_ids, val_ids, quick(max_steps=30, sampling="epoch"))
    assert history.val_loss[-1] < history.val_loss[0]


def test_gradient_checkpointing_gives_the_same_losses(corpus_text):
    torch.set_num_threads(1)
    runs = []
    for recompute in (False, True):
        model, train_ids, val_ids = setup_run(corpus_text, seed=6, gradient_checkpointing=recompute)
        runs.append(train(model, train_ids, val_ids, quick(max_steps=6)))
    assert runs[1].loss == pytest.approx(runs[0].loss, rel=1e-5)


def test_compiled_training_matches_eager(corpus_text):
    torch.set_num_threads(1)
    runs = []
    for compiled in (False, True):
        model, train_ids, val_ids = setup_run(corpus_text, seed=8)
        runs.append(train(model, train_ids, val_ids, quick(max_steps=4, eval_interval=4, compile=compiled)))
    assert runs[1].loss == pytest.approx(runs[0].loss, rel=1e-3)
    assert runs[1].val_loss == pytest.approx(runs[0].val_loss, rel=1e-3)


# ---- nothing lost: metrics, best.pt, one run per folder, settings (issue 14) -------------------------
def test_a_resumed_run_never_loses_earlier_metrics_rows(tmp_path, corpus_text, monkeypatch):
    """The rows before the resumed step stay on disk the whole time the resumed run trains (a crash
    before its first evaluation loses none); the rows logged after last.pt, one of them cut short,
    are dropped."""
    torch.set_num_threads(1)
    model, train_ids, val_ids = setup_run(corpus_text, seed=6)
    train(model, train_ids, val_ids, quick(max_steps=20, out_dir=str(tmp_path)))
    path = tmp_path / "metrics.csv"
    before = path.read_text().splitlines()
    assert len(before) == 1 + 20
    with open(path, "a") as f:  # what a run that died after last.pt had logged
        f.write("20,2.5,0.01,0.5,0.1,256,,,\n21,2.4")
    on_disk = []

    def crash(self):
        on_disk.append(path.read_text().splitlines())
        raise RuntimeError("power cut")

    monkeypatch.setattr(Trainer, "_start_step", crash)
    model, train_ids, val_ids = setup_run(corpus_text, seed=6)
    with pytest.raises(RuntimeError, match="power cut"):
        train(model, train_ids, val_ids, quick(max_steps=30, out_dir=str(tmp_path)), resume="auto")
    assert on_disk == [before]
    assert path.read_text().splitlines() == before


def test_a_best_checkpoint_left_behind_by_a_crash_is_healed_on_resume(tmp_path, corpus_text, capsys):
    """A crash after last.pt and before best.pt: last.pt knows its own step is the best, so resuming
    (even with nothing left to train) copies it to best.pt."""
    torch.set_num_threads(1)
    model, train_ids, val_ids = setup_run(corpus_text, seed=7)
    train(model, train_ids, val_ids, quick(max_steps=5, out_dir=str(tmp_path)))
    stale = (tmp_path / "best.pt").read_bytes()
    train(model, train_ids, val_ids, quick(max_steps=10, out_dir=str(tmp_path)), resume="auto")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["trainer"]["history"]["best_step"] == 10  # the precondition: step 10 is the best
    (tmp_path / "best.pt").write_bytes(stale)  # as if the run died between the two saves

    again, _, _ = setup_run(corpus_text, seed=7)
    train(again, train_ids, val_ids, quick(max_steps=10, out_dir=str(tmp_path)), resume="auto")
    assert "nothing to do" in capsys.readouterr().out
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 10 and best["best_val_loss"] == last["best_val_loss"]
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_one_training_run_per_out_dir(tmp_path, corpus_text):
    import os
    import socket

    torch.set_num_threads(1)
    let_go = hold_lock_in_a_thread(tmp_path)
    try:
        model, train_ids, val_ids = setup_run(corpus_text)
        with pytest.raises(TrainingError, match=f"in use by another training run: pid {os.getpid()} on "
                                                f"{socket.gethostname()}, started 20"):
            train(model, train_ids, val_ids, quick(max_steps=2, out_dir=str(tmp_path)))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]  # nothing else written
    finally:
        let_go()
    train(model, train_ids, val_ids, quick(max_steps=2, out_dir=str(tmp_path)))
    assert not (tmp_path / "train.lock").exists()  # a finished run leaves no lock behind


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, corpus_text):
    import subprocess
    import sys

    lock = tmp_path / "train.lock"
    holder = (f"import fcntl, os; fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT); "
              f"fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on elsewhere'); os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", holder]).returncode == -9
    assert lock.read_text() == "pid 1 on elsewhere"
    model, train_ids, val_ids = setup_run(corpus_text)
    train(model, train_ids, val_ids, quick(max_steps=2, out_dir=str(tmp_path)))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


NUMERIC_SETTINGS = ["max_steps", "batch_size", "memory_budget", "grad_accum_steps", "seq_len", "lr", "min_lr",
                    "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_iters",
                    "patience", "min_delta", "ema_decay", "seed", "epochs"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", NUMERIC_SETTINGS)
def test_settings_that_are_not_finite_numbers_are_refused(field, value):
    """NaN passes every comparison (grad_clip=nan used to turn clipping off)."""
    with pytest.raises(TrainingError, match=f"^{field}={value!r} is not a finite number"):
        TrainConfig(**{field: value})


def test_every_numeric_setting_is_checked_for_finiteness():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if "int" in f.type or "float" in f.type}
    assert numeric == set(NUMERIC_SETTINGS)


@pytest.mark.parametrize("field, value", [("lr", "3e-4"), ("grad_clip", True), ("min_delta", [0.1])])
def test_float_settings_must_be_numbers(field, value):
    with pytest.raises(TrainingError, match=re.escape(f"{field}={value!r} must be a number")):
        TrainConfig(**{field: value})


MAPPED_BYTES = """
import sys, torch, lm, lm.trainer
if sys.argv[1] == "trainer":
    model = lm.GPT(lm.ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=16))
    lm.trainer.Trainer(model, torch.arange(100) % 16, None, lm.TrainConfig(max_steps=1, batch_size=2, progress=False))
before = lm.trainer.malloc_mapped_bytes()
activation = torch.ones(5 * 2**20)  # 20 MiB
print(lm.trainer.malloc_mapped_bytes() - before)
"""


@pytest.mark.skipif(lm.trainer.malloc_mapped_bytes() is None, reason="tunes glibc's malloc")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_cpu_trainer_lets_malloc_reuse_freed_activations(switch, monkeypatch):
    """glibc maps a 20 MiB block from the operating system by default (and unmaps it when freed, so a
    training step page-faults its activations in again every step); once a CPU Trainer exists, the
    block comes from malloc's heap, where freed memory is reused. Each case in a fresh process, since
    the setting is process-wide; LM_REUSE_FREED_MEMORY=0 leaves malloc as it is."""
    def mapped(how: str) -> int:
        env = {**os.environ, "LM_REUSE_FREED_MEMORY": switch}
        done = subprocess.run([sys.executable, "-c", MAPPED_BYTES, how], capture_output=True, text=True, env=env,
                              timeout=300, check=True)
        return int(done.stdout)

    assert mapped("alone") >= 20 * 2**20
    assert mapped("trainer") == (0 if switch == "1" else mapped("alone"))
    if switch == "0":  # the reason, from the function itself (in this process it changes nothing then)
        monkeypatch.setenv("LM_REUSE_FREED_MEMORY", switch)
        assert lm.trainer.reuse_freed_memory.__wrapped__() == "LM_REUSE_FREED_MEMORY=0 is set"
