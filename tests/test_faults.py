"""Faults injected into real `python -m lm train` runs: SIGKILL, SIGINT and SIGTERM mid-step,
mid-evaluation and mid-save. After each, last.pt loads and agrees with itself, and the resumed run
ends exactly where an uninterrupted one does (CPU, one thread).

A handful of fixed trials; `make stress` (scripts/stress.py) runs hundreds of random ones. Only the
faulted run is a subprocess; the reference and the resumes run in this process, which is the same
code (`lm.cli.main`) without another interpreter's start-up."""

from __future__ import annotations

import importlib.util
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

import lm
from lm.cli import main

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("stress", ROOT / "scripts" / "stress.py")
stress = sys.modules["stress"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(stress)

INT, TERM, KILL = signal.SIGINT, signal.SIGTERM, signal.SIGKILL


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The prepared data and the uninterrupted run every trial must reproduce."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("faults")
    data_dir = stress.prepare(work)
    assert main(stress.train_argv(data_dir, work / "reference")) == 0
    return data_dir, stress.Finished.read(work / "reference")


def resume_here(argv: list[str]) -> int:
    torch.set_num_threads(1)
    return main(argv)


@pytest.mark.parametrize("events, exit_code", [
    ([("step", 13, INT), ("save", 1, INT)], 130),  # Ctrl-C mid-step, and again while it saves
    ([("eval", 3, TERM)], 143),  # SIGTERM mid-evaluation: the evaluation completes and is saved
    ([("save", 3, KILL)], -KILL),  # kill -9 after a checkpoint's bytes, before its rename
    ([("step", 19, KILL)], -KILL),  # kill -9 between two evaluations: the steps since are trained again
], ids=["int-step-and-save", "term-eval", "kill-save", "kill-step"])
def test_a_fault_then_resume_gives_the_uninterrupted_run(bench, tmp_path, events, exit_code):
    data_dir, reference = bench
    out_dir = tmp_path / "run"
    code, output = stress.run_lm(stress.train_argv(data_dir, out_dir), events)
    assert code == exit_code, output
    if code > 0:
        assert f"saved {out_dir}/last.pt at step" in output  # it says where it saved
    assert stress.check_last(out_dir) is None
    assert lm.load_checkpoint(out_dir / "last.pt")["step"] > 0
    trial = stress.run_trial(stress.Trial([]), data_dir, out_dir, reference, resume=resume_here)
    assert trial.exact and trial.resumes == 1, trial.broken + trial.differences


def test_a_signal_at_a_random_moment(bench, tmp_path):
    """From outside, a random (seeded) time after training began: wherever it lands."""
    data_dir, reference = bench
    out_dir = tmp_path / "run"
    fault = {"mode": "timed", "events": [("any", 1, TERM)], "delay": random.Random(0).uniform(0, 0.02),
             "after_start": True}
    trial = stress.run_trial(stress.Trial([fault]), data_dir, out_dir, reference, resume=resume_here)
    assert trial.codes == [143], trial.describe()  # it landed while training
    assert trial.exact, (trial.describe(), trial.broken + trial.differences)
