"""Serving under load: aggregate tokens/s of a real `lm serve` with continuous batching, against the
same server answering one request at a time.

Two `python -m lm serve` processes run the same checkpoint: one with `--max_batch 32` (lm: the
engine decodes every waiting request together, continuous batching) and one with `--max_batch 1`
(the peer: the engine serves the requests one after another through `lm.Decoder`, CUDA graph and
all). For each client count N in `--clients`, N concurrent clients (asyncio + httpx) each send
`--requests` chat requests, one after the other, to POST /v1/chat/completions with "stream": true,
and read the server-sent events as they come. The questions are the user messages of
`lm.glossary.examples("test")` ("Could you tell me what token id is?", ...), the same ones in the
same order for both servers; sampling is seed 001's (temperature 0.8, top-k 200), at most
`--max_tokens` tokens, and the model may end its turn earlier: the tokens counted are those the
server reports in its usage chunk (`stream_options: {"include_usage": true}`).

For each N and server: aggregate completion tokens/s (all tokens over the wall time from the first
request sent to the last answer read), requests/s, and p50/p90/p99 of the time to first token (the
first chunk with content) and of the whole request. The two servers take turns at each N, so slow
drift of a shared machine falls on both. `--ckpt` may name several checkpoints, measured one after
the other; `random:PRESET` is a preset with random weights (GPT-2's tokenizer for a 50257-token
vocabulary, else the glossary's characters), written to a temporary checkpoint.

    .venv/bin/python bench/serve_load.py --out lm/assets/serve_load_cpu.json     # 2 threads, N = 1, 8, 32
    python bench/serve_load.py --device cuda --ckpt random:gpt2-124m lm/assets/glossary_base.pt \\
        --clients 1,8,32,64 --max_batch 64 --out lm/assets/serve_load_h200.json

Measured, aggregate tokens/s (every request ran to 128 tokens), batched / one at a time:

                                        N=1            N=8            N=32             N=64
    2 CPU cores, glossary base          178 / 209      604 / 136    1,118 / 148 (7.5x)   -
    H200, GPT-2 124M random (fp32)      179 / 400      889 / 391    2,566 / 391        4,515 / 404 (11.2x)
    H200, glossary base                 163 / 1,219  1,312 / 1,368  3,415 / 1,276      5,597 / 1,460 (3.8x)

(lm/assets/serve_load_cpu.json, 2026-12-03, after the server learnt to send a stream's pending text
in one event: the first run, with one event per token, gave 706 / 164 (4.3x) at N=32;
lm/assets/serve_load_h200.json, measured before that change, with --requests 2.)
A batched step costs about 5.5 ms plus 0.1-0.2 ms per row on the H200 whatever the model's size:
the server's Python, not the GPU, sets the pace; alone, one request goes faster through lm.Decoder's
CUDA graph than through the engine's eager batched step.

Prints a table to stderr and ends with one JSON line, for the first checkpoint: {"bench":
"serve_load", "unit": "tokens/s at N=<largest>", "lm": batched tokens/s, "peer": one-at-a-time
tokens/s, "peer_name", "speedup"}; speedup > 1 means batching serves more tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

ROOT = Path(__file__).resolve().parent.parent
PEER_NAME = "one at a time (lm serve --max_batch 1, lm.Decoder)"


# ---- the clients (run in worker processes, so that parsing events never limits the server) ------
async def _one_request(client, url: str, body: dict, record: dict) -> None:
    record["start"] = time.monotonic()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                record["error"] = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":  # read on to the end of the body, so that the connection is kept
                    record["done"] = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    record["error"] = event["error"].get("message", str(event["error"]))
                if event.get("usage"):
                    record["completion_tokens"] = event["usage"]["completion_tokens"]
                    record["prompt_tokens"] = event["usage"]["prompt_tokens"]
                for choice in event.get("choices") or []:
                    if record["first"] is None and choice.get("delta", {}).get("content"):
                        record["first"] = time.monotonic()
                    if choice.get("finish_reason"):
                        record["finish_reason"] = choice["finish_reason"]
                record["chunks"] += 1
    except Exception as err:  # a broken connection or a stall: counted, reported
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        record["end"] = time.monotonic()
        if record["error"] is None and not record["done"]:
            record["error"] = "the stream ended without [DONE]"


async def _clients(base: str, model: str, clients: list[int], requests: int, questions: list[str],
                   settings: dict, start_at: float, timeout: float) -> list[dict]:
    import httpx

    url = base + "/v1/chat/completions"
    records = []
    limits = httpx.Limits(max_connections=len(clients) + 4, max_keepalive_connections=len(clients) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        async def one_client(c: int) -> None:
            for r in range(requests):
                q = (c * requests + r) % len(questions)
                body = {"model": model, "messages": [{"role": "user", "content": questions[q]}], "stream": True,
                        "stream_options": {"include_usage": True}, **settings}
                record = {"client": c, "request": r, "question": q, "start": None, "first": None, "end": None,
                          "completion_tokens": 0, "prompt_tokens": 0, "finish_reason": None, "error": None,
                          "done": False, "chunks": 0}
                records.append(record)
                await _one_request(client, url, body, record)

        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(one_client(c) for c in clients))
    return records


def run_clients(*args) -> list[dict]:
    """Entry point of a worker process: its share of the clients, from `start_at` (time.monotonic)."""
    return asyncio.run(_clients(*args))


# ---- the servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m lm serve` in a subprocess (its own process group), killed by `stop()`."""

    def __init__(self, ckpt: str, max_batch: int, device: str, threads: int | None, log_dir: Path,
                 extra: tuple = ()):
        self.port, self.max_batch = free_port(), max_batch
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "lm", "serve", "--ckpt", ckpt, "--port", str(self.port), "--no_history",
                        "--max_batch", str(max_batch), "--device", device, *extra]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.log_path = log_dir / f"serve_b{max_batch}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lm serve (max_batch {self.max_batch}) exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                response = httpx.get(self.url + "/health", timeout=2.0)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"lm serve (max_batch {self.max_batch}) did not answer /health in {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30.0).json()

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # uvicorn shuts down gracefully (5 s at most)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=15)
        self.log.close()


