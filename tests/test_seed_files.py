"""The seeds' own files and commands, as the write-ups in /work/shared/seeds/ give them, run with lm:
their config files load (through lm.config.ALIASES) to the configs they describe, their command
lines parse and run, and what lm cannot honour gets a message that names it and says what to do."""

from __future__ import annotations

import dataclasses
import math
import shlex
import warnings

import pytest
import torch
import yaml

import lm
from lm.cli import _check_tokenizer, _read_sections, build_parser, cmd_train_settings, main, model_settings
from lm.config import ALIASES, ConfigError, ConfigWarning, alias_table, canonical_settings
from lm.generation import Decoder, Generation, GenerationConfig, stop_token_ids
from lm.sampling import SamplingError

# ---- the seeds' files, verbatim ---------------------------------------------------------------------
# Seed 000 (roketmodel), "Configuration Reference": configs/model.yaml
SEED_000_YAML = """\
model:
  d_model: 512
  n_layers: 8
  n_heads: 8
  d_ff: 2048
  dropout: 0.1
  max_len: 1024
  pos_encoding: "learned"   # or "sinusoidal"
  layer_norm: "pre"
  init: "xavier_uniform"
  vocab: "char"
"""

# Seed 001 (nanoGPT GPT-2), "Model Configuration" and "Training Configuration"
SEED_001_GPTCONFIG = """\
GPTConfig(
    block_size=1024,      # Maximum sequence length
    vocab_size=50257,     # GPT-2 vocabulary size
    n_layer=12,           # Number of transformer blocks
    n_head=12,            # Number of attention heads
    n_embd=768,           # Embedding dimension
    dropout=0.0,          # Dropout rate (inference)
    bias=True             # Use bias in linear layers
)
"""
SEED_001_TRAINING = """\
batch_size = 2           # Small batch for limited data
block_size = 128         # Sequence length per example
max_iters = 1000         # Maximum training steps
learning_rate = 3e-4     # AdamW learning rate
dropout = 0.1            # Regularization during training
"""

# Seed 002 (RSCaLM), "How to Train", steps 4, 5 and 7
SEED_002_TRAIN = """\
python standalone_transformer_lm.py train \\
  --out_dir ./runs/lm138 \\
  --data_dir ./data \\
  --seq_len 1024 \\
  --batch_size 16 \\
  --grad_accum_steps 4 \\
  --n_layer 12 --n_head 12 --d_model 768 --ffn_mult 4 \\
  --max_steps 200000 --warmup_steps 2000 --lr 6e-4 \\
  --weight_decay 0.1 --dropout 0.0 --compile 1
"""
SEED_002_TORCHRUN = """\
torchrun --nproc_per_node=2 standalone_transformer_lm.py train \\
  --out_dir ./runs/lm138_ddp \\
  --data_dir ./data \\
  --seq_len 1024 \\
  --batch_size 16 \\
  --grad_accum_steps 2 \\
  --n_layer 12 --n_head 12 --d_model 768 --ffn_mult 4 \\
  --max_steps 200000 --warmup_steps 2000 --lr 6e-4 \\
  --weight_decay 0.1 --dropout 0.0 --compile 1
"""
SEED_002_GENERATE = """\
python standalone_transformer_lm.py generate \\
  --ckpt ./runs/lm138/ckpt_last.pt \\
  --spm ./data/tokenizer.model \\
  --prompt "The sun is" \\
  --max_new_tokens 50
"""

# Seed 003 (the modular GPT), "Configuration": its YAML file, flat (no sections)
SEED_003_YAML = """\
# Model dimensions
n_embd: 256          # Embedding dimension
num_heads: 8         # Number of attention heads
n_layers: 6          # Number of transformer blocks
vocab_size: 64       # Vocabulary size (updated dynamically)
block_size: 256      # Maximum sequence length
dropout: 0.1         # Dropout rate

# Component selection
attention_type: flash_attention
attention_class: FlashAttention

ffn_type: ff_swiglu
ffn_class: GatedFeedForward

norm_type: rmsnorm
norm_class: RMSNorm

pos_type: sinusoidal
"""

