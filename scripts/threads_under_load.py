"""How the book's training cells slow down when other programs share the CPU: 1 vs 2 threads.

    python scripts/threads_under_load.py              # about 5 minutes on an idle 2-core machine

A chapter-sized training run (a character-level GPT of 4 blocks, width 128, batch 8 x 128, as in
chapters 6 and 7) is timed in a fresh process with 1 and with 2 torch threads, with OpenMP's
default wait policy and with OMP_WAIT_POLICY=PASSIVE, while 0, 1 or 2 other processes keep a core
busy each. Threads that spin while they wait for each other are what a busy machine punishes: a
spinning thread whose partner was descheduled burns its whole time slice. One line per case, then
one JSON line with every time.
"""

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

WORK = r"""
import time, torch, lm
torch.manual_seed(0)
ids = torch.randint(0, 89, (200_000,))
config = lm.ModelConfig(vocab_size=89, block_size=128, n_layer=4, n_head=4, d_model=128)
model = lm.GPT(config)
cfg = lm.TrainConfig(max_steps=STEPS, batch_size=8, eval_interval=10**6, eval_iters=1, progress=False)
start = time.perf_counter()
lm.train(model, ids[:150_000], ids[150_000:], cfg)
print(time.perf_counter() - start)
"""


def spin(stop) -> None:
    """Keep one core busy until told to stop, like another user's job."""
    x = 0
    while not stop.is_set():
        x += 1


def timed(threads: int, policy: str, steps: int) -> float:
    """Seconds for the run; policy: "default", "PASSIVE" (OMP_WAIT_POLICY) or "spin:N" (GOMP_SPINCOUNT)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    out = subprocess.run([sys.executable, "-c", WORK.replace("STEPS", str(steps))], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loads", default="0,1,2", help="numbers of busy background processes")
    parser.add_argument("--policies", default="default,PASSIVE,spin:10000",
                        help="how idle OpenMP threads wait: default, PASSIVE, or spin:N (GOMP_SPINCOUNT=N)")
    args = parser.parse_args()
    results = []
    for load in (int(n) for n in args.loads.split(",")):
        stop = mp.Event()
        hogs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(load)]
        for hog in hogs:
            hog.start()
        time.sleep(0.5)
        try:
            for threads in (1, 2):
                for policy in args.policies.split(","):
                    seconds = timed(threads, policy, args.steps)
                    results.append({"busy": load, "threads": threads, "wait_policy": policy,
                                    "seconds": round(seconds, 2)})
                    print(f"{load} busy processes, {threads} thread(s), wait policy {policy:11}: "
                          f"{seconds:6.1f} s", flush=True)
        finally:
            stop.set()
            for hog in hogs:
                hog.join()
    print(json.dumps({"cpus": os.cpu_count(), "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
