from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import signal
import socket
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lm.checkpoint
import lm.files
import lm
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
    assert raw["format"] == "lm-checkpoint" and raw["version"] == lm.checkpoint.VERSION
    assert raw["lm_version"] == lm.__version__
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
    ckpt["checksums"] = lm.checkpoint.checksums(ckpt)  # edited on purpose: else the edit is reported as corruption
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "norm_f.weight" in message and "surprise.weight" in message and "strict=False" in message
    model = load_model(path, strict=False, device="cpu")
    assert torch.equal(model.blocks[0].attn.qkv.weight, tiny_model.blocks[0].attn.qkv.weight)


# ---- faults: corruption, hostile files, failed saves (issue 14) -------------------------------------
BOOK_CHECKPOINTS = sorted((Path(__file__).parent.parent / "book" / "data").glob("*.pt"))


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


def position_of(path: Path, tensor: torch.Tensor) -> int:
    """Where a tensor's bytes start in the file (torch.save stores them uncompressed)."""
    position = path.read_bytes().find(tensor.detach().contiguous().numpy().tobytes())
    assert position > 0
    return position


def test_flipped_byte_in_the_weights_is_reported_with_file_and_tensor(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    flip_byte(path, position_of(path, tiny_model.blocks[1].attn.qkv.weight) + 100)
    with pytest.raises(CheckpointError, match=r"ckpt.pt.*corrupt.*blocks\.1\.attn\.qkv\.weight"):
        load_model(path, device="cpu")
    with pytest.raises(CheckpointError, match=r"ckpt.pt.*corrupt.*blocks\.1\.attn\.qkv\.weight"):
        load_checkpoint(path)
    assert load_checkpoint(path, mmap=True)["step"] == 0  # a mapped look at the settings reads no weights


def test_flipped_byte_in_the_optimizer_state_fails_resuming_not_inference(tmp_path, tiny_model):
    optimizer = trained_a_little(tiny_model)
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model, optimizer=optimizer)
    flip_byte(path, position_of(path, optimizer.state_dict()["state"][0]["exp_avg_sq"]) + 8)
    with pytest.raises(CheckpointError, match=r"corrupt.*optimizer/state/0/exp_avg_sq"):
        load_checkpoint(path)  # what the trainer calls to resume
    load_model(path, device="cpu")  # inference does not use the optimizer state, and does not hash it


def test_settings_readers_and_load_model_hash_only_what_they_use(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model, optimizer=trained_a_little(tiny_model))
    hashed = []
    real_digest = lm.checkpoint.tensor_digest
    monkeypatch.setattr(lm.checkpoint, "tensor_digest", lambda name, t: hashed.append(name) or real_digest(name, t))
    load_checkpoint(path, mmap=True)
    assert hashed == []
    load_model(path, device="cpu")
    assert hashed and all(name.startswith("model/") for name in hashed)


def test_edited_config_is_reported_as_corrupt(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_head"] = 2  # same shapes, another model: only the checksum can tell
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="corrupt: its config.*checksums"):
        load_model(path)