# Seed 004 (Optimus Prime), "Model Configuration": config.py
SEED_004_CONFIG_PY = '''\
@dataclass
class ModelConfig:
    """Configuration for model architecture."""
    vocab_size: int = 50257  # GPT-2 tokenizer vocabulary size
    dim: int = 1024
    depth: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    checkpointing: bool = True

@dataclass
class TrainingConfig:
    """Configuration for model training."""
    # Training parameters
    batch_size: int = 8
    max_length: int = 512
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_epochs: int = 5
    train_val_split: float = 0.9
    gradient_clip_val: float = 1.0

    # Dataset parameters
    dataset_name: str = "databricks/databricks-dolly-15k"
    dataset_size: int = 1000
    num_workers: int = 4

    # Paths
    checkpoint_dir: str = "checkpoints"
    tensorboard_dir: str = "runs"
'''


def seed_004_configs() -> tuple[dict, dict]:
    """Seed 004's two dataclasses, run as written, as dicts."""
    namespace = {"dataclass": dataclasses.dataclass}
    exec(SEED_004_CONFIG_PY, namespace)
    return dataclasses.asdict(namespace["ModelConfig"]()), dataclasses.asdict(namespace["TrainingConfig"]())


def lm_argv(command: str) -> list[str]:
    """A seed's shell command as the argv of `lm`: everything after the script's name."""
    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index("standalone_transformer_lm.py") + 1:]


def write(path, text: str):
    path.write_text(text)
    return path


# ---- seed 000 ---------------------------------------------------------------------------------------
SEED_000_MODEL = dict(d_model=512, n_layer=8, n_head=8, d_ff=2048, dropout=0.1, block_size=1024, pos="learned",
                      norm_position="pre", init="xavier_uniform")


def test_seed_000_model_section_loads_and_vocab_is_named_as_the_tokenizers():
    section = yaml.safe_load(SEED_000_YAML)["model"]
    with pytest.warns(ConfigWarning, match=r"vocab='char' is ignored: the tokenizer .*lm prep --tokenizer char"):
        config = lm.ModelConfig.from_dict(section)
    assert config == lm.ModelConfig(**SEED_000_MODEL)
    preset = lm.PRESETS["roketmodel"]
    assert {k: preset[k] for k in SEED_000_MODEL} == SEED_000_MODEL  # the file is the preset's source
    sinusoidal = lm.ModelConfig.from_dict({**{k: v for k, v in section.items() if k != "vocab"},
                                           "pos_encoding": "sinusoidal"})
    assert sinusoidal.pos == "sinusoidal"


def test_seed_000_config_in_lm_train_checks_vocab_against_the_data(tmp_path, char_data, capsys):
    config = write(tmp_path / "model.yaml", SEED_000_YAML)
    sections = _read_sections(str(config))
    assert sections == {"model": {**SEED_000_MODEL}, "tokenizer": "char"}
    assert capsys.readouterr().err == ""  # vocab: char is checked, not ignored, so no warning
    _check_tokenizer("char", lm.load_tokenizer(char_data / "tokenizer.json"), char_data)
    args = build_parser().parse_args(["train", "--data_dir", str(char_data), "--out_dir", "o", "--config", str(config)])
    assert lm.ModelConfig.from_dict(model_settings(args, sections, vocab_size=40)) == lm.ModelConfig(
        **SEED_000_MODEL, vocab_size=40)

    wrong = write(tmp_path / "bpe.yaml", SEED_000_YAML.replace('vocab: "char"', "vocab: sentencepiece"))
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(tmp_path / "r"), "--config", str(wrong),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "vocab: sentencepiece" in err and "prepared with the char tokenizer" in err
    assert "lm prep --tokenizer sentencepiece" in err and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=r"vocab='words' is not a tokenizer lm prep makes; give one of char"):
        _check_tokenizer("words", lm.load_tokenizer(char_data / "tokenizer.json"), char_data)


