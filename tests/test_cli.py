from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm
import lm.files
from lm.cli import _read_sections, build_parser, cmd_train_settings, main
from lm.data import read_tokens

VERBS = ("prep", "train", "finetune", "eval", "generate", "chat", "serve", "import", "export", "convert")
ROOT = Path(__file__).resolve().parent.parent
TRAIN_FLAGS = ["--max_steps", "20", "--n_layer", "1", "--d_model", "32", "--n_head", "2", "--block_size", "16",
               "--batch_size", "4", "--eval_interval", "10", "--no_progress", "--device", "cpu"]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


# ---- parser ----------------------------------------------------------------------------------------
def test_python_dash_m_help():
    result = run_cli(sys.executable, "-m", "lm", "--help")
    assert result.returncode == 0, result.stderr
    for verb in VERBS:
        assert verb in result.stdout


def test_installed_script():
    script = shutil.which("lm", path=str(Path(sys.executable).parent)) or shutil.which("lm")
    if script is None:
        pytest.skip("the lm console script is not installed")
    result = run_cli(script, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lm {lm.__version__}"


def test_verbs_have_help(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        assert exit_.value.code == 0
        assert f"usage: lm {verb}" in capsys.readouterr().out


def test_every_option_has_help_text():
    parser = build_parser()
    verbs = subparsers(parser)
    assert sorted(verbs) == sorted(VERBS)
    checked = 0
    for name, sub in [("lm", parser), *verbs.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
            checked += 1
    assert checked > 25


def test_no_verb_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


@pytest.mark.parametrize("bad, hint", [("--max_stepz", "--max_steps"), ("--max-steps", "--max_steps"),
                                       ("--learning_rate", None), ("--n_layers", "--n_layer")])
def test_bad_flag(capsys, bad, hint):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data_dir", "d", "--out_dir", "r", bad, "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and bad in err
    if hint:
        assert f"did you mean {hint}?" in err
    else:
        assert "did you mean" not in err


def test_bad_flag_value(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--ckpt", "x.pt", "--max_new_tokens", "many"])
    assert exit_.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


# ---- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert main(["prep", "--corpus", str(corpus_file), "--out_dir", str(out), "--val_fraction", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> Path:
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(runs), *TRAIN_FLAGS]) == 0
    return runs


def test_prep_writes_token_files(prepared, corpus_file):
    text = corpus_file.read_text(encoding="utf-8")
    assert sorted(p.name for p in prepared.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    tok = lm.load_tokenizer(prepared / "tokenizer.json")
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["vocab_size"] == tok.vocab_size and meta["characters"] == len(text)
    train_ids = read_tokens(prepared / "train.bin", tok.vocab_size)
    val_ids = read_tokens(prepared / "val.bin", tok.vocab_size)
    assert len(train_ids) == meta["train_tokens"] and len(val_ids) == meta["val_tokens"]
    assert tok.decode(list(train_ids) + list(val_ids)) == text
    assert len(val_ids) == int(0.2 * len(text))


def test_train_writes_checkpoints(trained, prepared):
    assert {"best.pt", "last.pt", "config.yaml"} <= {p.name for p in trained.iterdir()}
    last = lm.load_checkpoint(trained / "last.pt")
    assert last["step"] == 20
    config = lm.ModelConfig.from_dict(last["config"])
    assert (config.n_layer, config.d_model, config.n_head, config.block_size) == (1, 32, 2, 16)
    assert config.vocab_size == lm.load_tokenizer(prepared / "tokenizer.json").vocab_size
    assert last["train_config"]["batch_size"] == 4 and last["train_config"]["eval_interval"] == 10
    assert last["train_config"]["seq_len"] is None  # whole blocks
    import yaml
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert lm.ModelConfig.from_dict(saved["model"]) == config
    assert saved["train"] == last["train_config"] and saved["train"]["precision"] == "fp32"  # auto, resolved


def test_generate_prints_text(trained, capsys):
    capsys.readouterr()
    args = ["generate", "--ckpt", str(trained / "best.pt"), "--prompt", "To be", "--max_new_tokens", "10",
            "--seed", "0", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("To be") and len(first.rstrip("\n")) > len("To be")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    model = lm.load_model(trained / "best.pt", device="cpu")
    expected = model.generate("To be", max_new_tokens=10, temperature=0.8, seed=0)
    assert first == "To be" + expected + "\n"


def test_generate_compile_off_cuda_is_a_clear_error(trained, capsys):
    args = ["generate", "--ckpt", str(trained / "best.pt"), "--max_new_tokens", "3", "--device", "cpu"]
    assert main(args + ["--no_cuda_graph"]) == 0  # on a CPU the graph is off anyway
    capsys.readouterr()
    assert main(args + ["--compile"]) == 2
    assert "compile=True compiles the CUDA-graph decoding step" in capsys.readouterr().err


def test_train_resumes_in_an_existing_out_dir(tmp_path, prepared, capsys):
    out = tmp_path / "r"
    args = ["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS]
    args[args.index("--max_steps") + 1] = "10"
    assert main(args) == 0
    first = lm.load_checkpoint(out / "last.pt")
    capsys.readouterr()
    args[args.index("--max_steps") + 1] = "20"  # seed 002's way: the same command with more steps
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    last = lm.load_checkpoint(out / "last.pt")
    assert last["step"] == 20 and last["train_config"]["max_steps"] == 20
    assert last["trainer"]["history"]["loss"][:10] == first["trainer"]["history"]["loss"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 20  # a header and one row per step, none twice


def test_resume_with_nothing_left_to_do(trained, prepared, capsys):
    before = (trained / "last.pt").read_bytes()
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(trained), *TRAIN_FLAGS]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (trained / "last.pt").read_bytes() == before


def test_resume_refuses_another_model(trained, prepared, capsys):
    before = (trained / "last.pt").read_bytes()
    flags = [*TRAIN_FLAGS, "--max_steps", "30"]
    flags[flags.index("--n_layer") + 1] = "2"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(trained), *flags]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another model (n_layer: checkpoint 1, now 2)" in err and "--overwrite" in err
    assert (trained / "last.pt").read_bytes() == before


def test_train_overwrite(tmp_path, prepared, capsys):
    out = tmp_path / "r"
    args = ["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS]
    args[args.index("--max_steps") + 1] = "5"
    assert main(args) == 0
    args[args.index("--max_steps") + 1] = "7"
    assert main([*args, "--overwrite"]) == 0
    last = lm.load_checkpoint(out / "last.pt")
    assert last["step"] == 7 and last["trainer"]["history"]["step"] == list(range(7))


def test_train_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert main(["train", "--data_dir", str(missing), "--out_dir", str(tmp_path / "r"), *TRAIN_FLAGS]) == 2
    message = capsys.readouterr().err
    assert "no tokenizer.json" in message and "lm prep" in message and str(missing) in message


def test_train_takes_seed_002_flags(tmp_path, prepared):
    """RSCaLM's training command, shrunk: every flag it uses is accepted and lands in the run. Its
    --seq_len, above the default block size of 128, sizes the model too."""
    out = tmp_path / "r"
    assert main(["train", "--out_dir", str(out), "--data_dir", str(prepared), "--seq_len", "160",
                 "--batch_size", "2", "--grad_accum_steps", "2", "--n_layer", "1", "--n_head", "2",
                 "--d_model", "32", "--ffn_mult", "2", "--max_steps", "4", "--warmup_steps", "1", "--lr", "6e-4",
                 "--weight_decay", "0.1", "--dropout", "0.0", "--compile", "0", "--eval_interval", "4",
                 "--no_progress", "--device", "cpu"]) == 0
    ckpt = lm.load_checkpoint(out / "last.pt")
    tc, mc = ckpt["train_config"], ckpt["config"]
    assert (tc["batch_size"], tc["grad_accum_steps"], tc["warmup_steps"], tc["lr"], tc["compile"]) == (2, 2, 1, 6e-4, False)
    assert (mc["d_ff"], mc["block_size"], mc["n_layer"], tc["seq_len"]) == (64, 160, 1, 160)
    assert tc["precision"] == "fp32"  # auto on a CPU
    assert ckpt["trainer"]["history"]["tokens"] == 4 * 2 * 2 * 160


def test_block_size_is_the_model_and_seq_len_the_window(tmp_path, prepared):
    out = tmp_path / "r"
    flags = [f for f in TRAIN_FLAGS if f not in ("--block_size", "16")]
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), *flags, "--max_steps", "3",
                 "--block_size", "64", "--seq_len", "32"]) == 0
    ckpt = lm.load_checkpoint(out / "last.pt")
    assert ckpt["config"]["block_size"] == 64 and ckpt["train_config"]["seq_len"] == 32
    assert ckpt["trainer"]["history"]["tokens"] == 3 * 4 * 32  # steps x batch x window
    small = tmp_path / "small"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(small), *flags, "--max_steps", "1",
                 "--seq_len", "32"]) == 0  # below the default block size: the model keeps 128
    ckpt = lm.load_checkpoint(small / "last.pt")
    assert ckpt["config"]["block_size"] == 128 and ckpt["train_config"]["seq_len"] == 32