# ---- figures --------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None]
    start = min(r["start"] for r in records)
    end = max(r["end"] for r in records)
    wall = end - start
    tokens = sum(r["completion_tokens"] for r in ok)
    ttft = [r["first"] - r["start"] for r in ok if r["first"] is not None]
    total = [r["end"] - r["start"] for r in ok]
    per_client: dict[int, list[float]] = {}
    for r in ok:
        per_client.setdefault(r["client"], []).append(r["end"] - r["start"])
    client_means = [sum(v) / len(v) for v in per_client.values()]
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[r["finish_reason"] or "none"] = reasons.get(r["finish_reason"] or "none", 0) + 1
    errors = [r["error"] for r in records if r["error"] is not None]
    return {
        "requests": len(records), "ok": len(ok), "errors": len(errors), "error_samples": errors[:5],
        "completion_tokens": tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "mean_completion_tokens": tokens / len(ok) if ok else 0.0,
        "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "ttft_s": {f"p{p}": percentile(ttft, p) for p in (50, 90, 99)},
        "total_s": {f"p{p}": percentile(total, p) for p in (50, 90, 99)},
        "no_content": len(ok) - len(ttft),
        "client_mean_total_s": {"min": min(client_means) if client_means else None,
                                "max": max(client_means) if client_means else None},
        "finish_reasons": reasons,
    }


def engine_delta(before: dict, after: dict) -> dict:
    """What the engine did between two /health snapshots: requests, tokens and (approximately, from
    the rounded cumulative mean) the mean number of rows per decoding step."""
    def steps(h):  # rows = tokens - one prefill token per request (batched); rows / mean_batch = steps
        rows = h["tokens"] - (h["requests"] if h.get("batched") else 0)
        return rows / h["mean_batch"] if h.get("mean_batch") else 0.0, rows

    (s0, r0), (s1, r1) = steps(before), steps(after)
    return {"requests": after["requests"] - before["requests"], "tokens": after["tokens"] - before["tokens"],
            "mean_batch": round((r1 - r0) / (s1 - s0), 2) if s1 - s0 > 0 else None}


def fmt(x, scale=1.0, digits=0) -> str:
    return "-" if x is None else f"{x * scale:,.{digits}f}"