def test_seed_000_layer_norm_is_where_the_norm_goes_not_which():
    assert lm.ModelConfig.from_dict({"layer_norm": "post"}).norm_position == "post"
    with pytest.raises(ConfigError, match=r"layer_norm='rmsnorm' cannot be translated to lm's norm_position: give "
                                          r"post, pre \(lm's\)\. Note: .*the kind of norm is lm's `norm`"):
        lm.ModelConfig.from_dict({"layer_norm": "rmsnorm"})


# ---- seed 001 ---------------------------------------------------------------------------------------
def test_seed_001_gptconfig_and_training_configuration_load():
    config = lm.ModelConfig.from_dict(eval(SEED_001_GPTCONFIG, {"GPTConfig": dict}))
    gpt2 = lm.preset("gpt2-124m")
    assert (config.block_size, config.vocab_size, config.n_layer, config.n_head, config.d_model, config.bias) == (
        gpt2.block_size, gpt2.vocab_size, gpt2.n_layer, gpt2.n_head, gpt2.d_model, gpt2.bias)

    settings: dict = {}
    exec(SEED_001_TRAINING, {}, settings)
    train = lm.TrainConfig.from_dict({k: settings[k] for k in ("batch_size", "max_iters", "learning_rate")})
    assert (train.batch_size, train.max_steps, train.lr) == (2, 1000, 3e-4)


def test_seed_001_training_configuration_as_a_flat_file(tmp_path):
    settings: dict = {}
    exec(SEED_001_TRAINING, {}, settings)
    config = write(tmp_path / "train.yaml", yaml.safe_dump(settings))
    assert _read_sections(str(config)) == {"model": {"block_size": 128, "dropout": 0.1},
                                           "train": {"batch_size": 2, "max_steps": 1000, "lr": 3e-4}}


# ---- seed 002 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, grad_accum", [(SEED_002_TRAIN, 4), (SEED_002_TORCHRUN, 2)])
def test_seed_002_train_commands_give_the_run_they_describe(command, grad_accum):
    args = build_parser().parse_args(lm_argv(command))
    model = lm.ModelConfig.from_dict(model_settings(args, {}, vocab_size=32000))
    assert model == lm.ModelConfig(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, d_model=768, d_ff=3072)
    train = lm.TrainConfig.from_dict(cmd_train_settings(args, {}, saved=None))
    assert (train.seq_len, train.batch_size, train.grad_accum_steps, train.max_steps, train.warmup_steps) == (
        1024, 16, grad_accum, 200000, 2000)
    assert (train.lr, train.weight_decay, train.compile, train.epochs) == (6e-4, 0.1, True, None)


@pytest.mark.parametrize("verb", ["train", "finetune"])
@pytest.mark.parametrize("words, expected", [
    ([], None), (["--compile"], True), (["--compile", "1"], True), (["--compile", "0"], False),
    (["--compile", "true"], True), (["--compile", "false"], False), (["--compile", "True"], True),
    (["--compile", "yes"], True), (["--compile", "no"], False),
])
def test_compile_takes_true_and_false_in_every_form(verb, words, expected):
    required = ["--init_from", "x.pt", "--data", "d.jsonl"] if verb == "finetune" else ["--data_dir", "d"]
    args = build_parser().parse_args([verb, *required, "--out_dir", "o", *words])
    assert args.compile is expected


@pytest.mark.parametrize("words, expected", [([], False), (["--compile"], True), (["--compile", "false"], False),
                                             (["--compile", "1"], True), (["--compile", "--stream"], True)])
def test_generate_compile_takes_true_and_false_and_stands_alone(words, expected):
    args = build_parser().parse_args(["generate", "--ckpt", "x.pt", *words])
    assert args.compile is expected


def test_a_compile_value_that_is_not_true_or_false_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data_dir", "d", "--out_dir", "o", "--compile", "maybe"])
    assert exit_.value.code == 2
    assert "argument --compile: 'maybe' is neither true nor false; give true or false" in capsys.readouterr().err