@pytest.mark.parametrize("book_checkpoint", BOOK_CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoints_written_before_checksums_still_load(book_checkpoint):
    assert "checksums" not in load_checkpoint(book_checkpoint, mmap=True)
    assert load_model(book_checkpoint, device="cpu").tokenizer is not None


def test_version_1_checkpoint_without_checksums_loads(tmp_path, text_model):
    path = save_checkpoint(tmp_path / "ckpt.pt", text_model)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksums"], ckpt["lm_version"]
    ckpt["version"] = 1  # as lm 0.1.0 wrote them before checksums
    torch.save(ckpt, path)
    loaded = load_model(path, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(text_model.state_dict().values(), loaded.state_dict().values()))


def test_version_2_checkpoint_without_checksums_is_corrupt(tmp_path, text_model):
    """Version 2 always carries checksums: a damaged key must not pass for an old file without them."""
    path = save_checkpoint(tmp_path / "ckpt.pt", text_model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["chec\x9bsums"] = ckpt.pop("checksums")  # a flipped byte in the key's name
    torch.save(ckpt, path)
    for load in (load_checkpoint, load_model, lambda p: load_checkpoint(p, mmap=True)):
        with pytest.raises(CheckpointError, match=r"ckpt.pt.*corrupt.*no 'checksums' entry.*version 2"):
            load(path)


def test_nonfinite_weights_are_named(tmp_path, tiny_model):
    with torch.no_grad():
        tiny_model.blocks[0].mlp.fc.weight[0, 0] = float("nan")
        tiny_model.norm_f.bias[3] = float("-inf")
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    with pytest.raises(CheckpointError) as err:
        load_model(path, device="cpu")
    message = str(err.value)
    assert "ckpt.pt" in message and "NaN or inf" in message and "allow_nonfinite=True" in message
    assert "blocks.0.mlp.fc.weight" in message and "norm_f.bias" in message and "tok_emb" not in message
    model = load_model(path, device="cpu", allow_nonfinite=True)
    assert model.norm_f.bias[3] == float("-inf")


def partial_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(lm.checkpoint.TEMP_SUFFIX))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates a crash with fork and SIGKILL")
def test_next_save_removes_the_temporary_file_of_a_crashed_save(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", tiny_model, step=1)

    def killed_mid_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # no except clause, no cleanup: a power cut

    monkeypatch.setattr(lm.checkpoint.torch, "save", killed_mid_save)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child dies inside save_checkpoint)
        save_checkpoint(path, tiny_model, step=2)
        os._exit(1)
    os.waitpid(child, 0)
    monkeypatch.undo()
    [left] = partial_files(tmp_path)  # what a crash leaves: named to be recognised
    assert load_checkpoint(path)["step"] == 1

    save_checkpoint(path, tiny_model, step=3)  # moments later: it may be a live writer's, kept
    assert partial_files(tmp_path) == [left]
    old = time.time() - 2 * lm.checkpoint.STALE_AFTER_S
    os.utime(tmp_path / left, (old, old))
    save_checkpoint(path, tiny_model, step=4)
    assert partial_files(tmp_path) == []
    assert load_checkpoint(path)["step"] == 4


@pytest.mark.skipif(lm.files.fcntl is None, reason="POSIX file locks")
def test_a_live_writers_temporary_file_is_kept(tmp_path, tiny_model):
    live = tmp_path / f".best.pt.abc{lm.checkpoint.TEMP_SUFFIX}"
    with open(live, "wb") as f:
        lm.files.fcntl.flock(f, lm.files.fcntl.LOCK_EX)  # another process is writing best.pt slowly
        old = time.time() - 2 * lm.checkpoint.STALE_AFTER_S
        os.utime(live, (old, old))
        save_checkpoint(tmp_path / "last.pt", tiny_model)
        assert live.exists()
    save_checkpoint(tmp_path / "last.pt", tiny_model)  # the writer is gone (its lock with it)
    assert not live.exists()


# ---- hostile files: nothing is allocated beyond what the file holds
@contextlib.contextmanager
def memory_cap(extra_bytes: int):
    """Address space limited to what the process maps now plus `extra_bytes`: an attempt to
    allocate more fails at once instead of swapping the machine to death."""
    resource = pytest.importorskip("resource")
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def craft(tmp_path: Path, model: GPT, config_changes: dict, weights: dict | None = None) -> Path:
    """A checkpoint whose config was edited, passed off as a version-1 file without checksums (as an
    attacker would: checksums are no signature)."""
    path = save_checkpoint(tmp_path / "evil.pt", model)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksums"]
    ckpt["version"] = 1
    ckpt["config"].update(config_changes)
    if weights is not None:
        ckpt["model"] = weights
    torch.save(ckpt, path)
    return path


HOSTILE_CONFIGS = {
    "gpt3_width": ({"vocab_size": 50257, "d_model": 12288, "n_head": 96}, "tok_emb.weight"),
    "gpt3_depth": ({"n_layer": 96}, "n_layer=96"),
    "million_layers": ({"n_layer": 1_000_000}, "n_layer=1000000"),
    "huge_rope_table": ({"pos": "rope", "block_size": 2**40}, "block_size=1099511627776"),
    "huge_learned_positions": ({"block_size": 2**31}, "pos_emb.weight"),
}


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc to cap memory")
@pytest.mark.parametrize("attack", HOSTILE_CONFIGS)
def test_config_declaring_a_huge_model_is_refused_before_allocation(tmp_path, tiny_model, attack):
    changes, named = HOSTILE_CONFIGS[attack]
    path = craft(tmp_path, tiny_model, changes)
    assert path.stat().st_size < 200_000
    with memory_cap(2 << 30), pytest.raises(CheckpointError, match=f"evil.pt.*{re.escape(named)}.*corrupt or was edited"):
        load_model(path, device="cpu")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc to cap memory")
def test_weights_that_repeat_one_stored_number_are_refused(tmp_path, tiny_model):
    """Stride-0 views: a few bytes on disk that claim a (50257, 12288) embedding."""
    huge = {"vocab_size": 50257, "d_model": 12288, "n_head": 96}
    C, V = huge["d_model"], huge["vocab_size"]
    scaled = {32: C, 48: V, 96: 3 * C, 128: 4 * C, 16: 16}  # the tiny model's C, V, 3C, 4C and block_size
    one = torch.zeros(1)
    weights = {name: one.expand(*[scaled[size] for size in t.shape]) for name, t in tiny_model.state_dict().items()}
    path = craft(tmp_path, tiny_model, huge, weights=weights)
    assert path.stat().st_size < 200_000
    with memory_cap(2 << 30), pytest.raises(CheckpointError, match=r"evil.pt.*corrupt or crafted.*backed by only 4"):
        load_model(path, device="cpu")


def test_compressed_records_are_refused_before_reading(tmp_path, tiny_model):
    """torch.load inflates a deflated record: 20 kB on disk would become 20 MB (or 20 GB) in memory."""
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model, extra={"padding": torch.zeros(5_000_000)})
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as good, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as evil:
        for record in good.infolist():
            evil.writestr(record.filename, good.read(record.filename))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(CheckpointError, match="bomb.pt.*compressed"):
        load_checkpoint(bomb)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def bpe_tokenizer(pattern_text):
    return lm.ByteBPETokenizer.train(pattern_text, vocab_size=270)