@pytest.mark.parametrize("argv, expected", [([], None), (["--compile"], 1), (["--compile", "1"], 1),
                                            (["--compile", "0"], 0)])
def test_compile_flag_forms(argv, expected):
    args = build_parser().parse_args(["train", "--data_dir", "d", "--out_dir", "o", *argv])
    assert args.compile == expected


def test_training_features_from_flags(tmp_path, prepared):
    out = tmp_path / "r"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS, "--precision", "bf16",
                 "--ema_decay", "0.9", "--sampling", "epoch", "--patience", "1", "--min_delta", "10",
                 "--eval_interval", "5"]) == 0
    ckpt = lm.load_checkpoint(out / "last.pt")
    assert ckpt["ema"] is not None and ckpt["trainer"]["batches"]["mode"] == "epoch"
    history = ckpt["trainer"]["history"]
    assert history["stopped_early"] and history["step"][-1] == 9  # no drop of 10 in val loss: stop at once


def test_train_with_config_file(tmp_path, prepared):
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  n_layer: 1\n  d_model: 24\n  n_head: 3\n  block_size: 12\n"
                      "train:\n  max_steps: 4\n  eval_iters: 2\n")
    out = tmp_path / "r"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), "--config", str(config),
                 "--seq_len", "8", "--batch_size", "2", "--n_head", "2", "--no_progress", "--device", "cpu"]) == 0
    ckpt = lm.load_checkpoint(out / "last.pt")
    assert (ckpt["config"]["d_model"], ckpt["config"]["n_head"], ckpt["config"]["block_size"]) == (24, 2, 12)
    assert ckpt["train_config"]["seq_len"] == 8
    assert ckpt["step"] == 4 and ckpt["train_config"]["eval_iters"] == 2