def test_seed_002_generate_with_spm(tmp_path, sp_run, capsys):
    """The seed's command with its paths pointed at a tiny run: --spm provides the tokenizer of a
    checkpoint saved without one, and replaces the checkpoint's own."""
    ckpt, spm_file, model = sp_run
    argv = lm_argv(SEED_002_GENERATE.replace("./runs/lm138/ckpt_last.pt", str(ckpt))
                   .replace("./data/tokenizer.model", str(spm_file)))
    argv[argv.index("--max_new_tokens") + 1] = "12"
    assert main([*argv, "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == "The sun is" + model.generate("The sun is", max_new_tokens=12, temperature=0.8, seed=0) + "\n"
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "The sun is", "--device", "cpu"]) == 2
    assert "the model has no tokenizer" in capsys.readouterr().err  # without --spm there is none


def test_spm_of_another_vocabulary_size_is_refused(tmp_path, sp_run, capsys):
    ckpt, _, _ = sp_run
    other = tmp_path / "other.model"
    lm.SentencePieceTokenizer.train(SP_TEXT, 300).save_model(other)
    assert main(["generate", "--ckpt", str(ckpt), "--spm", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--spm {other} has 300 pieces, but the checkpoint's model has 360 token ids" in err
    assert "give the tokenizer.model it was trained with" in err
    assert main(["generate", "--ckpt", str(ckpt), "--spm", str(tmp_path / "none.model"), "--device", "cpu"]) == 2
    assert "none.model' does not exist" in capsys.readouterr().err


def test_spm_unlike_the_checkpoints_tokenizer_is_used_with_a_warning(tmp_path, sp_run, capsys):
    ckpt, spm_file, model = sp_run
    with_tokenizer = tmp_path / "with.pt"
    other = lm.SentencePieceTokenizer.train(SP_TEXT.upper(), 360)
    lm.save_checkpoint(with_tokenizer, lm.GPT(model.config, tokenizer=other))
    assert main(["generate", "--ckpt", str(with_tokenizer), "--spm", str(spm_file), "--prompt", "The",
                 "--max_new_tokens", "3", "--device", "cpu"]) == 0
    assert "is not the tokenizer saved in the checkpoint (sentencepiece, 360 tokens)" in capsys.readouterr().err


# ---- seed 000's inference flags: --compile false --fp16 false, --dtype ---------------------------------
def test_seed_000_cpu_flags(char_run, capsys):
    base = ["generate", "--ckpt", str(char_run), "--prompt", "the", "--max_new_tokens", "8", "--seed", "0",
            "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--compile", "false", "--fp16", "false"]) == 0  # the seed's FAQ, as written
    assert capsys.readouterr().out == plain
    assert main([*base, "--dtype", "float32", "--fp16", "false"]) == 0  # the same thing twice
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("flags, dtype", [(["--dtype", "float16"], torch.float16), (["--fp16"], torch.float16),
                                          (["--fp16", "true"], torch.float16),
                                          (["--dtype", "bfloat16"], torch.bfloat16)])
def test_generate_casts_the_model_for_inference_on_cpu(char_run, capsys, monkeypatch, flags, dtype):
    loaded = []
    load = lm.cli.load_for_inference
    monkeypatch.setattr(lm.cli, "load_for_inference", lambda args: loaded.append(load(args)) or loaded[-1])
    assert main(["generate", "--ckpt", str(char_run), "--prompt", "the", "--max_new_tokens", "6", "--seed", "0",
                 "--device", "cpu", *flags]) == 0
    assert {p.dtype for p in loaded[0].parameters()} == {dtype}
    out = capsys.readouterr().out
    assert out.startswith("the") and len(out) > len("the\n")


def test_dtype_and_fp16_that_disagree_are_refused(char_run, capsys):
    assert main(["generate", "--ckpt", str(char_run), "--dtype", "bfloat16", "--fp16", "true", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bfloat16 and --fp16 true disagree" in err and "--fp16 true is --dtype float16" in err
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(char_run), "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_chat_takes_dtype_flags():
    args = build_parser().parse_args(["chat", "--ckpt", "x.pt", "--fp16", "false", "--dtype", "float32"])
    assert (args.fp16, args.dtype) == (False, "float32")


# ---- seed 003 ---------------------------------------------------------------------------------------
SEED_003_MODEL = dict(d_model=256, n_head=8, n_layer=6, vocab_size=64, block_size=256, dropout=0.1,
                      attention="sdpa", ffn="swiglu", norm="rmsnorm", pos="sinusoidal")


def test_seed_003_flat_yaml_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the file is honoured: no warning
        config = lm.ModelConfig.from_yaml(SEED_003_YAML)
    assert config == lm.ModelConfig(**SEED_003_MODEL)
    preset = lm.PRESETS["modular-gpt"]
    assert {k: preset[k] for k in SEED_003_MODEL} == SEED_003_MODEL


def test_seed_003_flat_file_trains_with_lm_train(tmp_path, char_data):
    config = write(tmp_path / "gpt.yaml", SEED_003_YAML)
    assert _read_sections(str(config)) == {"model": {k: v for k, v in SEED_003_MODEL.items()}, "train": {}}
    out = tmp_path / "r"  # the file's model, narrowed by flags to run in a moment
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(out), "--config", str(config),
                 "--n_layer", "1", "--d_model", "32", "--n_head", "2", "--block_size", "16", "--batch_size", "2",
                 "--max_steps", "2", "--eval_iters", "1", "--no_progress", "--device", "cpu"]) == 0
    saved = lm.load_checkpoint(out / "last.pt")["config"]
    assert {k: saved[k] for k in ("attention", "ffn", "norm", "pos", "dropout")} == {
        "attention": "sdpa", "ffn": "swiglu", "norm": "rmsnorm", "pos": "sinusoidal", "dropout": 0.1}
    assert saved["vocab_size"] == lm.load_tokenizer(char_data / "tokenizer.json").vocab_size  # "updated dynamically"


@pytest.mark.parametrize("changes, field, value", [
    ({"attention_type": "linear_attention", "attention_class": "LinearAttention"}, "attention", "linear"),
    ({"attention_type": "local_window", "attention_class": None, "window": 32}, "attention", "sliding_window"),
    ({"attention_type": None, "attention_class": "FlashAttention"}, "attention", "sdpa"),  # a class alone names it
    ({"attention_type": "manual", "attention_class": None}, "attention", "manual"),  # lm's own names work too
    ({"norm_type": "layernorm", "norm_class": "LayerNorm"}, "norm", "layernorm"),
    ({"norm_type": "scalenorm", "norm_class": "ScaleNorm"}, "norm", "scalenorm"),
    ({"ffn_type": "moe", "ffn_class": None}, "ffn", "moe"),
    ({"pos_type": "learned"}, "pos", "learned"),
])
def test_seed_003_component_choices(changes, field, value):
    data = {**yaml.safe_load(SEED_003_YAML), **changes}
    config = lm.ModelConfig.from_dict({k: v for k, v in data.items() if v is not None})
    assert getattr(config, field) == value


@pytest.mark.parametrize("changes, message", [
    ({"attention_class": "LinearAttention"},
     r"attention_type='flash_attention' and attention_class='LinearAttention' disagree: both set lm's attention "
     r"\('sdpa' and 'linear'\)"),
    ({"norm_class": "LayerNorm"}, r"norm_type='rmsnorm' and norm_class='LayerNorm' disagree"),
    ({"ffn_class": "FeedForward"},
     r"ffn_class='FeedForward' cannot be translated to lm's ffn: give GatedFeedForward \(the seed's names\) or "
     r"gelu, .*swiglu \(lm's\)"),
    ({"attention_type": "flash"},
     r"attention_type='flash' cannot be translated to lm's attention: give flash_attention, linear_attention, "
     r"local_window \(the seed's names\) or block_sparse, linear, manual, sdpa, sliding_window \(lm's\)"),
    ({"attention_type": "local_window", "attention_class": "LocalWindowAttention"},
     r"attention='sliding_window' needs window="),
    ({"n_layer": 3}, r"n_layers=6 and n_layer=3 disagree: both set lm's n_layer"),
    ({"d_model": 128}, r"n_embd=256 and d_model=128 disagree"),
])
def test_seed_003_settings_that_disagree_or_are_unknown_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        lm.ModelConfig.from_dict({**yaml.safe_load(SEED_003_YAML), **changes})


def test_an_alias_and_lms_name_that_agree_are_fine():
    assert lm.ModelConfig.from_dict({"n_layers": 3, "n_layer": 3, "dim": 64, "n_embd": 64}).d_model == 64


# ---- seed 004 ---------------------------------------------------------------------------------------
IGNORED_004 = ("train_val_split", "dataset_name", "dataset_size", "num_workers", "tensorboard_dir")


def test_seed_004_model_and_training_configs_load():
    model, training = seed_004_configs()
    config = lm.ModelConfig.from_dict(model)
    assert (config.vocab_size, config.d_model, config.n_layer, config.n_head, config.n_kv_heads,
            config.gradient_checkpointing) == (50257, 1024, 8, 8, 2, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = lm.TrainConfig.from_dict(training)
    assert train == lm.TrainConfig(batch_size=8, seq_len=512, lr=1e-4, weight_decay=0.01, epochs=5, grad_clip=1.0,
                                   out_dir="checkpoints")
    assert train.max_steps is None  # the Trainer counts the steps of 5 epochs
    messages = [str(w.message) for w in caught]
    assert all(issubclass(w.category, ConfigWarning) for w in caught)
    assert [m.split("=")[0] for m in messages] == list(IGNORED_004)  # each named, in the file's order
    assert "lm prep --val_fraction" in messages[0] and "lm finetune --data FILE.jsonl" in messages[1]


def test_seed_004_as_one_flat_file_for_lm_train(tmp_path, capsys):
    model, training = seed_004_configs()
    config = write(tmp_path / "optimus.yaml", yaml.safe_dump({**model, **training}, sort_keys=False))
    sections = _read_sections(str(config))
    err = capsys.readouterr().err
    assert [line.split(": ")[3].split("=")[0] for line in err.splitlines()] == list(IGNORED_004)
    assert all(line.startswith(f"lm train: warning: --config {config}: ") for line in err.splitlines())
    assert sections["train"] == {"batch_size": 8, "seq_len": 512, "lr": 1e-4, "weight_decay": 0.01, "epochs": 5,
                                 "grad_clip": 1.0, "out_dir": "checkpoints"}
    args = build_parser().parse_args(["train", "--data_dir", "d", "--out_dir", "o", "--config", str(config)])
    built = lm.ModelConfig.from_dict(model_settings(args, sections, vocab_size=50257))
    assert built.block_size == 512  # max_length sizes a fresh model, as --seq_len does
    assert (built.d_model, built.n_layer, built.n_kv_heads) == (1024, 8, 2)
    train = lm.TrainConfig.from_dict(cmd_train_settings(args, sections, saved=None))
    assert (train.epochs, train.max_steps, train.out_dir) == (5, None, "o")  # --out_dir comes first


def test_epochs_become_steps(corpus_ids):
    model = lm.GPT(lm.ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16))
    trainer = lm.trainer.Trainer(model, corpus_ids, corpus_ids,
                                 lm.TrainConfig(epochs=1.5, batch_size=4, grad_accum_steps=2, progress=False))
    windows = (len(corpus_ids) - 1) // 16
    assert trainer.config.max_steps == math.ceil(1.5 * windows / 8) and trainer.config.epochs is None
    assert trainer.config.sampling == "epoch"  # "auto": each window once per epoch
    assert lm.trainer.Trainer(model, corpus_ids, corpus_ids, lm.TrainConfig(progress=False)).config.sampling == "random"
    random_epochs = lm.TrainConfig(epochs=1.5, batch_size=4, grad_accum_steps=2, sampling="random", progress=False)
    assert lm.trainer.Trainer(model, corpus_ids, corpus_ids, random_epochs).config.max_steps == trainer.config.max_steps


@pytest.mark.parametrize("settings, message", [
    (dict(max_steps=10, epochs=2), r"max_steps=10 and epochs=2 both say how long to train; give one of them"),
    (dict(epochs=0), r"epochs=0 must be a number > 0"),
    (dict(epochs="5"), r"epochs='5' must be a number"),
])
def test_bad_epochs_are_named(settings, message):
    with pytest.raises(lm.TrainingError, match=message):
        lm.TrainConfig(**settings)


def test_lm_train_epochs(tmp_path, char_data, capsys):
    out = tmp_path / "r"
    flags = ["--n_layer", "1", "--d_model", "16", "--n_head", "2", "--block_size", "16", "--batch_size", "8",
             "--eval_interval", "100", "--eval_iters", "1", "--no_progress", "--device", "cpu"]
    vocab_size = lm.load_tokenizer(char_data / "tokenizer.json").vocab_size
    train_tokens = len(lm.data.read_tokens(char_data / "train.bin", vocab_size))
    steps = math.ceil(2 * ((train_tokens - 1) // 16) / 8)
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(out), "--epochs", "2", *flags]) == 0
    assert f"--epochs 2: {steps} steps of 8 sequences of 16 tokens" in capsys.readouterr().out
    ckpt = lm.load_checkpoint(out / "last.pt")
    assert ckpt["step"] == steps and ckpt["train_config"]["max_steps"] == steps
    assert ckpt["train_config"]["epochs"] is None and ckpt["trainer"]["batches"]["epoch"] == 2
    # the same command again: 2 epochs are done
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(out), "--epochs", "2", *flags]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # both at once is an error; a later layer's max_steps replaces an earlier layer's epochs
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(tmp_path / "x"), "--epochs", "2",
                 "--max_steps", "5", *flags]) == 2
    assert "max_steps=5 and epochs=2.0 both say how long to train" in capsys.readouterr().err
    config = write(tmp_path / "e.yaml", "train:\n  num_epochs: 3\n")
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(tmp_path / "y"), "--config", str(config),
                 "--max_steps", "2", *flags]) == 0
    assert lm.load_checkpoint(tmp_path / "y" / "last.pt")["step"] == 2