def gpt2_tokenizer(pattern_text):
    try:
        gpt2_ranks = pytest.importorskip("lm.tokenizers.gpt2_ranks")
        if not os.environ.get("LM_GPT2_RANKS") and not (gpt2_ranks.data_home() / "cache" / "gpt2.tiktoken").is_file():
            pytest.skip("GPT-2's ranks are not cached here (fetching them is the tokenizer's business)")
    except AttributeError:
        pytest.skip("no offline GPT-2 ranks")
    return lm.TiktokenTokenizer("gpt2")


@pytest.mark.parametrize("make_tokenizer", [lm.CharTokenizer.train, bpe_tokenizer, gpt2_tokenizer],
                         ids=["char", "bpe", "tiktoken_gpt2"])
def test_loading_opens_no_network_connection(tmp_path, pattern_text, make_tokenizer, no_network):
    tokenizer = make_tokenizer(pattern_text)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16),
                tokenizer=tokenizer)
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    loaded = load_model(path, device="cpu")
    assert loaded.tokenizer.encode("to be") == tokenizer.encode("to be")


def test_a_tokenizer_that_needs_a_download_gives_a_checkpoint_error(tmp_path, tiny_model, no_network):
    """cl100k_base has no offline copy: tiktoken tries to fetch it (the tokenizer's business, see the
    report); with no network the load fails with a CheckpointError, not a hang or a foreign error."""
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"] = {"kind": "tiktoken", "name": "cl100k_base"}
    ckpt["checksums"] = lm.checkpoint.checksums(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="tokenizer cannot be rebuilt"):
        load_model(path, device="cpu")