EVERY_TRAIN_SETTING = {  # none at its default
    "max_steps": 7, "batch_size": 3, "memory_budget": 2**30, "grad_accum_steps": 2, "seq_len": 12, "lr": 2e-3,
    "min_lr": 1e-4, "warmup_steps": 5, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9, "grad_clip": 0.5,
    "eval_interval": 3, "eval_iters": 4, "patience": 2, "min_delta": 0.01, "precision": "bf16", "ema_decay": 0.99,
    "compile": True, "sampling": "epoch", "parallel": "fsdp", "fsdp_units": "block", "seed": 5, "tensorboard": True,
    "progress": False,
}


def test_every_train_setting_in_a_config_file_is_honoured(tmp_path):
    import yaml

    # epochs says what max_steps says, another way: the two are never given together
    assert set(EVERY_TRAIN_SETTING) == {f.name for f in dataclasses.fields(lm.TrainConfig)} - {"out_dir", "epochs"}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"train": EVERY_TRAIN_SETTING}))
    out = str(tmp_path / "r")
    args = build_parser().parse_args(["train", "--data_dir", "d", "--out_dir", out, "--config", str(config)])
    sections = _read_sections(args.config)
    expected = lm.TrainConfig(**EVERY_TRAIN_SETTING, out_dir=out)
    assert lm.TrainConfig.from_dict(cmd_train_settings(args, sections, saved=None)) == expected
    resumed = {"train": {**EVERY_TRAIN_SETTING, "precision": "fp32", "lr": 1.0, "progress": True}}
    assert lm.TrainConfig.from_dict(cmd_train_settings(args, sections, saved=resumed)) == expected  # the file wins
    flags = build_parser().parse_args(["train", "--data_dir", "d", "--out_dir", out, "--config", str(config),
                                       "--precision", "fp16", "--lr", "0.1"])
    settings = cmd_train_settings(flags, sections, saved=None)  # and flags win over the file
    assert (settings["precision"], settings["lr"]) == ("fp16", 0.1)
    by_epochs = {**EVERY_TRAIN_SETTING, "max_steps": None, "epochs": 2.5}
    config.write_text(yaml.safe_dump({"train": by_epochs}))
    expected = lm.TrainConfig(**by_epochs, out_dir=out)
    assert lm.TrainConfig.from_dict(cmd_train_settings(args, _read_sections(args.config), saved=None)) == expected


def test_config_file_numbers_in_exponent_form(tmp_path):
    """YAML 1.1 (PyYAML) reads 3e-4 as text; lm reads it as the number everyone means."""
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  lr: 3e-4\n  min_lr: 1E-5\n  seed: 12\nmodel:\n")
    assert _read_sections(str(config)) == {"train": {"lr": 3e-4, "min_lr": 1e-5, "seed": 12}, "model": {}}


def test_precision_from_a_config_file_on_a_fresh_run(tmp_path, prepared):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  precision: bf16\n  max_steps: 2\n")
    flags = [f for f in TRAIN_FLAGS if f not in ("--max_steps", "20")]
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(tmp_path / "r"), "--config", str(config),
                 *flags]) == 0
    ckpt = lm.load_checkpoint(tmp_path / "r" / "last.pt")
    assert ckpt["train_config"]["precision"] == "bf16" and ckpt["step"] == 2


@pytest.mark.parametrize("flags, named", [(["--grad_clip", "nan"], "grad_clip=nan"), (["--lr", "inf"], "lr=inf"),
                                          (["--dropout", "nan"], "dropout=nan")])
def test_settings_that_are_not_finite_are_refused(tmp_path, prepared, capsys, flags, named):
    out = tmp_path / "r"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm train: error:") and named in err and "finite" in err
    assert not (out / "last.pt").exists()


