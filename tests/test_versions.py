"""Versions: lm's own (SemVer, one number in two places, the CHANGELOG) and the checkpoint format's
(older files load, through the converters in lm.checkpoint.UPGRADES; newer ones are refused clearly).

tests/data/checkpoint_v1*.pt were written by lm 0.1.0 (commit af674e8), before format version 2; see
tests/data/README.md. They must load with every later lm of major version 0."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import lm
import lm.checkpoint
from lm import CheckpointError, load_checkpoint, load_model, save_checkpoint
from lm.checkpoint import checksums, convert_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
V1_FILES = [DATA / "checkpoint_v1.pt", DATA / "checkpoint_v1_no_checksums.pt"]
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")


# ---- lm's version ------------------------------------------------------------------------------------
def pyproject_version() -> str:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_the_version_is_semver_and_the_same_in_both_places():
    assert SEMVER.fullmatch(lm.__version__), lm.__version__
    assert pyproject_version() == lm.__version__, "bump lm/version.py and pyproject.toml together"


def test_the_changelog_has_the_current_version_and_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"(?m)^## \[([^\]]+)\]", changelog)
    assert releases[0] == "Unreleased"
    assert lm.__version__ in releases, f"CHANGELOG.md has no section for {lm.__version__}"
    assert all(SEMVER.fullmatch(v) for v in releases[1:]), releases
    assert releases[1:] == sorted(releases[1:], key=lm.checkpoint.version_numbers, reverse=True)  # newest first


@pytest.mark.parametrize("text, numbers", [("0.1.0", (0, 1, 0)), ("12.3.45.dev0", (12, 3, 45)),
                                           ("unknown", None), (None, None), ("1.2", None)])
def test_version_numbers(text, numbers):
    assert lm.checkpoint.version_numbers(text) == numbers


# ---- checkpoints record it ----------------------------------------------------------------------------
def test_every_checkpoint_records_the_lm_that_wrote_it(tmp_path, tiny_model):
    for name in ("a.pt", "a.safetensors"):
        ckpt = load_checkpoint(save_checkpoint(tmp_path / name, tiny_model))
        assert ckpt["lm_version"] == lm.__version__ and ckpt["version"] == lm.checkpoint.VERSION == 2
        assert "upgraded_from" not in ckpt and "checksums" in ckpt


# ---- version-1 files, as lm 0.1.0 wrote them -------------------------------------------------------------
@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.name)
def test_stored_version_1_checkpoints_load_upgraded(path):
    raw = torch.load(path, weights_only=True)  # the file as it is: version 1, no lm_version
    assert raw["version"] == 1 and "lm_version" not in raw
    assert ("checksums" in raw) == (path.name == "checkpoint_v1.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["version"] == lm.checkpoint.VERSION and ckpt["upgraded_from"] == 1
    assert ckpt["lm_version"] == "unknown"
    assert ckpt["step"] == 3 and ckpt["train_config"] == {"lr": 0.001}
    assert ckpt["model"].keys() == raw["model"].keys()
    assert all(torch.equal(ckpt["model"][name], raw["model"][name]) for name in raw["model"])


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.name)
def test_stored_version_1_checkpoints_give_the_model_they_held(path):
    raw = torch.load(path, weights_only=True)
    model = load_model(path, device="cpu")
    state = model.state_dict()
    assert all(torch.equal(state[name], raw["model"][name]) for name in raw["model"])
    assert model.lm_head.weight is model.tok_emb.weight
    expected = json.loads((DATA / "checkpoint_v1_logits.json").read_text())  # computed by lm 0.1.0
    ids = model.tokenizer.encode(expected["text"])
    assert ids == expected["ids"]
    logits = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-6)


def test_a_flipped_byte_in_a_version_1_file_with_checksums_is_still_caught(tmp_path):
    raw = bytearray(V1_FILES[0].read_bytes())
    weight = torch.load(V1_FILES[0], weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
    raw[raw.find(weight.numpy().tobytes()) + 10] ^= 0x40
    (tmp_path / "old.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"old.pt.*corrupt.*blocks\.0\.attn\.qkv\.weight"):
        load_model(tmp_path / "old.pt", device="cpu")


def test_a_version_2_file_without_checksums_is_refused(tmp_path):
    """The gap version 2 closes: with the key damaged, a file must not pass for an old, unchecked one."""
    ckpt = torch.load(V1_FILES[0], weights_only=True)
    ckpt["version"], ckpt["lm_version"] = 2, lm.__version__
    ckpt["checksumz"] = ckpt.pop("checksums")
    torch.save(ckpt, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "damaged.pt", device="cpu")
    message = str(err.value)
    assert "damaged.pt" in message and "corrupt" in message and "no 'checksums' entry" in message
    assert "lm.checkpoint.checksums(ckpt)" in message  # what to do after an edit on purpose


def test_convert_checkpoint_rewrites_a_version_1_file_in_the_current_format(tmp_path):
    for source in V1_FILES:
        for target in ("new.pt", "new.safetensors"):
            path = convert_checkpoint(source, tmp_path / target)
            ckpt = load_checkpoint(path)
            assert ckpt["version"] == lm.checkpoint.VERSION and "upgraded_from" not in ckpt
            assert ckpt["lm_version"] == lm.__version__ and "checksums" in ckpt
            old, new = load_model(source, device="cpu"), load_model(path, device="cpu")
            assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_converting_to_safetensors_leaves_the_optimizer_state_out(tmp_path, tiny_model):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    tiny_model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    source = save_checkpoint(tmp_path / "last.pt", tiny_model, optimizer=optimizer, step=9)
    ckpt = load_checkpoint(convert_checkpoint(source, tmp_path / "model.safetensors"))
    assert ckpt["optimizer"] is None and ckpt["step"] == 9
    assert load_checkpoint(source)["optimizer"] is not None  # the source is untouched


# ---- the converters ------------------------------------------------------------------------------------
@pytest.fixture
def version_3(monkeypatch):
    """This lm as if its checkpoint format were at version 3, with a converter from 2 that renames an entry."""
    monkeypatch.setattr(lm.checkpoint, "VERSION", 3)
    monkeypatch.setattr(lm.checkpoint, "UPGRADES", dict(lm.checkpoint.UPGRADES))
    calls = []

    @lm.checkpoint.upgrade_from(2)
    def rename_step(ckpt: dict) -> dict:
        calls.append(ckpt["version"])
        ckpt["steps_done"] = ckpt.pop("step")
        return ckpt

    return calls


def test_converters_run_in_order_from_the_files_version(version_3, tmp_path, tiny_model):
    calls = version_3
    ckpt = load_checkpoint(V1_FILES[1])
    assert calls == [2] and ckpt["version"] == 3 and ckpt["upgraded_from"] == 1
    assert ckpt["lm_version"] == "unknown" and ckpt["steps_done"] == 3  # 1 -> 2, then 2 -> 3
    assert load_model(V1_FILES[0], device="cpu").tokenizer is not None


def test_a_converter_is_registered_once(version_3):
    with pytest.raises(ValueError, match="from checkpoint version 2 is registered already: rename_step"):
        lm.checkpoint.upgrade_from(2)(lambda ckpt: ckpt)


def test_a_missing_converter_is_named(monkeypatch):
    monkeypatch.setattr(lm.checkpoint, "VERSION", 3)  # no converter from 2 to 3
    with pytest.raises(CheckpointError, match=r"checkpoint_v1.pt.*version 2, which this lm cannot convert to "
                                              r"version 3"):
        load_checkpoint(V1_FILES[0])


def test_a_newer_checkpoint_is_refused_naming_the_lm_that_wrote_it(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "future.pt", tiny_model, extra={"version": 3, "lm_version": "1.4.0"})
    with pytest.raises(CheckpointError, match=r"future.pt.*version 3, written by lm '1.4.0'.*up to 2: upgrade lm"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, None, True])
def test_a_version_that_is_not_a_number_from_1_is_corrupt(tmp_path, tiny_model, version):
    path = save_checkpoint(tmp_path / "odd.pt", tiny_model, extra={"version": version})
    with pytest.raises(CheckpointError, match=r"odd.pt.*corrupt.*checkpoint version is"):
        load_checkpoint(path)


# ---- config fields across minor versions ----------------------------------------------------------------
def edited(source: Path, target: Path, edit) -> Path:
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    if "checksums" in ckpt:
        ckpt["checksums"] = checksums(ckpt)
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize("source", V1_FILES, ids=lambda p: p.name)
def test_a_config_without_a_later_field_gets_its_default(tmp_path, source):
    """As if written before `window` and `gradient_checkpointing` existed: minor versions add fields
    with defaults, and ModelConfig.from_dict fills them in."""
    def drop_fields(ckpt):
        del ckpt["config"]["window"], ckpt["config"]["gradient_checkpointing"]

    model = load_model(edited(source, tmp_path / "older.pt", drop_fields), device="cpu")
    assert model.config.window is None and model.config.gradient_checkpointing is False
    assert model.config == load_model(source, device="cpu").config


def test_a_config_field_from_a_newer_lm_is_named_with_that_lm(tmp_path):
    def from_the_future(ckpt):
        ckpt["config"]["attention_sinks"] = 4
        ckpt["version"], ckpt["lm_version"] = 2, "0.9.0"

    path = edited(V1_FILES[0], tmp_path / "newer.pt", from_the_future)
    with pytest.raises(CheckpointError) as err:
        load_model(path, device="cpu")
    message = str(err.value)
    assert "newer.pt" in message and "attention_sinks" in message
    assert f"written by lm 0.9.0, newer than this lm {lm.__version__}: upgrade lm" in message
