"""Peak memory of a whole run on a dense log: training, validation and the final test report.

    python bench/eval_memory.py                          # this checkout
    python bench/eval_memory.py --repo /path/to/other    # another checkout's main.py on the same log
    python bench/eval_memory.py --users 100 --items 50 --log /tmp/small.txt -- --maxlen 10   # after --: main.py's

The log is made here, once per --log path: 6,040 users with ~163 interactions each over 3,416 items (the shape
of MovieLens-1M; --users, --items), as `user item` lines. The run is InfoNCE, batch 256, maxlen 200, d 64,
2 heads, one epoch with validation, then the test report (flags after -- go to main.py). Prints the process's
peak RSS (wait4) and the peak_rss_mb that train.log recorded.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--loss", "infonce", "--batch_size", "256", "--maxlen", "200", "--hidden_units", "64", "--num_heads", "2",
         "--num_epochs", "1", "--eval_every", "1", "--device", "cpu", "--cache_dir", ""]


def write_dense_log(path, users=6040, items=3416, seed=0):
    """Users walk a ring of items in small steps (some sequential signal), lengths 20 + geometric(mean 143)."""
    rng = np.random.default_rng(seed)
    lengths = 20 + rng.geometric(1 / 143, size=users)
    with open(path, "w") as f:
        for u, n in enumerate(lengths, 1):
            walk = (rng.integers(items) + np.cumsum(rng.integers(1, 4, size=n))) % items + 1
            f.write("".join(f"{u} {i}\n" for i in walk))
    return int(lengths.sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=ROOT, help="checkout whose main.py runs")
    p.add_argument("--users", type=int, default=6040, help="users of the log written when --log does not exist")
    p.add_argument("--items", type=int, default=3416, help="items of that log")
    p.add_argument("--log", help="the log (written if absent; default: sasrec_dense_log[_USERSxITEMS].txt in the "
                   "temporary folder)")
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    if args.log is None:
        sizes = "" if (args.users, args.items) == (6040, 3416) else f"_{args.users}x{args.items}"
        args.log = os.path.join(tempfile.gettempdir(), f"sasrec_dense_log{sizes}.txt")
    if not os.path.exists(args.log):
        print(f"writing {args.log}: {write_dense_log(args.log, args.users, args.items)} interactions")
    run_dir = tempfile.mkdtemp(prefix="eval_memory_")
    cmd = [sys.executable, os.path.join(args.repo, "main.py"), "--data", args.log, "--run_dir", run_dir, *FLAGS, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{out[-3000:]}")
    with open(os.path.join(run_dir, "logs", "train.log")) as f:
        logged = [json.loads(line)["peak_rss_mb"] for line in f]
    print(f"{args.repo}: peak RSS {usage.ru_maxrss / 1024:.0f} MB for the whole run "
          f"({time.perf_counter() - start:.0f} s); train.log peak_rss_mb {logged}")


if __name__ == "__main__":
    main()