# ---- failed saves: one clear line, the previous checkpoint whole, no temporary file
class FullDisk:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def assert_previous_checkpoint_whole(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    load_model(path, device="cpu")
    assert partial_files(path.parent) == []


def assert_one_clear_line(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "unexpected pos" not in message
    for word in words:
        assert word in message


def test_disk_full_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", tiny_model, step=1)
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(lm.checkpoint.torch, "save", lambda obj, f: real_save(obj, FullDisk(f, room=4096)))
    with pytest.raises(lm.checkpoint.CheckpointSaveError) as err:
        save_checkpoint(path, tiny_model, step=2)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert_one_clear_line(err, path, "disk is full", "free space", "unchanged")
    assert_previous_checkpoint_whole(path, before)


@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_read_only_folder_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch, how):
    path = save_checkpoint(tmp_path / "last.pt", tiny_model, step=1)
    before = path.read_bytes()
    if how == "chmod":
        if not hasattr(os, "geteuid") or os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the simulated case covers it")
        tmp_path.chmod(0o555)
    else:
        def refused(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

        monkeypatch.setattr(lm.files.tempfile, "mkstemp", refused)
    try:
        with pytest.raises(lm.checkpoint.CheckpointSaveError) as err:
            save_checkpoint(path, tiny_model, step=2)
    finally:
        tmp_path.chmod(0o755)
        monkeypatch.undo()
    assert_one_clear_line(err, path, "not writable", "permissions", "unchanged")
    assert_previous_checkpoint_whole(path, before)


def test_output_path_that_is_a_folder(tmp_path, tiny_model):
    folder = tmp_path / "run"
    save_checkpoint(folder / "last.pt", tiny_model, step=1)
    with pytest.raises(lm.checkpoint.CheckpointSaveError) as err:
        save_checkpoint(folder, tiny_model, step=2)
    assert_one_clear_line(err, folder, "is a folder", "last.pt")
    assert_previous_checkpoint_whole(folder / "last.pt", (folder / "last.pt").read_bytes())
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("under", ["notes.txt", "notes.txt/sub"])
def test_output_path_under_a_file(tmp_path, tiny_model, under):
    (tmp_path / "notes.txt").write_text("keep me")
    path = tmp_path / under / "last.pt"
    with pytest.raises(lm.checkpoint.CheckpointSaveError) as err:
        save_checkpoint(path, tiny_model)
    assert_one_clear_line(err, path, "is a file, not a folder", "another path")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---- property: whatever happens to the bytes, a load gives the saved tensors or a CheckpointError
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16))
    path = save_checkpoint(tmp_path_factory.mktemp("prop") / "ckpt.pt", model)
    return path.read_bytes(), model.state_dict()


def load_or_checkpoint_error(data: bytes, expected: dict, folder: Path) -> None:
    path = folder / "damaged.pt"
    path.write_bytes(data)
    capped = memory_cap(2 << 30) if Path("/proc/self/statm").exists() else contextlib.nullcontext()
    try:
        with capped:
            loaded = load_model(path, device="cpu").state_dict()
    except CheckpointError as err:
        assert "damaged.pt" in str(err)
        return
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("saved", ["saved_checkpoint", "saved_safetensors"])
@PROPERTY_SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_give_the_saved_tensors_or_a_checkpoint_error(request, saved, tmp_path, flips):
    data, expected = request.getfixturevalue(saved)
    damaged = bytearray(data)
    for where, mask in flips:
        damaged[int(where * len(data))] ^= mask
    load_or_checkpoint_error(bytes(damaged), expected, tmp_path)


@PROPERTY_SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_bytes_in_the_pickle_give_the_saved_tensors_or_a_checkpoint_error(saved_checkpoint, tmp_path, where,
                                                                                   mask):
    """The structure (names, shapes, config) lives in data.pkl, a few percent of the file: aim there."""
    data, expected = saved_checkpoint
    start = data.find(b"data.pkl") + len(b"data.pkl")
    end = data.find(b"PK\x03\x04", start)
    damaged = bytearray(data)
    damaged[start + int(where * (end - start))] ^= mask
    load_or_checkpoint_error(bytes(damaged), expected, tmp_path)


@pytest.mark.parametrize("saved, name", [("saved_checkpoint", "cut.pt"), ("saved_safetensors", "cut.safetensors")])
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(0, 1, exclude_max=True))
def test_truncated_files_give_a_checkpoint_error(request, saved, name, tmp_path, keep):
    data, _ = request.getfixturevalue(saved)
    path = tmp_path / name
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(CheckpointError, match=name):
        load_model(path, device="cpu")


def test_a_tokenizer_with_its_own_regex_loads_only_when_trusted(tmp_path):
    tokenizer = lm.ByteBPETokenizer.train("hello world, hello there", vocab_size=265, pattern=r"\w+|\W")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=16),
                tokenizer=tokenizer)
    save_checkpoint(tmp_path / "custom.pt", model)
    with pytest.raises(CheckpointError, match="custom.pt.*trust_pattern=True"):
        load_model(tmp_path / "custom.pt", device="cpu")
    loaded = load_model(tmp_path / "custom.pt", device="cpu", trust_pattern=True)
    assert loaded.tokenizer.encode("hello, world") == tokenizer.encode("hello, world")