def test_an_output_path_through_a_file_is_one_line_not_a_traceback(tmp_path, prepared, corpus_file, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(blocker), "--max_steps", "1",
                 "--no_progress"]) == 1
    assert main(["prep", "--corpus", str(corpus_file), "--out_dir", str(blocker / "data")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("is a file; choose another path" in line for line in err)
    assert err[0].startswith("lm train: error:") and err[1].startswith("lm prep: error:")


def test_a_full_disk_is_one_line(prepared, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(lm.files, "write_atomically", full)
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(tmp_path / "run"), "--max_steps", "1",
                 "--no_progress"]) == 1
    assert "the disk is full" in capsys.readouterr().err


def test_train_refuses_an_out_dir_in_use(tmp_path, prepared, capsys):
    from helpers import hold_lock_in_a_thread

    out = tmp_path / "r"
    let_go = hold_lock_in_a_thread(out)
    try:
        assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS]) == 2
    finally:
        let_go()
    err = capsys.readouterr().err
    assert f"{out} is in use by another training run: pid {os.getpid()} on" in err
    assert not (out / "config.yaml").exists()


def test_train_from_a_preset_with_component_flags(tmp_path, prepared):
    out = tmp_path / "r"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), "--preset", "modular-gpt",
                 "--n_layer", "1", "--d_model", "32", "--n_head", "4", "--n_kv_heads", "2", "--block_size", "8",
                 "--batch_size", "2", "--max_steps", "3", "--eval_interval", "3", "--no_progress",
                 "--device", "cpu"]) == 0
    config = lm.load_checkpoint(out / "last.pt")["config"]
    expected = {**lm.PRESETS["modular-gpt"], "n_layer": 1, "d_model": 32, "n_head": 4, "n_kv_heads": 2,
                "block_size": 8, "vocab_size": lm.load_tokenizer(prepared / "tokenizer.json").vocab_size}
    assert {key: config[key] for key in expected} == expected


def test_component_flags_change_the_default_model(tmp_path, prepared):
    out = tmp_path / "r"
    args = ["train", "--data_dir", str(prepared), "--out_dir", str(out), *TRAIN_FLAGS,
            "--pos", "rope", "--norm", "rmsnorm", "--ffn", "swiglu", "--attention", "sliding_window", "--window", "4"]
    assert main(args) == 0
    config = lm.load_checkpoint(out / "last.pt")["config"]
    assert (config["pos"], config["norm"], config["ffn"], config["attention"], config["window"]) == (
        "rope", "rmsnorm", "swiglu", "sliding_window", 4)


def test_unknown_preset_and_component_are_clear_errors(tmp_path, prepared, capsys):
    base = ["train", "--data_dir", str(prepared), "--out_dir", str(tmp_path / "r"), *TRAIN_FLAGS]
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--preset", "gpt5"])
    assert exit_.value.code == 2 and "invalid choice: 'gpt5'" in capsys.readouterr().err
    assert main(base + ["--norm", "batchnorm"]) == 2
    err = capsys.readouterr().err
    assert "batchnorm" in err and "rmsnorm" in err


def test_bad_settings_are_reported_not_raised(tmp_path, prepared, capsys):
    args = ["train", "--data_dir", str(prepared), "--out_dir", str(tmp_path / "r"), *TRAIN_FLAGS]
    args[args.index("--n_head") + 1] = "5"  # 32 is not divisible by 5
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm train: error:") and "n_head=5" in err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "none.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lm generate: error:" in err and "does not exist" in err


def test_prep_unknown_corpus(tmp_path, capsys):
    assert main(["prep", "--corpus", "no-such-corpus", "--out_dir", str(tmp_path / "d")]) == 2
    assert "unknown corpus 'no-such-corpus'" in capsys.readouterr().err


# ---- prep --tokenizer / --vocab_size ---------------------------------------------------------------
SP_TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times.\n" for i in range(120))


def prep_and_check(out: Path, corpus: Path, *flags: str) -> tuple[lm.Tokenizer, dict]:
    """Run `lm prep` and check what every tokenizer must give: the token files decode to the corpus."""
    assert main(["prep", "--corpus", str(corpus), "--out_dir", str(out), "--val_fraction", "0.2", *flags]) == 0
    tok = lm.load_tokenizer(out / "tokenizer.json")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer_kind"] == tok.kind
    train_ids = read_tokens(out / "train.bin", tok.vocab_size)
    val_ids = read_tokens(out / "val.bin", tok.vocab_size)
    assert train_ids.dtype == "uint16"
    assert (len(train_ids), len(val_ids)) == (meta["train_tokens"], meta["val_tokens"])
    assert tok.decode([*train_ids.tolist(), *val_ids.tolist()]) == corpus.read_text(encoding="utf-8")
    return tok, meta


@pytest.fixture(scope="module")
def sp_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp-corpus") / "corpus.txt"
    path.write_text(SP_TEXT, encoding="utf-8")
    return path


def test_prep_help_names_the_tokenizers(capsys):
    with pytest.raises(SystemExit):
        main(["prep", "--help"])
    out = capsys.readouterr().out
    assert "--tokenizer {char,sentencepiece,gpt2,bpe}" in out and "--vocab_size" in out