def print_table(model: str, rows: list[dict]) -> None:
    print(f"\n{model}", file=sys.stderr)
    head = (f"{'server':<14}{'N':>4}{'reqs':>6}{'err':>5}{'tokens':>8}{'tok/req':>8}{'wall s':>8}{'tok/s':>9}"
            f"{'req/s':>7}{'batch':>7}  {'TTFT ms p50/p90/p99':>22}  {'total s p50/p90/p99':>20}")
    print(head, file=sys.stderr)
    print("-" * len(head), file=sys.stderr)
    for row in rows:
        s = row["summary"]
        ttft = "/".join(fmt(s["ttft_s"][k], 1000) for k in ("p50", "p90", "p99"))
        total = "/".join(fmt(s["total_s"][k], 1, 2) for k in ("p50", "p90", "p99"))
        print(f"{row['server']:<14}{row['clients']:>4}{s['requests']:>6}{s['errors']:>5}{s['completion_tokens']:>8}"
              f"{s['mean_completion_tokens']:>8.1f}{s['wall_s']:>8.2f}{s['tokens_per_s']:>9,.0f}"
              f"{s['requests_per_s']:>7.2f}{fmt(row['engine']['mean_batch'], 1, 1):>7}  {ttft:>22}  {total:>20}",
              file=sys.stderr)


# ---- the checkpoints ------------------------------------------------------------------------------
def random_checkpoint(preset: str, folder: Path) -> Path:
    """A preset with random weights and a tokenizer that fits its vocabulary, saved for `lm serve`."""
    import torch

    import lm

    torch.manual_seed(0)
    config = lm.preset(preset)
    if config.vocab_size == 50257:
        from lm.tokenizers.tiktoken_gpt2 import TiktokenTokenizer

        tokenizer = TiktokenTokenizer("gpt2")
    else:
        tokenizer = lm.CharTokenizer.train(lm.glossary.all_text())
        config = lm.preset(preset, vocab_size=tokenizer.vocab_size)
    model = lm.GPT(config, tokenizer=tokenizer)
    path = folder / f"{preset}-random.pt"
    lm.save_checkpoint(path, model, train_config={"note": f"random weights, preset {preset} (bench/serve_load.py)"})
    return path


def describe(ckpt: Path) -> dict:
    import lm

    model = lm.load_model(ckpt, device="cpu")
    c = model.config
    return {"params": sum(p.numel() for p in model.parameters()), "vocab_size": c.vocab_size,
            "block_size": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head, "d_model": c.d_model,
            "tokenizer": type(model.tokenizer).__name__}


