"""Prepared-data folders (`lm.data.write_prepared` / `check_prepared`, used by `lm prep` and
`lm train`): the files of a folder always come from one finished prep, whatever interrupts it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lm.cli import main
from lm.data import DataError, check_prepared, file_sha256, read_tokens

TRAIN_FLAGS = ["--max_steps", "2", "--n_layer", "1", "--d_model", "16", "--n_head", "2", "--block_size", "8",
               "--batch_size", "2", "--eval_interval", "2", "--eval_iters", "1", "--no_progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Two corpora with different alphabets: their character tokenizers differ."""
    folder = tmp_path_factory.mktemp("corpora")
    texts = {"a": "To be, or not to be, that is the question.\n" * 40,
             "b": "Quick zephyrs blow, vexing daft Jim! 0123456789 JUMPY\n" * 40}
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return {name: folder / f"{name}.txt" for name in texts}


def prep(out: Path, corpus: Path, *flags: str) -> None:
    assert main(["prep", "--corpus", str(corpus), "--out_dir", str(out), *flags]) == 0


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prep_records_each_files_size_and_sha256(tmp_path, corpora):
    prep(tmp_path, corpora["a"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert sorted(meta["files"]) == ["tokenizer.json", "train.bin", "val.bin"]
    for name, recorded in meta["files"].items():
        assert recorded == {"bytes": (tmp_path / name).stat().st_size, "sha256": file_sha256(tmp_path / name)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert check_prepared(tmp_path) == meta
    probe = tmp_path.parent / "probe"
    probe.write_text("")
    modes = {(tmp_path / name).stat().st_mode for name in ("train.bin", "tokenizer.json", "meta.json")}
    assert modes == {probe.stat().st_mode}  # as readable as any file written plainly


def test_a_token_file_from_another_prep_is_refused(tmp_path, corpora, capsys):
    prep(tmp_path / "a", corpora["a"])
    prep(tmp_path / "b", corpora["b"])
    shutil.copy(tmp_path / "b" / "train.bin", tmp_path / "a" / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin does not match meta\.json.*run `lm prep --out_dir"):
        check_prepared(tmp_path / "a")
    args = ["train", "--data_dir", str(tmp_path / "a"), "--out_dir", str(tmp_path / "runs"), *TRAIN_FLAGS]
    assert main(args) == 2
    assert "train.bin does not match meta.json" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_tokenizer_from_another_prep_is_refused(tmp_path, corpora):
    prep(tmp_path / "a", corpora["a"])
    prep(tmp_path / "b", corpora["b"])
    shutil.copy(tmp_path / "b" / "tokenizer.json", tmp_path / "a" / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer\.json does not match meta\.json"):
        check_prepared(tmp_path / "a")


class Interrupted(BaseException):
    """What Ctrl-C or a killed process looks like to the code it stops (not an Exception)."""


@pytest.mark.parametrize("stop_at", ["tokenizer.save", "os.replace 1", "os.replace 2", "os.replace 3",
                                     "os.replace 4"])
def test_an_interrupted_prep_never_leaves_files_of_two_runs(tmp_path, corpora, monkeypatch, stop_at):
    """Prep corpus a, then start a prep of corpus b into the same folder and stop it at some
    point: afterwards the folder is either still all of a, or refused by `check_prepared`."""
    prep(tmp_path, corpora["a"])
    before = contents(tmp_path)
    if stop_at == "tokenizer.save":
        def stop(*args, **kwargs):
            raise Interrupted
        monkeypatch.setattr("lm.tokenizers.char.CharTokenizer.save", stop)
    else:
        calls, replace = [], os.replace
        def stop(*args, **kwargs):
            calls.append(args)
            if len(calls) == int(stop_at.split()[1]):
                raise Interrupted
            return replace(*args, **kwargs)
        monkeypatch.setattr(os, "replace", stop)
    with pytest.raises(Interrupted):
        main(["prep", "--corpus", str(corpora["b"]), "--out_dir", str(tmp_path)])
    monkeypatch.undo()
    after = contents(tmp_path)  # no temporaries left behind either
    if after == before:
        check_prepared(tmp_path)
    else:
        with pytest.raises(DataError, match="did not finish|does not match"):
            check_prepared(tmp_path)
    prep(tmp_path, corpora["b"])  # and prep again mends it
    check_prepared(tmp_path)


def test_a_folder_prepared_before_the_manifest_still_trains_with_a_warning(tmp_path, corpora):
    prep(tmp_path / "data", corpora["a"])
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    del meta["files"]  # as `make data` wrote it before lm recorded hashes
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="older lm prep.*cannot be checked"):
        assert check_prepared(tmp_path / "data") == meta
    args = ["train", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"), *TRAIN_FLAGS]
    with pytest.warns(UserWarning, match="older lm prep"):
        assert main(args) == 0
    assert (tmp_path / "runs" / "last.pt").is_file()


def test_missing_files_are_named(tmp_path, corpora):
    with pytest.raises(DataError, match="no tokenizer.json; run `lm prep"):
        check_prepared(tmp_path / "nothing")
    prep(tmp_path, corpora["a"])
    (tmp_path / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin is missing"):
        check_prepared(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json: the lm prep that wrote it did not finish"):
        check_prepared(tmp_path)


def test_ids_beyond_the_vocabulary_are_named_before_training(tmp_path, corpora, capsys):
    """A token file and a tokenizer that disagree, whatever the manifest says (here, no manifest)."""
    prep(tmp_path / "a", corpora["a"])
    prep(tmp_path / "b", corpora["b"])
    for name in ("train.bin", "val.bin"):
        shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    (tmp_path / "a" / "meta.json").write_text("{}")  # an old folder: nothing to check against
    vocab_size = json.loads((tmp_path / "b" / "meta.json").read_text())["vocab_size"]
    small = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert len(small["chars"]) + 5 < vocab_size  # b's ids go beyond a's vocabulary
    with pytest.raises(DataError, match=r"holds id \d+, but the tokenizer has \d+ tokens.*run it again"):
        read_tokens(tmp_path / "a" / "train.bin", len(small["chars"]) + 5)
    args = ["train", "--data_dir", str(tmp_path / "a"), "--out_dir", str(tmp_path / "runs"), *TRAIN_FLAGS]
    with pytest.warns(UserWarning):
        assert main(args) == 2
    assert "but the tokenizer has" in capsys.readouterr().err