def test_prep_default_is_char(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert (meta["tokenizer"], meta["tokenizer_kind"]) == ("char", "char")


def test_prep_unknown_tokenizer(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prep", "--out_dir", str(tmp_path), "--tokenizer", "wordpiece"])
    assert exit_.value.code == 2
    assert "invalid choice: 'wordpiece'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["char", "gpt2"])
def test_prep_vocab_size_only_for_trained_tokenizers(tmp_path, capsys, name):
    assert main(["prep", "--out_dir", str(tmp_path / "d"), "--tokenizer", name, "--vocab_size", "500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm prep: error: --vocab_size") and f"--tokenizer {name}" in err
    assert not (tmp_path / "d").exists()


def test_prep_sentencepiece_vocab_too_large(tmp_path, sp_corpus, capsys):
    args = ["prep", "--corpus", str(sp_corpus), "--out_dir", str(tmp_path / "d"), "--tokenizer", "sentencepiece"]
    assert main(args) == 2  # the default 8000 is more than this little text can fill
    err = capsys.readouterr().err
    assert "lm prep: error: vocab_size=8000" in err and "at most" in err


def test_prep_sentencepiece_default_vocab_size(tmp_path):
    out = tmp_path / "d"
    assert main(["prep", "--corpus", "pydoc", "--out_dir", str(out), "--tokenizer", "sentencepiece"]) == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 8000


def test_prep_gpt2(tmp_path, corpus_file):
    pytest.importorskip("tiktoken")
    tok, meta = prep_and_check(tmp_path / "d", corpus_file, "--tokenizer", "gpt2")
    assert isinstance(tok, lm.tokenizers.TiktokenTokenizer)
    assert (meta["tokenizer"], meta["tokenizer_kind"], meta["vocab_size"]) == ("gpt2", "tiktoken", 50257)
    assert read_tokens(tmp_path / "d" / "train.bin", 50257)[:4].tolist() == tok.encode("To be, or")
    assert (tmp_path / "d" / "train.bin").stat().st_size == 2 * meta["train_tokens"]  # uint16


def test_prep_removes_a_stale_sentencepiece_model(tmp_path, sp_corpus):
    out = tmp_path / "d"
    prep_and_check(out, sp_corpus, "--tokenizer", "sentencepiece", "--vocab_size", "360")
    assert (out / "tokenizer.model").is_file()
    prep_and_check(out, sp_corpus, "--tokenizer", "char")
    assert not (out / "tokenizer.model").exists()


def test_prep_bpe(tmp_path, sp_corpus):
    bpe = pytest.importorskip("lm.tokenizers.bpe")
    tok, meta = prep_and_check(tmp_path / "d", sp_corpus, "--tokenizer", "bpe", "--vocab_size", "360")
    assert isinstance(tok, bpe.ByteBPETokenizer)
    assert (meta["tokenizer"], meta["vocab_size"]) == ("bpe", tok.vocab_size)


def test_sentencepiece_prep_train_generate(tmp_path, sp_corpus, capsys):
    import sentencepiece as spm

    data = tmp_path / "data"
    tok, meta = prep_and_check(data, sp_corpus, "--tokenizer", "sentencepiece", "--vocab_size", "360")
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "tokenizer.json", "tokenizer.model",
                                                      "train.bin", "val.bin"]
    assert (meta["tokenizer"], meta["vocab_size"]) == ("sentencepiece", 360)
    library = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))  # seed 002's layout
    assert library.encode(SP_TEXT) == tok.encode(SP_TEXT)
    assert (library.unk_id(), library.bos_id(), library.eos_id(), library.pad_id()) == (0, 1, 2, 3)

    runs = tmp_path / "runs"
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--max_steps") + 1] = "10"
    assert main(["train", "--data_dir", str(data), "--out_dir", str(runs), *flags]) == 0
    ckpt = lm.load_checkpoint(runs / "last.pt")
    assert ckpt["step"] == 10 and ckpt["config"]["vocab_size"] == 360
    assert ckpt["tokenizer"]["kind"] == "sentencepiece"

    capsys.readouterr()
    assert main(["generate", "--ckpt", str(runs / "last.pt"), "--prompt", "Line 3:", "--max_new_tokens", "8",
                 "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    model = lm.load_model(runs / "last.pt", device="cpu")
    assert out == "Line 3:" + model.generate("Line 3:", max_new_tokens=8, temperature=0.8, seed=0) + "\n"


# ---- prep: documents and separators ----------------------------------------------------------------
def read_prep(out: Path) -> tuple[lm.Tokenizer, dict, list[int]]:
    """The tokenizer, meta.json and the whole packed stream (train.bin, then val.bin) of a prep."""
    tok = lm.load_tokenizer(out / "tokenizer.json")
    meta = json.loads((out / "meta.json").read_text())
    ids = [*read_tokens(out / "train.bin", tok.vocab_size).tolist(), *read_tokens(out / "val.bin", tok.vocab_size).tolist()]
    n_val = max(1, int(0.2 * len(ids)))  # the tail of the packed stream validates
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(ids) - n_val, n_val)
    return tok, meta, ids


def cut_at(ids: list[int], separator: int) -> list[list[int]]:
    pieces = [[]]
    for i in ids:
        if i == separator:
            pieces.append([])
        else:
            pieces[-1].append(i)
    return pieces


@pytest.fixture(scope="module")
def doc_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """SP_TEXT as three files, one document each."""
    folder = tmp_path_factory.mktemp("docs")
    lines = SP_TEXT.splitlines(keepends=True)
    first, second, third = "".join(lines[:40]), "".join(lines[40:80]), "".join(lines[80:])
    for name, doc in {"b.txt": first, "a.txt": second, "c.txt": third}.items():
        (folder / name).write_text(doc, encoding="utf-8")
    return folder, [second, first, third]  # files are read sorted by name


@pytest.mark.parametrize("flags, eos", [([], "<EOS>"), (["--tokenizer", "sentencepiece", "--vocab_size", "360"], "</s>"),
                                        (["--tokenizer", "bpe", "--vocab_size", "360"], "<|endoftext|>"),
                                        (["--tokenizer", "gpt2"], "<|endoftext|>")])
def test_prep_separates_documents_with_the_end_of_text_token(tmp_path, doc_folder, flags, eos):
    if "gpt2" in flags:
        pytest.importorskip("tiktoken")
    folder, docs = doc_folder
    out = tmp_path / "d"
    assert main(["prep", "--corpus", str(folder), "--out_dir", str(out), "--val_fraction", "0.2", *flags]) == 0
    tok, meta, ids = read_prep(out)
    separator = tok.special_tokens[eos]
    assert tok.eos_id == separator and meta["separator_id"] == separator
    assert (meta["documents"], meta["characters"], meta["document_split"]) == (3, len(SP_TEXT), None)
    pieces = cut_at(ids, separator)
    assert [tok.decode(piece) for piece in pieces] == docs  # exactly one separator between each two
    assert pieces == [tok.encode(doc) for doc in docs]  # each document encoded on its own


def test_prep_one_document_per_line(tmp_path):
    corpus = tmp_path / "lines.txt"
    lines = ["The first document.", "The second, longer document.", "", "Third!"]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "d"
    assert main(["prep", "--corpus", str(corpus), "--out_dir", str(out), "--val_fraction", "0.2",
                 "--documents", "line"]) == 0
    tok, meta, ids = read_prep(out)
    assert tok.decode(ids) == "<EOS>".join(line for line in lines if line)  # the separator ends a line
    assert (meta["documents"], meta["document_split"], meta["separator_id"]) == (3, "line", tok.eos_id)


def test_prep_named_corpus_has_its_own_documents(tmp_path):
    out = tmp_path / "d"
    assert main(["prep", "--corpus", "pydoc", "--out_dir", str(out), "--val_fraction", "0.2"]) == 0
    tok, meta, ids = read_prep(out)
    topics = lm.corpora.pydoc_topics()
    assert meta["documents"] == len(topics) and ids.count(tok.eos_id) == len(topics) - 1
    assert tok.decode(ids) == "<EOS>".join(topics)


@pytest.mark.parametrize("flags", [["--no_separator"], []])
@pytest.mark.parametrize("name", ["char", "bpe"])
def test_prep_one_document_is_the_whole_text(tmp_path, sp_corpus, name, flags):
    """A single document gives the token files of encoding the whole text, separator or not."""
    from lm.data import train_val_split, write_tokens

    text = sp_corpus.read_text(encoding="utf-8")
    if name == "char":
        tok = lm.CharTokenizer.train(text)
        ids = tok.encode(text, parse_special=False)
    else:
        tok = lm.ByteBPETokenizer.train(text, 360, special_tokens=("<|endoftext|>",))
        ids = tok.encode(text, allowed_special="none")
    train_ids, val_ids = train_val_split(ids, 0.2)
    out = tmp_path / "d"
    vocab = ["--vocab_size", "360"] if name == "bpe" else []
    assert main(["prep", "--corpus", str(sp_corpus), "--out_dir", str(out), "--val_fraction", "0.2",
                 "--tokenizer", name, *vocab, *flags]) == 0
    write_tokens(tmp_path / "train.bin", train_ids, tok.vocab_size)
    write_tokens(tmp_path / "val.bin", val_ids, tok.vocab_size)
    assert (out / "train.bin").read_bytes() == (tmp_path / "train.bin").read_bytes()
    assert (out / "val.bin").read_bytes() == (tmp_path / "val.bin").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 1 and meta["separator_id"] == (None if flags else tok.eos_id)


def test_prep_no_separator_puts_documents_back_to_back(tmp_path, doc_folder):
    folder, docs = doc_folder
    out = tmp_path / "d"
    assert main(["prep", "--corpus", str(folder), "--out_dir", str(out), "--val_fraction", "0.2",
                 "--no_separator"]) == 0
    tok, meta, ids = read_prep(out)
    assert tok.decode(ids) == "".join(docs) and tok.eos_id not in ids
    assert (meta["documents"], meta["separator_id"]) == (3, None)


def test_prep_tokenizer_without_end_of_text(tmp_path, corpus_file, monkeypatch, capsys):
    monkeypatch.setattr(lm.CharTokenizer, "eos_id", None)
    args = ["prep", "--corpus", str(corpus_file), "--out_dir", str(tmp_path / "d")]
    assert main(args) == 2
    assert "no end-of-text token to put between documents; pass --no_separator" in capsys.readouterr().err
    assert main([*args, "--no_separator"]) == 0


def test_prep_documents_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["prep", "--help"])
    out = capsys.readouterr().out
    assert "--documents {none,line,blank}" in out and "--no_separator" in out