# ---- safetensors: the same checkpoint as safetensors tensors and JSON ---------------------------------
def sentencepiece_tokenizer(pattern_text):
    return lm.SentencePieceTokenizer.train(pattern_text, vocab_size=300)


def with_lora(model: GPT) -> GPT:
    from lm.lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(rank=2, targets=("qkv", "fc")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # zero at first: the adapters would change nothing
    return model


MODEL_KINDS = {  # config changes, a tokenizer maker, and whether LoRA adapters go on
    "gpt2_tied_char": ({}, lm.CharTokenizer.train, False),
    "llama_gqa_bpe": (dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, tie_weights=False, n_head=4,
                           n_kv_heads=2), bpe_tokenizer, False),
    "moe_sentencepiece": (dict(ffn="moe", n_experts=3, moe_top_k=2), sentencepiece_tokenizer, False),
    "lora_char": ({}, lm.CharTokenizer.train, True),
}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_safetensors_round_trip_gives_identical_logits(tmp_path, pattern_text, kind):
    changes, make_tokenizer, lora = MODEL_KINDS[kind]
    tokenizer = make_tokenizer(pattern_text)
    config = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, d_model=16),
                            **changes})
    model = GPT(config, tokenizer=tokenizer)
    if lora:
        model = with_lora(model)
    model.eval()
    path = save_checkpoint(tmp_path / "model.safetensors", model, step=5, train_config={"lr": 1e-3, "out_dir": None})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors file, not a zip archive
    loaded = load_model(path, device="cpu")
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == config.tie_weights
    assert getattr(loaded, "lora_config", None) == getattr(model, "lora_config", None)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.tokenizer.to_dict() == tokenizer.to_dict()
    assert loaded.tokenizer.encode("the lazy dog") == tokenizer.encode("the lazy dog")
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 5 and ckpt["train_config"] == {"lr": 1e-3, "out_dir": None}
    assert ckpt["version"] == lm.checkpoint.VERSION and ckpt["lm_version"] == lm.__version__
    assert ckpt["optimizer"] is None and ckpt["scaler"] is None