def machine(device: str, threads: int | None) -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "server_torch_threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
    else:
        info["device_name"] = info["cpu"]
    try:
        info["load_average_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def write(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


# ---- the run --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", default=[str(ROOT / "lm/assets/glossary_base.pt")],
                        help="checkpoint(s) to serve, or random:PRESET (default: lm/assets/glossary_base.pt)")
    parser.add_argument("--device", default="cpu", help="passed to lm serve: cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/torch threads of each server process (default: 2 on CPU, torch's own on CUDA)")
    parser.add_argument("--clients", default="1,8,32", help="client counts N, comma-separated (default: 1,8,32)")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends in turn (default: 4)")
    parser.add_argument("--max_tokens", type=int, default=128, help="max_tokens of each request (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8, seed 001)")
    parser.add_argument("--top_k", type=int, default=200, help="(default: 200, seed 001)")
    parser.add_argument("--max_batch", type=int, default=32, help="lm's server: --max_batch (default: 32)")
    parser.add_argument("--no_cuda_graph", action="store_true",
                        help="lm's server: --no_cuda_graph (GPU: the batched step runs eagerly)")
    parser.add_argument("--warmup", type=int, default=2, help="requests per server before measuring (default: 2)")
    parser.add_argument("--client_procs", type=int, default=None,
                        help="processes the clients are spread over (default: 1 on CPU, 4 on CUDA)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    threads = args.threads if args.threads is not None else (2 if args.device == "cpu" else None)
    procs = args.client_procs or (1 if args.device == "cpu" else 4)
    settings = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k}

    def on_term(signum, frame):  # a kill of the bench still stops the servers (finally below)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    import lm

    questions = [m["content"] for e in lm.glossary.examples("test") for m in e if m["role"] == "user"]
    results = {"bench": "serve_load", "command": " ".join(sys.argv), "machine": machine(args.device, threads),
               "settings": {**settings, "clients": clients, "requests_per_client": args.requests,
                            "max_batch": args.max_batch, "device": args.device, "client_procs": procs,
                            "questions": "lm.glossary.examples('test') user messages", "n_questions": len(questions),
                            "ttft": "first streamed chunk with non-empty content",
                            "tokens": "usage.completion_tokens of the final chunk (stream_options.include_usage)"},
               "models": []}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    servers: list[ServeProcess] = []
    pool = concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        for name in args.ckpt:
            if name.startswith("random:"):
                ckpt = random_checkpoint(name.split(":", 1)[1], work)
            else:
                ckpt = Path(name)
            entry = {"ckpt": name, **describe(ckpt), "runs": []}
            results["models"].append(entry)
            print(f"{name}: {entry['params']:,} parameters, serving on {args.device} "
                  f"(max_batch {args.max_batch} and 1, {threads or 'default'} threads each)", file=sys.stderr)
            graph = ("--no_cuda_graph",) if args.no_cuda_graph else ()
            sides = {"lm": ServeProcess(str(ckpt), args.max_batch, args.device, threads, work, graph),
                     "one-at-a-time": ServeProcess(str(ckpt), 1, args.device, threads, work)}
            servers += sides.values()
            t0 = time.monotonic()
            for server in sides.values():
                server.wait_ready()
            entry["server_start_s"] = round(time.monotonic() - t0, 2)
            model_name = __import__("httpx").get(sides["lm"].url + "/v1/models").json()["data"][0]["id"]
            for side, server in sides.items():  # warm-up: first allocations, CUDA graph capture
                warm = list(range(max(1, args.warmup)))
                pool.submit(run_clients, server.url, model_name, warm, 1, questions, settings, 0.0,
                            args.timeout).result()
            for n in clients:
                for side, server in sides.items():
                    before = server.health()
                    shares = [list(range(n))[i::procs] for i in range(procs)]
                    start_at = time.monotonic() + 0.5
                    futures = [pool.submit(run_clients, server.url, model_name, share, args.requests, questions,
                                           settings, start_at, args.timeout) for share in shares if share]
                    records = [r for f in futures for r in f.result()]
                    after = server.health()
                    row = {"server": side, "max_batch": server.max_batch, "clients": n,
                           "summary": summarize(records), "engine": engine_delta(before, after), "health_after": after}
                    entry["runs"].append(row)
                    s = row["summary"]
                    print(f"  N={n:>3} {side:<14} {s['tokens_per_s']:>9,.0f} tok/s  {s['requests_per_s']:.2f} req/s  "
                          f"errors {s['errors']}  ({s['wall_s']:.1f} s)", file=sys.stderr, flush=True)
            for server in sides.values():
                entry.setdefault("server_log_tail", {})[f"max_batch {server.max_batch}"] = server.log_tail(10)
                server.stop()
            print_table(f"{name} ({entry['params']:,} parameters, {args.device})", entry["runs"])
            if args.out:  # after each checkpoint, so that a run cut short keeps what it measured
                write(args.out, results)
    finally:
        for server in servers:
            server.stop()
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)

    first = results["models"][0]
    largest = max(clients)
    by_side = {r["server"]: r["summary"]["tokens_per_s"] for r in first["runs"] if r["clients"] == largest}
    lm_rate, peer_rate = by_side["lm"], by_side["one-at-a-time"]
    results["summary"] = {"bench": "serve_load", "unit": f"tokens/s at N={largest} clients", "lm": lm_rate,
                          "peer": peer_rate, "peer_name": PEER_NAME, "speedup": lm_rate / peer_rate,
                          "model": first["ckpt"], "device": args.device}
    if args.out:
        write(args.out, results)
    print(f"\ntotal {results['seconds']:.0f} s", file=sys.stderr)
    report("serve_load", f"tokens/s at N={largest} clients", lm_rate, peer_rate, PEER_NAME, higher_is_better=True)


if __name__ == "__main__":
    main()