# ---- stop_tokens by name (seed 000: stop_tokens=["<EOS>"]) --------------------------------------------
def test_stop_tokens_by_name(char_tokenizer):
    model = lm.GPT(lm.ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2,
                                  d_model=16), tokenizer=char_tokenizer).eval()
    sep = char_tokenizer.special_tokens["<SEP>"]
    prompt = torch.tensor([char_tokenizer.encode("the")])
    free = model.generate(prompt, max_new_tokens=200, temperature=2.0, seed=1)[0, 3:].tolist()
    assert sep in free  # high temperature: every token turns up
    stopped = model.generate(prompt, max_new_tokens=200, temperature=2.0, seed=1, stop_tokens=["<SEP>"])
    assert stopped[0, 3:].tolist() == free[:free.index(sep) + 1]  # the same draws, up to <SEP>
    by_id = model.generate(prompt, max_new_tokens=200, temperature=2.0, seed=1, stop_tokens=[sep])
    assert torch.equal(stopped, by_id)
    run = Generation(Decoder(model), "the", GenerationConfig(stop_tokens=("<SEP>", 7)), None)
    assert run.stop_id_set == {sep, 7, char_tokenizer.eos_id}
    # seed 000's call, as written
    text = model.generate("define the short", max_new_tokens=20, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                          stop_tokens=["<EOS>"])
    assert isinstance(text, str)


