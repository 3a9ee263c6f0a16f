from __future__ import annotations

import pickle

import pytest
import torch

import lm.checkpoint
from lm import GPT, CheckpointError, ModelConfig, load_checkpoint, load_model, save_checkpoint
from lm.optim import configure_optimizer


def trained_a_little(model: GPT) -> torch.optim.Optimizer:
    """One optimizer step, so weights and optimizer state differ from a fresh model's."""
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    model(idx, idx)[1].backward()
    optimizer.step()
    return optimizer


def test_round_trip_gives_identical_logits(tmp_path, text_model):
    optimizer = trained_a_little(text_model)
    path = save_checkpoint(tmp_path / "ckpt.pt", text_model, optimizer=optimizer, step=7, best_val_loss=1.25,
                           train_config={"lr": 1e-2})
    loaded = load_model(path, device="cpu")
    assert not loaded.training  # ready for inference
    assert loaded.config == text_model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives the round trip
    idx = torch.randint(0, text_model.config.vocab_size, (3, 12))
    assert torch.equal(loaded(idx)[0], text_model.eval()(idx)[0])
    for (name, a), b in zip(text_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_tokenizer_is_attached(tmp_path, text_model):
    save_checkpoint(tmp_path / "ckpt.pt", text_model)
    loaded = load_model(tmp_path / "ckpt.pt", device="cpu")
    assert loaded.tokenizer.itos == text_model.tokenizer.itos
    expected = text_model.generate("the ", max_new_tokens=12, seed=3)
    assert loaded.generate("the ", max_new_tokens=12, seed=3) == expected


def test_model_without_tokenizer(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    assert load_model(tmp_path / "ckpt.pt", device="cpu").tokenizer is None


def test_contents_load_with_weights_only(tmp_path, text_model):
    optimizer = trained_a_little(text_model)
    save_checkpoint(tmp_path / "ckpt.pt", text_model, optimizer=optimizer, step=7, best_val_loss=1.25,
                    train_config={"lr": 1e-2, "out_dir": None}, extra={"note": "hello"})
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert raw["format"] == "lm-checkpoint" and raw["version"] == 1
    assert raw["step"] == 7 and raw["best_val_loss"] == 1.25
    assert raw["train_config"] == {"lr": 1e-2, "out_dir": None} and raw["note"] == "hello"
    assert ModelConfig.from_dict(raw["config"]) == text_model.config
    assert raw["tokenizer"] == text_model.tokenizer.to_dict()
    assert raw["scaler"] is None
    # the optimizer state round-trips into a fresh optimizer
    fresh = configure_optimizer(GPT(text_model.config), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(raw["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7


def test_save_creates_parent_folders_and_leaves_no_temporary_file(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "a" / "b" / "ckpt.pt", tiny_model)
    assert path.is_file()
    save_checkpoint(path, tiny_model, step=2)  # replacing an existing file
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path)["step"] == 2


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_model, step=1)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("power cut")

    with torch.no_grad():
        tiny_model.tok_emb.weight.add_(1.0)  # the new save would hold different weights
    monkeypatch.setattr(lm.checkpoint.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model, step=2)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    load_model(path, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_crash_on_first_save_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lm.checkpoint.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last.pt", tiny_model)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text")
    with pytest.raises(CheckpointError, match="cannot read .*notes.txt"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not an lm checkpoint"):
        load_checkpoint(other)
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="not an lm checkpoint"):
        load_checkpoint(other)


def test_newer_version_is_refused(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model, extra={"version": 99})
    with pytest.raises(CheckpointError, match="version 99.*upgrade lm"):
        load_model(path)


class CreatesFile:
    """Unpickling this object calls open(marker, "w"): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_arbitrary_objects_are_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "lm-checkpoint", "version": 1, "model": CreatesFile(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # the protocol torch.load expects
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(path)
    assert not marker.exists()
    # control: a plain unpickler does run it, so the file really carries code
    if writer == "pickle.dump":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_strict_mismatch(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["norm_f.weight"]
    ckpt["model"]["surprise.weight"] = torch.zeros(2)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "norm_f.weight" in message and "surprise.weight" in message and "strict=False" in message
    model = load_model(path, strict=False, device="cpu")
    assert torch.equal(model.blocks[0].attn.qkv.weight, tiny_model.blocks[0].attn.qkv.weight)
