"""Encoding throughput, MB/s of UTF-8 text, one thread: lm's ByteBPETokenizer with GPT-2's ranks
against tiktoken (Rust) with the same ranks, pattern and special token, and Hugging Face tokenizers
(Rust) built from the same merges. lm's tokenizer is Python, but where a C compiler is found
(lm/csrc/bpe.c, compiled on first use) each pre-token met for the first time is merged in C, and
ASCII text under GPT-2's pattern, as here, is encoded in C whole (`bpe_core.TextEncoder`: one scan
for the pre-tokens, a C cache of their ids); `LM_CPU_KERNELS=0 python bench/encode_throughput.py`
measures the pure-Python path.

Measured on a 2-core Xeon on 2026-12-06, one thread: lm 49.2 MB/s, tiktoken 20.1 (2.45x); before the
whole-text encoder 12.3 against 20.5 (0.60x); with LM_CPU_KERNELS=0 10.3 against 21.2 (0.49x).

The text is the whole Shakespeare corpus (~5.06M characters), encoded in one call with special
tokens off (`encode(text, allowed_special="none")` / tiktoken's `encode_ordinary`); all three
must produce the same ids. lm starts every round with an empty pre-token cache (a fresh
tokenizer), so the cache only helps with words repeated inside the text, as in real use.
Rounds alternate between the libraries; the fastest round of each counts.

    .venv/bin/python bench/encode_throughput.py [--rounds 3] [--pattern gpt4] [--corpus pydoc] [--paragraphs | --lines]
    .venv/bin/python bench/encode_throughput.py --decode

`--decode` times the way back instead: the corpus's ids (one list) to text, `decode` against tiktoken's, in MB/s
of the text; since 2026-12-06 a list of ids is decoded in C (`bpe_core.NativeDecoder`).

`--paragraphs` encodes the corpus as its paragraphs (split at blank lines; Shakespeare has 39,685, 127 characters
on average), one `encode` / `encode_ordinary` call each, as a dataset of short documents is encoded: there the cost
of a call counts as much as the scan. `--lines` goes further: every non-empty line one call (Shakespeare has
146,593, 33 characters on average), where what a call costs around the scan is most of the time.

`--pattern gpt4` measures GPT-4's pre-tokenizer (cl100k's pattern, `lm.tokenizers.GPT4_PATTERN`) with the
same GPT-2 ranks on both sides (the pattern is what changes the work; cl100k's own ranks would need a
download), also whole in C since 2026-12-06; Hugging Face tokenizers is left out there (its GPT-2
pre-tokenizer is GPT-2's pattern). `--corpus pydoc` encodes lm's other corpus (465 KB of Python's documentation,
with 575 characters past ASCII: accented letters, symbols, typographic quotes), which since 2026-12-06 goes to C
whole too (the C scan takes Unicode's classes from `regex`); before, a text that was not all ASCII went to C in
blocks, or not at all.

Ends with one JSON line: {"bench", "unit", "lm", "peer", "peer_name", "speedup"}; speedup =
lm MB/s / tiktoken MB/s, so > 1 means lm encodes faster.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["RAYON_RS_NUM_CPUS"] = "1"

import argparse
import gc
import time

import tiktoken

import lm
from _report import report
from lm.tokenizers import GPT2_PATTERN, GPT2_SPECIAL_TOKENS, GPT4_PATTERN, load_gpt2_ranks
from lm.tokenizers.bpe import ByteBPETokenizer


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as Hugging Face's vocab files use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_gpt2(ours: ByteBPETokenizer):
    """A Hugging Face byte-level BPE with GPT-2's vocabulary, from lm's tokens and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = gpt2_byte_chars()

    def show(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {show(token): i for i, token in enumerate(ours.vocab)}
    merges = [(show(ours.vocab[a]), show(ours.vocab[b])) for a, b in ours.merges]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own pattern
    return tokenizer


def decode_rounds(text: str, megabytes: float, ids: list[int], reference, tok, args) -> None:
    """`--decode`: the ids back to the text, lm against tiktoken, the fastest of --rounds each."""
    rates = {"lm": [], "tiktoken": []}
    for _ in range(args.rounds):
        for name, decode in (("lm", tok.decode), ("tiktoken", reference.decode)):
            start = time.perf_counter()
            back = decode(ids)
            rates[name].append(megabytes / (time.perf_counter() - start))
            assert back == text, f"{name} does not give the text back"
    print(f"{megabytes:.2f} MB of {args.corpus}, {len(ids):,} ids decoded in one call, the same text from both")
    for name, values in rates.items():
        print(f"{name:14s} {max(values):7.2f} MB/s  (rounds: {[round(v, 1) for v in values]})")
    report(f"decode_{args.corpus}", "MB/s", max(rates["lm"]), max(rates["tiktoken"]), "tiktoken (1 thread)",
           higher_is_better=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--corpus", choices=["shakespeare", "pydoc"], default="shakespeare",
                        help="lm's corpus to encode (default: shakespeare)")
    parser.add_argument("--paragraphs", action="store_true", help="one call per paragraph instead of one in all")
    parser.add_argument("--lines", action="store_true", help="one call per non-empty line instead of one in all")
    parser.add_argument("--decode", action="store_true", help="time decoding the corpus's ids instead")
    parser.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2",
                        help="the pre-tokenizer's pattern, GPT-2's ranks either way (default: gpt2)")
    args = parser.parse_args()

    text = lm.load_corpus(args.corpus)
    megabytes = len(text.encode("utf-8")) / 1e6
    pattern = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}[args.pattern]
    ranks = load_gpt2_ranks()
    reference = tiktoken.Encoding(name=f"gpt2-ranks-{args.pattern}", pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens=GPT2_SPECIAL_TOKENS)
    parts = text.split("\n\n") if args.paragraphs else [line for line in text.split("\n") if line] if args.lines \
        else [text]
    if args.lines:  # the line breaks between them are not encoded
        megabytes = sum(len(line.encode("utf-8")) for line in parts) / 1e6
    expected = [reference.encode_ordinary(part) for part in parts]
    fresh = lambda: ByteBPETokenizer.from_tiktoken_ranks(ranks, pattern)  # noqa: E731
    try:
        hf = hf_gpt2(ByteBPETokenizer.gpt2()) if args.pattern == "gpt2" else None
    except ImportError:
        hf = None

    if args.decode:
        decode_rounds(text, megabytes, expected[0] if len(parts) == 1 else sum(expected, []), reference, fresh(),
                      args)
        return
    encoders = {
        "lm": lambda tok: [tok.encode(part, allowed_special="none") for part in parts],
        "tiktoken": lambda tok: [reference.encode_ordinary(part) for part in parts],
    }
    if hf is not None:
        encoders["hf tokenizers"] = lambda tok: [hf.encode(part, add_special_tokens=False).ids for part in parts]
    rates = {name: [] for name in encoders}
    warm = []
    for _ in range(args.rounds):
        for name, encode in encoders.items():
            tok = fresh()  # an empty cache for lm
            start = time.perf_counter()
            ids = encode(tok)
            rates[name].append(megabytes / (time.perf_counter() - start))
            assert ids == expected, f"{name} gives different ids from tiktoken"
            del ids
            gc.collect()  # the last round's lists, out of the next round's way
            if name == "lm":
                start = time.perf_counter()
                encode(tok)  # the same text again, every pre-token now cached
                warm.append(megabytes / (time.perf_counter() - start))

    print(f"{megabytes:.2f} MB of {args.corpus} in {len(parts):,} call(s), {sum(map(len, expected)):,} tokens ({args.pattern}'s pattern), same ids from "
          f"every library")
    for name, values in rates.items():
        print(f"{name:14s} {max(values):6.2f} MB/s  (rounds: {[round(v, 2) for v in values]})")
    print(f"{'lm, warm cache':14s} {max(warm):6.2f} MB/s  (the same text again)")
    ours, peer = max(rates["lm"]), max(rates["tiktoken"])
    report(f"encode_{args.pattern}_{args.corpus}" + ("_paragraphs" if args.paragraphs else "_lines" if args.lines else ""), "MB/s", ours, peer, "tiktoken (1 thread)", higher_is_better=True)


if __name__ == "__main__":
    main()
