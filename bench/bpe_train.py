"""BPE training time, seconds: lm's ByteBPETokenizer (Python; its pre-tokens counted in C where it can) against sentencepiece and Hugging
Face tokenizers, each learning a 10,000-token vocabulary from the whole Shakespeare corpus (~5.06M
characters) on one thread.

- lm: `ByteBPETokenizer.train(text, 10_000, processes=1)`: GPT-2 pre-tokenizer, one special token,
  everything in this one process (the JSON line's figure). `--processes N` counts the pre-tokens in
  N worker processes instead (0: lm's default, which keeps a corpus this small in one process);
  the merges are always learned in one process. The output says which was used. Here, two
  workers made it slower (0.79 s against 0.65 s): starting them and piping 5 MB to them costs
  more than the counting they share (see bench/bpe_scaling.py for large files).
- sentencepiece (the JSON peer): BPE, byte_fallback, character_coverage 1.0, num_threads=1, fed
  the corpus's non-empty lines (it trains on sentences), as lm's SentencePieceTokenizer does.
- HF tokenizers: ByteLevel pre-tokenizer + BpeTrainer, RAYON_NUM_THREADS=1, fed line by line.

Each trainer runs `--rounds` times, alternating, and its fastest run counts (the machine is
shared; the minimum is the least disturbed run).

    .venv/bin/python bench/bpe_train.py [--rounds 3] [--vocab_size 10000]

Ends with one JSON line: {"bench", "unit", "lm", "peer", "peer_name", "speedup"}; speedup =
sentencepiece seconds / lm seconds, so > 1 means lm trains faster.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["RAYON_RS_NUM_CPUS"] = "1"  # the older name of the same setting

import argparse
import io
import time

import lm
from _report import report
from lm.tokenizers.bpe import ByteBPETokenizer, cpu_count


PROCESSES = 1  # set from --processes


def train_lm(text: str, lines: list[str], vocab_size: int):
    return ByteBPETokenizer.train(text, vocab_size, special_tokens=("<|endoftext|>",), processes=PROCESSES)


def train_sentencepiece(text: str, lines: list[str], vocab_size: int):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line.rstrip("\n") for line in lines if line.strip("\n")), model_writer=model,
        vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, num_threads=1, minloglevel=2,
    )
    return model


def train_hf(text: str, lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each trainer (default: 3)")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=1,
                        help="processes lm counts pre-tokens in (default 1: one thread, as the peers; 0: lm's default)")
    args = parser.parse_args()
    global PROCESSES
    PROCESSES = args.processes or None

    text = lm.load_corpus("shakespeare")
    lines = text.splitlines(keepends=True)
    trainers = {"lm": train_lm, "sentencepiece": train_sentencepiece, "hf tokenizers": train_hf}
    seconds = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, train in trainers.items():
            start = time.perf_counter()
            result = train(text, lines, args.vocab_size)
            seconds[name].append(time.perf_counter() - start)
            if name == "lm":
                assert result.vocab_size == args.vocab_size
    used = (f"{args.processes} process(es)" if args.processes else
            f"lm's default (processes=None: one per CPU ({cpu_count()}) from 16M characters on, else 1)")
    print(f"{len(text):,} characters, vocabulary {args.vocab_size:,}; peers on one thread, lm counting in {used}")
    for name, values in seconds.items():
        print(f"{name:14s} {min(values):6.2f} s  (runs: {[round(v, 2) for v in values]})")
    ours, peer = min(seconds["lm"]), min(seconds["sentencepiece"])
    name = "bpe_train_shakespeare_10k" + (f"_{args.processes}proc" if args.processes != 1 else "")
    report(name, "s", ours, peer, "sentencepiece bpe (1 thread)", higher_is_better=False)


if __name__ == "__main__":
    main()