def test_safetensors_file_is_read_by_the_safetensors_library(tmp_path, text_model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = save_checkpoint(tmp_path / "model.safetensors", text_model)
    weights = load_file(path)
    state = text_model.state_dict()
    # tied: the output head is the token embedding, stored once and tied again on load
    assert set(weights) == {f"model/{name}" for name in state} - {"model/lm_head.weight"}
    assert all(torch.equal(weights[f"model/{name}"], state[name]) for name in state if name != "lm_head.weight")
    with safe_open(str(path), framework="pt") as f:
        entry = json.loads(f.metadata()["lm"])
    assert entry["format"] == "lm-checkpoint" and entry["config"] == text_model.config.to_dict()
    assert entry["model"]["lm_head.weight"] == {"$tensor": "model/tok_emb.weight"}


def test_the_format_is_told_by_content_not_name(tmp_path, text_model):
    idx = torch.randint(0, text_model.config.vocab_size, (1, 8))
    for name, format in (("st.pt", "safetensors"), ("zip.safetensors", "pt"), ("no_suffix", "safetensors")):
        path = save_checkpoint(tmp_path / name, text_model, format=format)
        assert (path.read_bytes()[:4] == b"PK\x03\x04") == (format == "pt")
        assert torch.equal(load_model(path, device="cpu")(idx)[0], text_model(idx)[0])
    with pytest.raises(ValueError, match="format='onnx'.*'pt', 'safetensors'"):
        save_checkpoint(tmp_path / "x.onnx", text_model, format="onnx")


def test_safetensors_holds_no_optimizer_state(tmp_path, text_model):
    optimizer = trained_a_little(text_model)
    with pytest.raises(ValueError, match=r"model.safetensors.*not a training run.*\.pt file"):
        save_checkpoint(tmp_path / "model.safetensors", text_model, optimizer=optimizer)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_keeps_plain_data_bytes_tuples_and_ema(tmp_path, text_model):
    ema = {name: t + 1 for name, t in text_model.state_dict().items()}
    extra = {"blob": b"\x00\xff\x80", "pair": (1, "a", (2.5, None)), "nested": {"inf": float("inf"), "ok": True},
             "ema": ema, "classifier": {"head": torch.arange(6).reshape(2, 3), "labels": ["a", "b"]}}
    path = save_checkpoint(tmp_path / "model.safetensors", text_model, extra=extra)
    ckpt = load_checkpoint(path)
    assert ckpt["blob"] == b"\x00\xff\x80" and ckpt["pair"] == (1, "a", (2.5, None))
    assert ckpt["nested"] == {"inf": float("inf"), "ok": True}
    assert torch.equal(ckpt["classifier"]["head"], torch.arange(6).reshape(2, 3))
    assert all(torch.equal(ckpt["ema"][name], ema[name]) for name in ema)
    assert torch.equal(load_model(path, device="cpu").norm_f.weight, ema["norm_f.weight"])  # the averaged weights
    assert torch.equal(load_model(path, device="cpu", ema=False).norm_f.weight, text_model.norm_f.weight)


@pytest.mark.parametrize("extra, named", [({"dtype": torch.float32}, "dtype"), ({"ids": {0: "a"}}, "ids"),
                                          ({"odd": {"$tensor": "x"}}, "odd")])
def test_data_safetensors_cannot_hold_is_refused_before_writing(tmp_path, text_model, extra, named):
    with pytest.raises(ValueError, match=f"cannot save '{named}' to a safetensors file.*\\.pt file"):
        save_checkpoint(tmp_path / "model.safetensors", text_model, extra=extra)
    assert list(tmp_path.iterdir()) == []


def test_views_and_shared_memory_are_stored_as_copies(tmp_path, text_model):
    big = torch.arange(10.0)
    extra = {"view": big[2:5], "whole": big, "transposed": torch.ones(2, 3).t(),
             "empty": [torch.zeros(0), torch.zeros(0)]}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "model.safetensors", text_model, extra=extra))
    assert torch.equal(ckpt["view"], big[2:5]) and torch.equal(ckpt["whole"], big)
    assert torch.equal(ckpt["transposed"], torch.ones(3, 2))


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """Where the tensor bytes start, and the header."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return 8 + length, json.loads(data[8:8 + length])


def test_flipped_byte_in_a_safetensors_tensor_is_caught_by_the_checksums(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model)
    start, header = safetensors_layout(path)
    flip_byte(path, start + header["model/blocks.1.attn.qkv.weight"]["data_offsets"][0] + 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*corrupt.*blocks\.1\.attn\.qkv\.weight"):
        load_model(path, device="cpu")


def test_edited_safetensors_config_is_reported_as_corrupt(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model)
    data = path.read_bytes()
    assert data.count(b'\\"n_head\\":4') == 1  # in a JSON text inside the JSON header
    path.write_bytes(data.replace(b'\\"n_head\\":4', b'\\"n_head\\":2'))  # same length, same shapes, another model
    with pytest.raises(CheckpointError, match="corrupt: its config.*checksums"):
        load_model(path)


def write_safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


def lm_metadata(tensor_names) -> dict:
    return {"lm": json.dumps({"format": "lm-checkpoint", "version": 2, "checksums": {"tensors": {}},
                              "model": {name: {"$tensor": name} for name in tensor_names}})}


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CRAFTED = {  # header, tensor bytes, declared header length; the words the error must contain
    "huge_header_length": ({"__metadata__": lm_metadata([])}, b"", 2**63, "header claims 9,223,372,036"),
    "header_longer_than_file": ({"__metadata__": lm_metadata([])}, b"", 10_000, "header claims 10,000 bytes"),
    "not_json": (None, b"", None, "header is not JSON"),
    "beyond_the_file": ({"__metadata__": lm_metadata(["a"]), "a": {"dtype": "F32", "shape": [2**30],
                                                                  "data_offsets": [0, 2**32]}}, b"\0" * 8, None,
                        "take 4,294,967,296 bytes, but the file has 8"),
    "shape_larger_than_bytes": ({"__metadata__": lm_metadata(["a"]), "a": {"dtype": "F32", "shape": [2**40],
                                                                          "data_offsets": [0, 8]}}, b"\0" * 8, None,
                                "is given 8 bytes; it needs 4,398,046,511,104"),
    "overlapping": ({"__metadata__": lm_metadata(["a", "b"]), "a": F32_PAIR, "b": F32_PAIR}, b"\0" * 16, None,
                    "start at 0, not at 8"),
    "unknown_dtype": ({"__metadata__": lm_metadata(["a"]), "a": {**F32_PAIR, "dtype": "F128"}}, b"\0" * 8, None,
                      "no valid dtype"),
    "negative_shape": ({"__metadata__": lm_metadata(["a"]), "a": {**F32_PAIR, "shape": [-2]}}, b"\0" * 8, None,
                       "no valid dtype, shape"),
    "names_a_missing_tensor": ({"__metadata__": lm_metadata(["a", "b"]), "a": F32_PAIR}, b"\0" * 8, None,
                               "names tensor 'b', which the file does not store"),
    "unmentioned_tensor": ({"__metadata__": lm_metadata([]), "a": F32_PAIR}, b"\0" * 8, None,
                           r"stores tensors \['a'\] that its checkpoint entry does not mention"),
    "not_lm": ({"__metadata__": {"format": "pt"}, "a": F32_PAIR}, b"\0" * 8, None, "not an lm checkpoint.*from_hf"),
    "bad_metadata_json": ({"__metadata__": {"lm": "{nope"}, "a": F32_PAIR}, b"\0" * 8, None,
                          "as an lm checkpoint.*JSONDecodeError"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_safetensors_files_give_a_checkpoint_error(tmp_path, case):
    header, data, length, words = CRAFTED[case]
    path = tmp_path / "evil.safetensors"
    if header is None:
        path.write_bytes((5).to_bytes(8, "little") + b"{nope")
    else:
        write_safetensors(path, header, data, length)
    capped = memory_cap(2 << 30) if Path("/proc/self/statm").exists() else contextlib.nullcontext()
    with capped, pytest.raises(CheckpointError, match=f"evil.safetensors.*{words}"):
        load_model(path, device="cpu")


@pytest.fixture(scope="module")
def saved_safetensors(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16))
    path = save_checkpoint(tmp_path_factory.mktemp("prop") / "ckpt.safetensors", model)
    return path.read_bytes(), model.state_dict()


@PROPERTY_SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_bytes_in_the_safetensors_header_give_the_saved_tensors_or_a_checkpoint_error(saved_safetensors,
                                                                                               tmp_path, where, mask):
    """The names, shapes, offsets and the JSON entry: aim there."""
    data, expected = saved_safetensors
    end = 8 + int.from_bytes(data[:8], "little")
    damaged = bytearray(data)
    damaged[int(where * end)] ^= mask
    load_or_checkpoint_error(bytes(damaged), expected, tmp_path)


def test_crash_mid_safetensors_save_keeps_the_previous_file(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model, step=1)
    before = path.read_bytes()
    real_write = lm.files.write_atomically

    def crashing_write(target, write, **kwargs):
        def half_then_crash(f):
            f.write(before[: len(before) // 2])
            raise KeyboardInterrupt("power cut")
        return real_write(target, half_then_crash, **kwargs)

    monkeypatch.setattr(lm.checkpoint.files, "write_atomically", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_safetensors_without_the_package_says_what_to_install(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_checkpoint(tmp_path / "other.safetensors", tiny_model)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_model(path)
    save_checkpoint(tmp_path / "model.pt", tiny_model)  # .pt files need no safetensors
    load_model(tmp_path / "model.pt", device="cpu")


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_a_saved_checkpoint_gets_the_permissions_of_an_ordinary_file(tmp_path):
    # mkstemp makes its file readable by its owner only; the checkpoint must not stay that way.
    old = os.umask(0o022)
    try:
        path = lm.save_checkpoint(tmp_path / "ckpt.pt", lm.GPT(lm.ModelConfig(vocab_size=8, block_size=4, n_layer=1,
                                                                              n_head=1, d_model=8)))
        assert (Path(path).stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        path = lm.files.write_atomically(tmp_path / "private.txt", lambda f: f.write("x"), text=True)
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