def test_prep_bad_documents_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prep", "--out_dir", str(tmp_path / "d"), "--documents", "para"])
    assert exit_.value.code == 2 and "invalid choice: 'para'" in capsys.readouterr().err


def test_prep_empty_folder(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    assert main(["prep", "--corpus", str(tmp_path / "corpus"), "--out_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm prep: error:") and "holds no *.txt files" in err
    assert not (tmp_path / "d").exists()


def train_with_auto_batch(prepared, out, fits: int) -> None:
    """`lm train --batch_size auto` with a memory budget between the needs of `fits` and `fits + 1`
    sequences of the TRAIN_FLAGS model (measured with lm.memory.training_memory)."""
    from lm.memory import training_memory

    flags = list(TRAIN_FLAGS)
    flags[flags.index("--batch_size") + 1] = "auto"
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=lm.load_tokenizer(prepared / "tokenizer.json").vocab_size,
                                  block_size=16, n_layer=1, n_head=2, d_model=32))
    need = [training_memory(model, b, 16)["total"] for b in (fits, fits + 1)]
    budget = (need[0] + need[1]) / 2 / 2**30
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(out), *flags, "--max_steps", "2",
                 "--memory_budget", str(budget)]) == 0


def test_batch_size_auto_within_a_memory_budget(tmp_path, prepared, capsys):
    train_with_auto_batch(prepared, tmp_path / "r", fits=6)
    assert "--batch_size auto: 6 sequences fit" in capsys.readouterr().out
    assert lm.load_checkpoint(tmp_path / "r" / "last.pt")["train_config"]["batch_size"] == 6