def test_an_unknown_stop_token_name_lists_the_special_tokens(char_tokenizer):
    model = lm.GPT(lm.ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                                  d_model=16), tokenizer=char_tokenizer)
    with pytest.raises(SamplingError, match=r"stop_tokens: '<END>' is not a special token of this model's tokenizer; "
                                            r"its special tokens are: <PAD>, <BOS>, <EOS>, <SEP>, <UNK>\. .*"
                                            r"use stop=\['<END>'\]"):
        model.generate("the", max_new_tokens=3, stop_tokens=["<END>"])
    with pytest.raises(SamplingError, match=r"its special tokens are: none \(the model has no tokenizer\)"):
        stop_token_ids(["<EOS>"], None)
    assert stop_token_ids(["<EOS>", 9], char_tokenizer) == [char_tokenizer.eos_id, 9]
    assert GenerationConfig(stop_tokens="<EOS>").stop_tokens == ("<EOS>",)
    for bad in ([""], [1.5], [-1]):
        with pytest.raises(SamplingError, match=r"must be a list of token ids .* or names of special tokens"):
            GenerationConfig(stop_tokens=bad)


# ---- the alias table itself ---------------------------------------------------------------------------
def test_every_alias_names_a_real_setting_and_real_values():
    model_fields = {f.name for f in dataclasses.fields(lm.ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(lm.TrainConfig)}
    choices = lm.ModelConfig.component_choices()
    for name, alias in ALIASES.items():
        assert name not in model_fields | train_fields, f"{name} is lm's own name"
        assert alias.section in ("model", "train") and alias.seeds
        if alias.field is None:
            assert alias.note, f"{name}: say where it belongs"
            continue
        assert alias.field in (model_fields if alias.section == "model" else train_fields)
        for value in alias.values.values():
            assert value in choices[alias.field]


def test_alias_table_is_a_markdown_table_of_every_alias():
    lines = alias_table().splitlines()
    assert lines[0] == "| name | seeds | lm setting | values, notes |" and lines[1] == "|---|---|---|---|"
    assert len(lines) == 2 + len(ALIASES)
    assert all(line.count(" | ") == 3 for line in lines[2:])
    assert "| `attention_type` | 003 | `model.attention` | `flash_attention` → `sdpa`," in alias_table()
    assert "| `vocab` | 000 | ignored, with a warning |" in alias_table()


def test_settings_in_the_wrong_section_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'learning_rate' is a train setting \(lm's lr\), not a model one"):
        lm.ModelConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(lm.TrainingError, match=r"'dropout' is a model setting \(lm's dropout\), not a train one"):
        lm.TrainConfig.from_dict({"dropout": 0.1})
    assert canonical_settings({"lr": 1.0}, "train") == {"lr": 1.0}
    config = write(tmp_path / "c.yaml", "model:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match=r"'lr' is a train setting; move it into the 'train' section"):
        _read_sections(str(config))


def test_config_files_that_mix_or_misspell_are_named(tmp_path):
    mixed = write(tmp_path / "m.yaml", "model:\n  n_layer: 2\nlr: 0.1\n")
    with pytest.raises(ValueError, match=r"has both sections \(model\) and settings outside them \(lr\)"):
        _read_sections(str(mixed))
    typo = write(tmp_path / "t.yaml", "n_embed: 64\n")
    with pytest.raises(ValueError, match=r"'n_embed' is not a setting lm knows; did you mean 'n_embd'\?"):
        _read_sections(str(typo))
    disagree = write(tmp_path / "d.yaml", "dim: 64\nn_embd: 32\n")
    with pytest.raises(ConfigError, match=rf"--config {disagree}: dim=64 and n_embd=32 disagree"):
        _read_sections(str(disagree))


# ---- fixtures -----------------------------------------------------------------------------------------
SP_TEXT = "".join(f"The sun is up {i % 5} times. The quick brown fox jumps over the lazy dog {i}.\n"
                  for i in range(120))


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path_factory.mktemp("char-data")
    assert main(["prep", "--corpus", str(corpus), "--out_dir", str(out), "--val_fraction", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("char-run")
    assert main(["train", "--data_dir", str(char_data), "--out_dir", str(out), "--n_layer", "1", "--d_model", "16",
                 "--n_head", "2", "--block_size", "16", "--batch_size", "4", "--max_steps", "2", "--eval_iters", "1",
                 "--no_progress", "--device", "cpu"]) == 0
    return out / "last.pt"


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    """A tiny model saved without a tokenizer, the SentencePiece model it goes with, and the model
    with that tokenizer attached."""
    folder = tmp_path_factory.mktemp("sp")
    tokenizer = lm.SentencePieceTokenizer.train(SP_TEXT, 360)
    tokenizer.save_model(folder / "tokenizer.model")
    torch.manual_seed(0)
    model = lm.GPT(lm.ModelConfig(vocab_size=360, block_size=32, n_layer=1, n_head=2, d_model=16))
    lm.save_checkpoint(folder / "ckpt_last.pt", model)
    model.tokenizer = tokenizer
    return folder / "ckpt_last.pt", folder / "tokenizer.model", model.eval()


@pytest.fixture
def corpus_ids():
    return torch.randint(0, 64, (1000,))
