"""BPE training as the corpus grows: seconds and peak memory of lm's ByteBPETokenizer trained from a
FILE of 5, 50 and 500 MB (10,000-token vocabulary), against sentencepiece (BPE, one thread) on the
5 MB file.

The corpora are written to a temporary folder from Shakespeare (offline): copy k of the text has
one word in 50 given a suffix that depends on k, so new rare words keep appearing as the corpus
grows (as in real text, where the number of distinct words grows without bound, only slower
than the text). Each size trains in a fresh process, so that its peak RSS is its own:
`ByteBPETokenizer.train(Path(file), 10_000, processes=...)` reads the file in blocks and counts
pre-tokens as it goes, so memory holds the distinct pre-tokens and their counts, not the corpus.
"peak RSS" is the training process's (VmHWM), "after import" its peak before training started
(lm imports torch), "worker RSS" the largest peak of its counting workers (sampled every 50 ms).

    .venv/bin/python bench/bpe_scaling.py [--sizes 5 50 500] [--processes 0] [--peer_sizes 5]

`--processes`: the counting processes lm uses (0, the default: lm's default, one per CPU).
Ends with one JSON line: {"bench", "unit", "lm", "peer", "peer_name", "speedup"} for the smallest
size that both ran (seconds; speedup = sentencepiece seconds / lm seconds); the table before it
shows every size, and the seconds per MB show whether time grows linearly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

MB = 1_000_000


def write_corpus(path: Path, megabytes: int, base: str) -> None:
    """`megabytes` MB of Shakespeare-like text: copies of `base`, one word in 50 varied per copy."""
    words = base.split(" ")
    target, written, k = megabytes * MB, 0, 0
    with open(path, "w", encoding="utf-8", newline="") as file:
        while written < target:
            suffix = "".join(chr(ord("a") + int(d)) for d in str(k))  # copy 12 -> "bc"
            varied = list(words)
            varied[k % 50 :: 50] = [w + suffix for w in words[k % 50 :: 50]]
            text = " ".join(varied)[: target - written]
            file.write(text)
            written += len(text.encode("utf-8"))
            k += 1


def peak_mib(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM, Linux), MiB. Unlike getrusage's ru_maxrss it
    starts afresh at exec, so a child does not inherit the peak of the process that started it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class WorkerWatch:
    """Samples the peak memory of this process's children (the counting workers) every 50 ms."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._stop.wait(0.05):
            for worker in me.children():
                self.peak = max(self.peak, peak_mib(worker.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(kind: str, path: str, vocab_size: int, processes: int) -> None:
    """Train once in this (fresh) process and print one JSON line with seconds and peak memory.
    lm's import (torch included, ~300 MiB) happens before the clock and the memory baseline."""
    if kind == "lm":
        from lm.tokenizers.bpe import ByteBPETokenizer
    else:
        import io

        import sentencepiece as spm
    baseline = peak_mib()
    watch = WorkerWatch()
    start = time.perf_counter()
    if kind == "lm":
        tok = ByteBPETokenizer.train(Path(path), vocab_size, special_tokens=("<|endoftext|>",),
                                     processes=processes or None)
        assert tok.vocab_size == vocab_size
    else:
        spm.SentencePieceTrainer.train(
            input=path, model_writer=io.BytesIO(), vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, num_threads=1, minloglevel=2, max_sentence_length=1 << 20,
            input_sentence_size=0, train_extremely_large_corpus=True,
        )
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(), "baseline_mib": baseline,
                      "worker_mib": watch.stop()}))


def run_child(kind: str, path: Path, vocab_size: int, processes: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), "--vocab_size", str(vocab_size),
                          "--processes", str(processes)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} on {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 50, 500], help="corpus sizes in MB")
    parser.add_argument("--peer_sizes", type=int, nargs="*", default=[5], help="sizes sentencepiece also trains on")
    parser.add_argument("--processes", type=int, default=0, help="lm's counting processes (0: lm's default)")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.vocab_size, args.processes)

    import lm
    from lm.tokenizers.bpe import cpu_count

    base = lm.load_corpus("shakespeare")
    used = (f"{args.processes} process(es)" if args.processes else
            f"lm's default (processes=None: one per CPU ({cpu_count()}) from 16M characters on, else 1)")
    print(f"vocabulary {args.vocab_size:,}; lm counts pre-tokens in {used}; sentencepiece: one thread")
    print(f"{'size':>8} {'trainer':14} {'seconds':>8} {'s/MB':>7} {'peak RSS':>10} {'after import':>13} "
          f"{'worker RSS':>11}")
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(args.sizes):
            path = Path(tmp) / f"corpus_{size}mb.txt"
            write_corpus(path, size, base)
            kinds = ["lm"] + (["sentencepiece"] if size in args.peer_sizes else [])
            for kind in kinds:
                result = results[kind, size] = run_child(kind, path, args.vocab_size, args.processes)
                workers = f"{result['worker_mib']:.0f} MiB" if result["worker_mib"] else "-"
                print(f"{size:>5} MB {kind:14} {result['seconds']:8.2f} {result['seconds'] / size:7.3f} "
                      f"{result['peak_mib']:6.0f} MiB {result['baseline_mib']:9.0f} MiB {workers:>11}", flush=True)
            path.unlink()
    both = [size for size in sorted(args.sizes) if ("sentencepiece", size) in results]
    if not both:
        raise SystemExit("sentencepiece ran on no size; give --peer_sizes one of --sizes for the JSON line.")
    size = both[0]
    report(f"bpe_train_file_{size}mb_10k", "s", results["lm", size]["seconds"],
           results["sentencepiece", size]["seconds"], "sentencepiece bpe (1 thread)", higher_is_better=False)


if __name__ == "__main__":
    main()
