from __future__ import annotations

import math

import pytest
import torch

from lm import GPT, CharTokenizer, ModelConfig, TrainConfig, TrainHistory, TrainingError, load_checkpoint, lr_at, train
from lm.trainer import Trainer


# ---- training runs ---------------------------------------------------------------------------------
def setup_run(text: str, seed: int = 0, **model_kwargs):
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    split = int(0.9 * len(ids))
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 32, "n_layer": 2, "n_head": 2,
                            "d_model": 32, **model_kwargs})
    return GPT(config, tokenizer=tok), ids[:split], ids[split:]


def quick_config(**overrides) -> TrainConfig:
    settings = dict(max_steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=20, eval_iters=4,
                    progress=False)
    return TrainConfig(**{**settings, **overrides})


def test_training_lowers_the_loss(pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    initial = math.log(model.config.vocab_size)
    history = train(model, train_ids, val_ids, quick_config())
    assert history.val_loss[0] < initial
    assert history.val_loss[-1] < 0.25 * initial  # a repeated sentence is easy to learn
    assert history.loss[-1] < 0.25 * history.loss[0]
    assert history.best_val_loss == min(history.val_loss)  # tracked even without out_dir
    assert not model.training


def test_history_lengths_and_values(pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    seen = []
    config = quick_config(max_steps=25, eval_interval=10)
    history = train(model, train_ids, val_ids, config, callback=lambda h: seen.append(len(h.val_loss)))
    assert isinstance(history, TrainHistory)
    assert history.step == list(range(25))
    assert len(history.loss) == len(history.lr) == len(history.grad_norm) == 25
    assert history.eval_step == [9, 19, 24]  # every eval_interval steps and at the very end
    assert len(history.train_loss) == len(history.val_loss) == 3
    assert seen == [1, 2, 3]  # the callback ran after each evaluation
    expected_lr = [lr_at(s, config.lr, config.final_lr, config.warmup_steps, config.max_steps) for s in range(25)]
    assert history.lr == expected_lr
    assert all(g > 0 and math.isfinite(g) for g in history.grad_norm)
    assert history.tokens_per_second > 0


def test_first_step_gradient_norm_matches_a_manual_step(pattern_text):
    from lm.data import get_batch

    config = quick_config(max_steps=1, eval_interval=1, eval_iters=1)
    model, train_ids, val_ids = setup_run(pattern_text, seed=5)
    reference, _, _ = setup_run(pattern_text, seed=5)
    x, y = get_batch(train_ids, config.batch_size, model.config.block_size, torch.Generator().manual_seed(config.seed))
    reference.train()
    reference(x, y)[1].backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters())).item()
    history = train(model, train_ids, val_ids, config)
    assert history.grad_norm[0] == pytest.approx(expected, rel=1e-5)