def test_batch_size_auto_leaves_headroom_for_large_batches(tmp_path, prepared, capsys):
    train_with_auto_batch(prepared, tmp_path / "r", fits=16)
    assert "16 sequences fit" in capsys.readouterr().out
    assert lm.load_checkpoint(tmp_path / "r" / "last.pt")["train_config"]["batch_size"] == 14


def test_batch_size_auto_on_cpu_needs_a_budget(tmp_path, prepared, capsys):
    flags = [f for f in TRAIN_FLAGS]
    flags[flags.index("--batch_size") + 1] = "auto"
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(tmp_path / "r"), *flags]) == 2
    assert "memory_budget" in capsys.readouterr().err


def test_batch_size_must_be_a_number_or_auto(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data_dir", "d", "--out_dir", "o", "--batch_size", "lots"])
    assert "invalid batch size 'lots'" in capsys.readouterr().err


def test_generate_streams_the_same_text(trained, capsys):
    args = ["generate", "--ckpt", str(trained / "best.pt"), "--prompt", "To be", "--max_new_tokens", "15",
            "--seed", "2", "--device", "cpu", "--top_p", "0.9", "--repetition_penalty", "1.2"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_generate_int8_and_stop_text(trained, capsys):
    args = ["generate", "--ckpt", str(trained / "best.pt"), "--prompt", "To be", "--max_new_tokens", "40",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    full = capsys.readouterr().out
    assert main([*args, "--int8"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    stop = full[len("To be") + 3:][:2]
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[: full.index(stop, len("To be"))] + "\n"


def test_generate_bad_sampling_value(trained, capsys):
    args = ["generate", "--ckpt", str(trained / "best.pt"), "--top_p", "2", "--device", "cpu"]
    assert main(args) == 2
    assert "top_p" in capsys.readouterr().err


# ---- fine-tuning and evaluation --------------------------------------------------------------------
QA_WORDS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion", "bear", "wolf", "fox", "owl"]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> tuple[Path, Path]:
    """A base checkpoint whose character vocabulary covers the chat data, and that data as JSONL."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chat")
    records = [{"user": f"What is {w}?", "assistant": f"{w} has {len(w)} letters."} for w in QA_WORDS]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Context:\nHuman: {r['user']}\nAssistant: {r['assistant']}\n\n" for r in records) * 6)
    prepared = root / "data"
    assert main(["prep", "--corpus", str(corpus), "--out_dir", str(prepared)]) == 0
    base = root / "base"
    flags = [*TRAIN_FLAGS, "--block_size", "128", "--pos", "rope"]
    assert main(["train", "--data_dir", str(prepared), "--out_dir", str(base), *flags]) == 0
    return base / "best.pt", data


FT_FLAGS = ["--max_steps", "12", "--batch_size", "4", "--eval_interval", "6", "--eval_iters", "2", "--no_progress",
            "--device", "cpu", "--lr", "3e-3"]


def test_finetune_then_eval(chat_base, tmp_path, capsys):
    base, data = chat_base
    out = tmp_path / "ft"
    assert main(["finetune", "--init_from", str(base), "--data", str(data), "--out_dir", str(out), *FT_FLAGS]) == 0
    assert "done" in capsys.readouterr().out
    last = lm.load_checkpoint(out / "last.pt")
    assert last["step"] == 12 and last["train_config"]["template"] == "human"
    assert last["train_config"]["patience"] == 5 and last["train_config"]["min_delta"] == 0.001  # seed 001
    assert main(["eval", "--ckpt", str(out / "best.pt"), "--data", str(data), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == len(QA_WORDS) and 0 <= result["exact_match"] <= 1
    assert {"loss", "perplexity", "token_accuracy", "ms_per_token", "tokens_per_second"} <= set(result)
    model = lm.load_model(out / "best.pt", device="cpu")
    direct = lm.evaluate(model, lm.load_examples(data))
    assert result["loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert result["token_accuracy"] == pytest.approx(direct.token_accuracy)
    assert main(["eval", "--ckpt", str(out / "best.pt"), "--data", str(data), "--device", "cpu",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "exact match" in table and "token accuracy" in table
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(QA_WORDS)


def test_finetune_resumes_in_its_out_dir(chat_base, tmp_path, capsys):
    base, data = chat_base
    out = tmp_path / "ft"
    args = ["finetune", "--init_from", str(base), "--data", str(data), "--out_dir", str(out), *FT_FLAGS]
    assert main(args) == 0
    assert main(args) == 0  # same command again: nothing left to do
    assert "nothing to do" in capsys.readouterr().out
    assert main([*args, "--max_steps", "18"]) == 0
    assert lm.load_checkpoint(out / "last.pt")["step"] == 18


def test_finetune_bad_data_is_a_clear_error(chat_base, tmp_path, capsys):
    base, _ = chat_base
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n')
    assert main(["finetune", "--init_from", str(base), "--data", str(bad), "--out_dir", str(tmp_path / "o"),
                 *FT_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "match no format" in err and "Traceback" not in err
    assert main(["eval", "--ckpt", str(tmp_path / "missing.pt"), "--data", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rag_puts_retrieved_passages_before_each_question(chat_base, tmp_path, capsys):
    base, data = chat_base
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"{w} has {len(w)} letters.\n" for w in QA_WORDS))
    out = tmp_path / "ft"
    assert main(["finetune", "--init_from", str(base), "--data", str(data), "--out_dir", str(out), *FT_FLAGS,
                 "--rag", str(notes), "--rag_k", "2", "--rag_budget", "40"]) == 0
    capsys.readouterr()
    scores = {}
    for rag in ([], ["--rag", str(notes), "--rag_k", "1"]):
        assert main(["eval", "--ckpt", str(out / "best.pt"), "--data", str(data), "--json", "--device", "cpu",
                     *rag]) == 0
        scores[bool(rag)] = json.loads(capsys.readouterr().out)
    assert scores[True]["rag"] == str(notes) and scores[False]["rag"] is None
    assert scores[True]["examples"] == scores[False]["examples"] == len(QA_WORDS)
    assert scores[True]["loss"] != scores[False]["loss"]  # the context changed what the model read
    assert main(["eval", "--ckpt", str(out / "best.pt"), "--data", str(data), "--rag", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_generate_with_a_draft_writes_the_models_greedy_text(capsys):
    """`lm generate --draft`: speculative decoding with the shipped Shakespeare model and its draft;
    greedy, the text is the model's own; flags it cannot honour are named."""
    target, draft = lm.assets.path("shakespeare_char.pt"), lm.assets.path("shakespeare_char_draft.pt")
    args = ["generate", "--ckpt", str(target), "--draft", str(draft), "--num_draft", "3", "--prompt", "ROMEO:",
            "--max_new_tokens", "60", "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    model = lm.load_model(target, device="cpu")
    assert capsys.readouterr().out == "ROMEO:" + model.generate("ROMEO:", max_new_tokens=60, temperature=0) + "\n"
    assert main(args[:-2] + ["--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    sampled = capsys.readouterr().out
    assert main(args[:-2] + ["--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == sampled and sampled.startswith("ROMEO:")  # seeded
    assert main(args + ["--stream", "--stop", "KING"]) == 2
    err = capsys.readouterr().err
    assert "--stream, --stop cannot be combined with --draft" in err
