"""Fault injection for `lm train`: stop a run at random points, resume it, check that nothing is lost.

    python scripts/stress.py --trials 300 --jobs 2        (what `make stress` runs)

Every trial trains the same tiny model with `python -m lm train` in a subprocess, stops it once or
twice with SIGKILL, SIGINT or SIGTERM, then runs the same command again until the run is done. It
checks that last.pt always loads and agrees with itself (its step, history and metrics), and that the
finished run equals an uninterrupted one exactly (on CPU, one thread): every loss, learning rate,
gradient norm and evaluation, the metrics.csv rows, best.pt and the final weights.

Where the signal lands is chosen two ways:
  timed    after a random delay, anywhere: during start-up, a step, an evaluation, a save
  hooked   from inside the trainer, at the n-th step, evaluation (estimate_loss), checkpoint write
           (after the bytes, before the rename) or metrics.csv rewrite, so that the rare places are
           hit as often as the common ones. The command then runs through this script's `child`
           mode, which installs the hooks and calls `lm.cli.main` as `python -m lm` does; the
           library itself has no hooks.

It prints a line per trial that went wrong, then the tally, then the tally as one JSON line.
tests/test_faults.py runs a handful of these trials in the unit tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
PLACES = ("step", "eval", "save", "metrics")  # where a hooked signal can land
MAX_STEPS, EVAL_INTERVAL = 24, 8
TRAIN_FLAGS = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4",
               "--max_steps", str(MAX_STEPS), "--eval_interval", str(EVAL_INTERVAL), "--eval_iters", "2",
               "--dropout", "0.1", "--lr", "1e-2", "--warmup_steps", "3", "--seed", "7", "--no_progress",
               "--device", "cpu"]  # dropout draws random numbers: a resume must restore the RNG too
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "train_loss", "val_loss")  # not step_time


# ---- the child: `lm train` with a signal sent from inside ----------------------------------------
def child(events: list[tuple[str, int, int]], argv: list[str]) -> int:
    """Run `lm <argv>`, sending each event's signal to itself the n-th time its place is reached,
    one event after the other (the second is counted from when the first fired)."""
    import torch

    import lm.cli
    import lm.trainer

    armed = {"index": 0, "count": 0}

    def reached(place: str) -> None:
        if armed["index"] >= len(events) or events[armed["index"]][0] != place:
            return
        armed["count"] += 1
        if armed["count"] == events[armed["index"]][1]:
            signum = events[armed["index"]][2]
            armed["index"], armed["count"] = armed["index"] + 1, 0
            os.kill(os.getpid(), signum)  # SIGKILL ends the process here; the others run their handler

    def before(place, function):
        def hooked(*args, **kwargs):
            reached(place)
            return function(*args, **kwargs)
        return hooked

    def after(place, function):
        def hooked(*args, **kwargs):
            result = function(*args, **kwargs)
            reached(place)
            return result
        return hooked

    lm.trainer.Trainer._start_step = before("step", lm.trainer.Trainer._start_step)
    lm.trainer.estimate_loss = before("eval", lm.trainer.estimate_loss)
    torch.save = after("save", torch.save)  # the checkpoint's bytes are written, not yet renamed into place
    if hasattr(lm.trainer.MetricsLogger, "_rewrite"):  # (lm before issue 14 had none)
        lm.trainer.MetricsLogger._rewrite = before("metrics", lm.trainer.MetricsLogger._rewrite)
    return lm.cli.main(argv)


# ---- a run and its reference ---------------------------------------------------------------------
def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_argv(data_dir: Path, out_dir: Path) -> list[str]:
    return ["train", "--data_dir", str(data_dir), "--out_dir", str(out_dir), *TRAIN_FLAGS]


def prepare(work: Path) -> Path:
    """A small prepared data folder of varied text (so that losses differ from step to step)."""
    from lm.cli import main

    words = "the king and queen of a small castle walked to the river at dawn while birds sang".split()
    rng = random.Random(0)
    corpus = work / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(words) for _ in range(1500)) + "\n", encoding="utf-8")
    data = work / "data"
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            assert main(["prep", "--corpus", str(corpus), "--out_dir", str(data), "--val_fraction", "0.2"]) == 0
        finally:
            sys.stdout = stdout
    return data


def run_lm(argv: list[str], events: list[tuple[str, int, int]] = (), delay: float | None = None,
           after_start: bool = False, timeout: float = 300) -> tuple[int, str]:
    """`python -m lm <argv>` in a subprocess (through `child` when there are events); with `delay`,
    the first event's signal is sent from outside after that many seconds instead, counted from the
    start of the process, or with `after_start` from when training began (metrics.csv appeared)."""
    if events and delay is None:
        spec = ",".join(f"{place}:{n}:{signal.Signals(s).name[3:]}" for place, n, s in events)
        command = [sys.executable, str(Path(__file__).resolve()), "child", spec, "--", *argv]
    else:
        command = [sys.executable, "-m", "lm", *argv]
    process = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if delay is not None and events:
        metrics = Path(argv[argv.index("--out_dir") + 1]) / "metrics.csv"
        while after_start and not metrics.exists() and process.poll() is None:
            time.sleep(0.01)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(events[0][2])
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


# ---- checks --------------------------------------------------------------------------------------
def check_last(out_dir: Path) -> str | None:
    """None when out_dir/last.pt is absent or whole and consistent; else what is wrong."""
    import lm

    path = out_dir / "last.pt"
    if not path.exists():
        return None
    try:
        ckpt = lm.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001  (any failure to load is the finding)
        return f"last.pt does not load: {err}"
    history = ckpt["trainer"]["history"]
    if history["step"] != list(range(ckpt["step"])):
        return f"last.pt at step {ckpt['step']} has a history of steps {history['step'][-3:]}"
    if any(step >= ckpt["step"] for step in history["eval_step"]):
        return f"last.pt at step {ckpt['step']} has evaluations after it: {history['eval_step']}"
    rows = metric_rows(out_dir)
    kept = [r["step"] for r in rows if int(r["step"]) < ckpt["step"]]
    if kept and kept != [str(s) for s in range(len(kept))]:
        return f"metrics.csv rows before step {ckpt['step']} are not 0, 1, 2, ...: {kept[:5]}..."
    return None


def metric_rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: r[k] for k in METRIC_COLUMNS} for r in csv.DictReader(f) if None not in r.values()]


@dataclass
class Finished:
    """What a finished run leaves, for comparing two runs exactly."""

    history: dict
    weights: dict
    best_step: int
    best_weights: dict
    rows: list[dict]

    @classmethod
    def read(cls, out_dir: Path) -> "Finished":
        import lm

        last, best = lm.load_checkpoint(out_dir / "last.pt"), lm.load_checkpoint(out_dir / "best.pt")
        history = {k: v for k, v in last["trainer"]["history"].items() if k not in ("step_time", "tokens_per_second")}
        return cls(history, last["model"], best["step"], best["model"], metric_rows(out_dir))

    def differences(self, other: "Finished") -> list[str]:
        import torch

        found = [f"history[{k!r}]" for k in self.history if self.history[k] != other.history.get(k)]
        if any(not torch.equal(v, other.weights[k]) for k, v in self.weights.items()):
            found.append("last.pt weights")
        if self.best_step != other.best_step or any(not torch.equal(v, other.best_weights[k])
                                                    for k, v in self.best_weights.items()):
            found.append(f"best.pt (step {self.best_step} vs {other.best_step})")
        if self.rows != other.rows:
            found.append(f"metrics.csv ({len(self.rows)} rows vs {len(other.rows)})")
        return found


# ---- a trial -------------------------------------------------------------------------------------
@dataclass
class Trial:
    faults: list[dict]  # each {"mode": "hooked"|"timed", "events": [(place, n, signum)], "delay": s}
    codes: list[int] = field(default_factory=list)  # the exit status of each faulted run
    broken: list[str] = field(default_factory=list)  # last.pt problems found after a fault
    differences: list[str] = field(default_factory=list)  # how the finished run differs from the reference
    resumes: int = 0

    @property
    def loadable(self) -> bool:
        return not self.broken

    @property
    def exact(self) -> bool:
        return not self.broken and not self.differences

    def describe(self) -> str:
        faults = "; ".join(f"{f['mode']} " + (f"{f['delay']:.2f}s {signal.Signals(f['events'][0][2]).name}"
                                              if f["mode"] == "timed" else
                                              ", ".join(f"{p}#{n} {signal.Signals(s).name}" for p, n, s in f["events"]))
                           for f in self.faults)
        return f"[{faults}] exits {self.codes}"


def random_fault(rng: random.Random, run_seconds: float) -> dict:
    signum = rng.choice(list(SIGNALS.values()))
    if rng.random() < 0.25:  # half of them from the start of the process, half from the first step
        after_start = rng.random() < 0.5
        delay = rng.uniform(0, 0.3) if after_start else rng.uniform(0, run_seconds)  # training takes ~0.3 s
        return {"mode": "timed", "events": [("any", 1, signum)], "delay": delay, "after_start": after_start}
    place = rng.choice(PLACES)
    largest = {"step": MAX_STEPS, "eval": 2 * MAX_STEPS // EVAL_INTERVAL, "save": 6, "metrics": 1}[place]
    events = [(place, rng.randint(1, largest), signum)]
    if signum != signal.SIGKILL and rng.random() < 0.3:  # a second signal while it saves
        events.append(("save", 1, rng.choice([signal.SIGINT, signal.SIGTERM])))
    return {"mode": "hooked", "events": events, "delay": None}


def run_trial(trial: Trial, data_dir: Path, out_dir: Path, reference: Finished,
              resume=None) -> Trial:
    """Apply the trial's faults one after the other, check last.pt after each, then finish the run
    (`resume(argv)` if given, else a clean `python -m lm train`) and compare it with the reference."""
    argv = train_argv(data_dir, out_dir)
    for fault in trial.faults:
        code, output = run_lm(argv, fault["events"], fault["delay"], fault.get("after_start", False))
        trial.codes.append(code)
        problem = check_last(out_dir)
        if problem:
            trial.broken.append(problem)
        if code not in (0, 130, 143, -signal.SIGKILL, -signal.SIGINT, -signal.SIGTERM):
            trial.broken.append(f"exit status {code}: {output[-400:]}")
    for _ in range(3):  # a clean run finishes the job; more than one would mean a run that does not end
        trial.resumes += 1
        code = resume(argv) if resume else run_lm(argv)[0]
        if code == 0:
            break
    else:
        trial.broken.append(f"the clean resume exits {code}")
        return trial
    trial.differences = reference.differences(Finished.read(out_dir))
    return trial


def reference_run(data_dir: Path, out_dir: Path) -> Finished:
    code, output = run_lm(train_argv(data_dir, out_dir))
    assert code == 0, output
    return Finished.read(out_dir)


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        events = [(place, int(n), SIGNALS[name]) for place, n, name in (e.split(":") for e in argv[1].split(","))]
        return child(events, argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="lm-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare(work)
    started = time.perf_counter()
    reference = reference_run(data_dir, work / "reference")
    run_seconds = time.perf_counter() - started
    rng = random.Random(args.seed)
    trials = [Trial([random_fault(rng, run_seconds) for _ in range(rng.choice([1, 1, 2]))])
              for _ in range(args.trials)]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda it: run_trial(it[1], data_dir, work / f"trial{it[0]}", reference),
                             enumerate(trials)))
    for i, trial in enumerate(done):
        if not trial.exact:
            print(f"trial {i} {trial.describe()}: {trial.broken + trial.differences}")
    tally = {"trials": len(done), "loadable": sum(t.loadable for t in done),
             "resumed_exactly": sum(t.exact for t in done),
             "faults": sum(len(t.faults) for t in done),
             "seconds": round(time.perf_counter() - started, 1)}
    print(f"trials {tally['trials']}, last.pt loadable after every fault {tally['loadable']}, resumed exactly "
          f"{tally['resumed_exactly']} ({tally['faults']} faults, {tally['seconds']} s)")
    print(json.dumps(tally))
    return 0 if tally["resumed_exactly"] == tally["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