def test_checkpoints_are_written(tmp_path, pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    history = train(model, train_ids, val_ids, quick_config(max_steps=30, eval_interval=10, out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "metrics.csv"]
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["step"] == 30
    assert best["best_val_loss"] == pytest.approx(min(history.val_loss))
    assert best["step"] == 10 * (history.val_loss.index(min(history.val_loss)) + 1)
    assert last["best_val_loss"] == pytest.approx(history.best_val_loss)
    assert last["train_config"]["max_steps"] == 30 and last["optimizer"] is not None
    # last.pt holds the final weights
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(final[k], v) for k, v in last["model"].items())


def test_best_checkpoint_keeps_the_lowest_val_loss(tmp_path, pattern_text, monkeypatch):
    """Scripted validation losses: best.pt must follow the minimum, not the latest."""
    import lm.trainer

    val_losses = iter([3.0, 1.0, 2.0, 1.5])
    real = lm.trainer.estimate_loss

    def scripted(model, data, *args, **kwargs):
        return next(val_losses) if data is val_ids else real(model, data, *args, **kwargs)

    model, train_ids, val_ids = setup_run(pattern_text)
    monkeypatch.setattr(lm.trainer, "estimate_loss", scripted)
    history = train(model, train_ids, val_ids, quick_config(max_steps=8, eval_interval=2, out_dir=str(tmp_path)))
    assert history.val_loss == [3.0, 1.0, 2.0, 1.5] and history.best_val_loss == 1.0
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["step"] == 4 and best["best_val_loss"] == 1.0
    assert last["step"] == 8 and last["best_val_loss"] == 1.0


def test_same_seed_gives_the_same_losses(pattern_text):
    torch.set_num_threads(1)  # CPU kernels are reproducible only at a fixed thread count
    runs = []
    for _ in range(2):
        model, train_ids, val_ids = setup_run(pattern_text, seed=11)
        runs.append(train(model, train_ids, val_ids, quick_config(max_steps=15, eval_interval=5, seed=3)))
    assert runs[0].loss == runs[1].loss and runs[0].val_loss == runs[1].val_loss
    model, train_ids, val_ids = setup_run(pattern_text, seed=11)
    other = train(model, train_ids, val_ids, quick_config(max_steps=15, eval_interval=5, seed=4))
    assert other.loss != runs[0].loss  # the seed picks the batches


def test_train_on_numpy_memmap(tmp_path, pattern_text):
    from lm.data import read_tokens, write_tokens

    model, train_ids, val_ids = setup_run(pattern_text)
    V = model.config.vocab_size
    write_tokens(tmp_path / "train.bin", train_ids.tolist(), V)
    write_tokens(tmp_path / "val.bin", val_ids.tolist(), V)
    history = train(model, read_tokens(tmp_path / "train.bin", V), read_tokens(tmp_path / "val.bin", V),
                    quick_config(max_steps=10, eval_interval=10))
    assert len(history.val_loss) == 1 and math.isfinite(history.val_loss[0])


def test_nan_loss_raises(pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    with torch.no_grad():
        model.norm_f.weight[0] = float("nan")
    with pytest.raises(TrainingError, match="nan at step 0.*lower lr"):
        train(model, train_ids, val_ids, quick_config())


def training_state(trainer):
    return ({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            {n: {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
             for n, p in trainer.model.named_parameters()})


def assert_same_state(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def poison(model, where):
    """Make the next step non-finite: a NaN weight spoils the loss, a hook only the gradients."""
    if where == "loss":
        with torch.no_grad():
            model.norm_f.weight[0] = float("nan")
    else:
        model.norm_f.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))


@pytest.mark.parametrize("fused, where, message", [
    (True, "loss", "the loss became nan at step 1.*lower lr"),
    (True, "grad", "the gradient norm became nan at step 1"),
    (False, "loss", "the loss became nan at step 1.*lower lr"),
], ids=["fused-nan-loss", "fused-nan-grad", "unfused-nan-loss"])
def test_non_finite_step_leaves_weights_and_optimizer_unchanged(pattern_text, fused, where, message):
    model, train_ids, val_ids = setup_run(pattern_text)
    trainer = Trainer(model, train_ids, val_ids, quick_config())
    if not fused:  # the fallback: an optimizer that cannot skip a step on the device
        trainer.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups],
            betas=(0.9, 0.95), fused=False)
    assert bool(trainer.optimizer.defaults.get("fused")) == fused
    trainer.train_step()  # a good step first, so the optimizer has moments and a step count to keep
    poison(model, where)
    before = training_state(trainer)
    with pytest.raises(TrainingError, match=message):
        trainer.train_step()
    assert_same_state(training_state(trainer), before)
    assert not hasattr(trainer.optimizer, "found_inf")


def test_exploding_learning_rate_raises(pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    with pytest.raises(TrainingError, match="the loss became (nan|inf)"):
        train(model, train_ids, val_ids, quick_config(lr=1e30, warmup_steps=0, grad_clip=0.0))


def test_seq_len_longer_than_block_size(pattern_text):
    model, train_ids, val_ids = setup_run(pattern_text)
    with pytest.raises(TrainingError, match="block_size=32"):
        train(model, train_ids, val_ids, quick_config(seq_len=64))


@pytest.mark.parametrize("field, value", [
    ("max_steps", 0), ("batch_size", -1), ("eval_interval", 0), ("eval_iters", 1.5),
    ("warmup_steps", -1), ("lr", 0.0), ("lr", -1e-3), ("seq_len", 0),
])
def test_train_config_validation(field, value):
    with pytest.raises(TrainingError, match=field):
        TrainConfig(**{field: value})


def test_train_config_defaults():
    config = TrainConfig(lr=1e-3)
    assert config.final_lr == pytest.approx(1e-4)
    assert TrainConfig(lr=1e-3, min_lr=0.0).final_lr == 0.0
    assert TrainConfig(**config.to_dict()) == config
